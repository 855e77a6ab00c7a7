// Boot: read the embedded data, build the tabs, the search box and the side panel, and wire the
// keyboard (/ search, 1–5 tabs, arrows between channels, Enter select, c collapse, Esc close).
// Any failure is shown in the page, naming the file or the step, never a blank page.
'use strict';

T.state = {tab: null, selected: null, weight: 'data', categories: new Set(), collapsed: new Set(), query: '', topN: 400};

T.showFatal = function (message) {
  const app = document.getElementById('app');
  T.clear(app);
  app.appendChild(T.el('div', {class: 'banner error', id: 'fatal', role: 'alert'}, [T.el('b', {}, 'This report cannot be shown: '), message]));
};

T.boot = function () {
  let D;
  try {
    D = T.loadData();
  } catch (e) {
    T.showFatal(e.message);
    return;
  }
  T.D = D;
  const S = T.state;
  const app = T.clear(document.getElementById('app'));
  if (D.graph) {
    S.weight = D.graph.weight;
    S.topN = D.graph.routes.length <= 400 ? D.graph.routes.length : 400;
  }

  // problems with the report directory (missing or corrupt files), named
  const banner = T.el('div', {class: 'banner', id: 'problems', role: 'alert', hidden: !D.problems.length},
    D.problems.length ? [T.el('b', {}, 'Some of the report could not be read:'),
      T.el('ul', {}, D.problems.map((p) => T.el('li', {}, [T.el('code', {}, p.file), ' ', p.problem])))] : null);

  // search
  const search = T.el('input', {type: 'search', id: 'search', placeholder: 'search labels and units  ( / )', autocomplete: 'off',
                                'aria-label': 'search labels', 'aria-controls': 'search-results'});
  const results = T.el('ul', {id: 'search-results', class: 'search-results', role: 'listbox', hidden: true});
  const index = T.searchIndex(D);
  let active = -1;
  function suggest() {
    S.query = search.value;
    T.emit('query');
    const words = S.query.trim().toLowerCase().split(/\s+/).filter(Boolean);
    T.clear(results);
    active = -1;
    if (!words.length) { results.hidden = true; return; }
    const hits = index.filter((x) => words.every((w) => x.hay.includes(w))).slice(0, 10);
    for (const x of hits) {
      results.appendChild(T.el('li', {role: 'option', dataset: {unit: x.unit}, onmousedown: (e) => { e.preventDefault(); pick(x.unit); }},
        [T.el('b', {}, x.unit), ' ', T.clip(x.text, 80)]));
    }
    if (!hits.length) results.appendChild(T.el('li', {class: 'muted'}, 'no label matches'));
    results.hidden = false;
  }
  function pick(unit) {
    results.hidden = true;
    T.select(unit);
    if (D.graph && D.graph.nodes.has(unit) && S.tab !== 'graph') T.showTab('graph');
  }
  search.addEventListener('input', suggest);
  search.addEventListener('keydown', (e) => {
    const items = [...results.querySelectorAll('li[data-unit]')];
    if (e.key === 'ArrowDown' || e.key === 'ArrowUp') {
      e.preventDefault();
      active = Math.max(0, Math.min(items.length - 1, active + (e.key === 'ArrowDown' ? 1 : -1)));
      items.forEach((li, i) => li.setAttribute('aria-selected', i === active ? 'true' : 'false'));
    } else if (e.key === 'Enter') {
      e.preventDefault();
      const li = items[active >= 0 ? active : 0];
      if (li) pick(li.dataset.unit);
    } else if (e.key === 'Escape') {
      search.value = '';
      suggest();
      search.blur();
    }
  });
  search.addEventListener('blur', () => setTimeout(() => { results.hidden = true; }, 150));

  // tabs
  const tabs = D.kind === 'diff'
    ? [['changes', 'Changes'], ['graph', 'Graph']]
    : [['graph', 'Graph'], ['circuits', 'Circuits'], ['units', 'Labels'], ['overview', 'Overview'], ['features', 'Feature circuits']];
  const nav = T.el('nav', {class: 'tabs', role: 'tablist', 'aria-label': 'views'});
  const views = T.el('div', {class: 'views'});
  const panes = {};
  for (const [key, name] of tabs) {
    nav.appendChild(T.el('button', {type: 'button', role: 'tab', id: 'tab-' + key, 'aria-controls': 'view-' + key, dataset: {tab: key},
                                    onclick: () => T.showTab(key), onkeydown: tabKey}, name));
    panes[key] = T.el('div', {class: 'view', id: 'view-' + key, role: 'tabpanel', 'aria-labelledby': 'tab-' + key, hidden: true});
    views.appendChild(panes[key]);
  }
  function tabKey(e) {
    if (e.key !== 'ArrowRight' && e.key !== 'ArrowLeft') return;
    const keys = tabs.map((t) => t[0]);
    const i = (keys.indexOf(S.tab) + (e.key === 'ArrowRight' ? 1 : keys.length - 1)) % keys.length;
    T.showTab(keys[i]);
    document.getElementById('tab-' + keys[i]).focus();
  }
  const panelRoot = T.el('aside', {id: 'panel', class: 'panel', 'aria-label': 'selected unit', hidden: true});
  const top = T.el('div', {class: 'topbar'}, [nav, T.el('div', {class: 'search-box'}, [search, results])]);
  T.append(app, [banner, top, T.el('div', {class: 'body'}, [views, panelRoot])]);

  // views
  const V = {};
  try {
    V.graph = D.graph ? T.GraphView(D, panes.graph) : (panes.graph.appendChild(T.missing(D, 'channel graph', [(D.kind === 'diff' ? 'a/' : '') + 'graph.json'])), null);
    if (panes.circuits) V.circuits = T.CircuitsView(D, panes.circuits);
    if (panes.features) V.features = T.FeaturesView(D, panes.features);
    if (panes.units) V.units = T.UnitsView(D, panes.units);
    if (panes.overview) T.OverviewView(D, panes.overview);
    if (panes.changes) T.ChangesView(D, panes.changes);
  } catch (e) {
    banner.hidden = false;
    banner.appendChild(T.el('p', {}, 'A view failed to build: ' + e.message));
    console.error(e);
  }
  T.panel = T.Panel(D, panelRoot);
  T.views = V;

  T.on('change', () => { if (V.graph) V.graph.draw(); if (V.circuits) V.circuits.draw(); syncToggles(); });
  T.on('query', () => { if (V.units) V.units.draw(); });
  T.on('toggleModule', (m) => { if (V.graph) V.graph.toggleModule(m); });
  function syncToggles() {
    for (const input of document.querySelectorAll('fieldset.categories input')) input.checked = S.categories.has(input.dataset.category);
  }

  T.showTab = function (key) {
    if (!panes[key]) return;
    S.tab = key;
    for (const [k, pane] of Object.entries(panes)) pane.hidden = k !== key;
    for (const b of nav.children) b.setAttribute('aria-selected', b.dataset.tab === key ? 'true' : 'false');
    if (location.hash !== '#' + key) history.replaceState(null, '', '#' + key);
    if (key === 'graph' && V.graph && !V.graph.fitted) { V.graph.fit(); V.graph.fitted = true; }
  };
  T.select = function (unit) {
    S.selected = unit;
    if (unit === null) T.panel.hide(); else T.panel.show(unit);
    if (V.graph) V.graph.draw();
    T.emit('select', unit);
  };

  document.addEventListener('keydown', (e) => {
    const typing = e.target instanceof HTMLInputElement || e.target instanceof HTMLSelectElement;
    if (e.key === '/' && !typing) { e.preventDefault(); search.focus(); return; }
    if (e.key === 'Escape' && !typing && S.selected !== null) { T.select(null); return; }
    if (!typing && !e.ctrlKey && !e.metaKey && !e.altKey && /^[1-9]$/.test(e.key) && tabs[Number(e.key) - 1]) T.showTab(tabs[Number(e.key) - 1][0]);
  });
  window.addEventListener('hashchange', () => { const k = location.hash.slice(1); if (panes[k]) T.showTab(k); });
  const want = location.hash.slice(1);
  T.showTab(panes[want] ? want : tabs[0][0]);
  document.body.dataset.ready = 'true';
};

window.addEventListener('error', (e) => {
  const banner = document.getElementById('problems') || document.getElementById('app');
  if (banner) { banner.hidden = false; banner.appendChild(T.el('p', {class: 'error'}, 'Error in the page: ' + e.message)); }
});
if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', T.boot); else T.boot();
