// The side panel of the selected unit: its label and score, the contexts it fires on with
// per-token activation colouring, its strongest routes in and out, the circuits that use it, its
// polysemanticity and SAE features, its module, and links to its neighbours.
'use strict';

T.Panel = function (D, root) {
  const panel = {root};

  function link(unit, text) {
    return T.el('a', {href: '#', class: 'unit-link', dataset: {unit},
                      onclick: (e) => { e.preventDefault(); T.select(unit); }}, text || unit);
  }
  panel.link = link;

  function section(title, body, id) {
    if (!body) return null;
    return T.el('section', {class: 'panel-section', id: id || null}, [T.el('h3', {}, title), body]);
  }

  function labelBlock(unit) {
    const lab = D.labels.byUnit.get(unit);
    if (!lab) return T.el('p', {class: 'muted'}, 'No label for this unit (the report labels the channels, the modules and the most polysemantic units).');
    const ok = lab.status === undefined || lab.status === 'ok';
    const base = D.labels.baseline;
    return T.el('div', {class: 'label-block'}, [
      T.el('p', {class: 'label-text', id: 'panel-label'}, ok ? lab.text : `(${lab.status}) ${lab.text || ''}`),
      lab.negative_text && !String(lab.text || '').includes(lab.negative_text) ? T.el('p', {class: 'muted'}, 'negative: ' + lab.negative_text) : null,
      T.el('p', {class: 'score', id: 'panel-score'}, [
        T.el('b', {}, 'score ' + T.interval(lab.score, lab.score_interval)),
        ` · detection ${T.num(lab.detection, 2)} · fuzzing ${T.num(lab.fuzzing, 2)}` +
        (lab.n_scored ? ` · ${lab.n_scored} held-out contexts` : '') +
        (base && base.mean !== undefined ? ` · random-label baseline ${T.num(base.mean, 2)}` : '')]),
      T.el('p', {class: 'muted'}, 'Score: correlation of the activations simulated from the label alone with the true ones on held-out contexts (95% bootstrap interval).')]);
  }

  // Tokens coloured by activation, as circuitsvis does: orange for positive, blue for negative,
  // opacity by |activation| over the unit's largest.
  function contextRow(ctx, scale) {
    const tokens = Array.isArray(ctx.tokens) ? ctx.tokens : [];
    const acts = Array.isArray(ctx.acts) ? ctx.acts : [];
    const peak = acts.reduce((m, a, i) => (Math.abs(a) > Math.abs(acts[m] || 0) ? i : m), 0);
    const row = T.el('div', {class: 'context', dataset: {row: ctx.row === undefined ? '' : ctx.row}});
    tokens.forEach((tok, i) => {
      const a = typeof acts[i] === 'number' ? acts[i] : 0;
      const t = String(tok).replace(/\n/g, '↵');
      const span = T.el('span', {class: 'tok' + (i === peak ? ' peak' : ''), title: `${JSON.stringify(String(tok))}: ${T.num(a)}`}, t);
      const alpha = Math.min(1, Math.abs(a) / (scale || 1));
      span.style.background = a >= 0 ? `rgba(255,125,20,${(0.85 * alpha).toFixed(3)})` : `rgba(40,110,255,${(0.85 * alpha).toFixed(3)})`;
      row.appendChild(span);
    });
    row.appendChild(T.el('span', {class: 'ctx-max'}, ` max ${T.num(acts[peak])}`));
    return row;
  }

  function contextsBlock(unit) {
    const lab = D.labels.byUnit.get(unit);
    const ev = lab && lab.evidence;
    if (!ev) return null;
    const stats = ev.stats || {};
    const scale = Math.max(Math.abs(stats.max || 0), Math.abs(stats.min || 0)) || null;
    const kinds = [['top', 'top'], ['random', 'random'], ['quantile', 'across quantiles'], ['bottom', 'most negative']]
      .filter(([k]) => Array.isArray(ev[k]) && ev[k].length);
    if (!kinds.length) return null;
    const list = T.el('div', {class: 'contexts', id: 'panel-contexts'});
    const tabs = T.el('div', {class: 'tabs small', role: 'tablist'});
    function show(k) {
      T.clear(list);
      const s = scale || Math.max(1e-12, ...ev[k].flatMap((c) => (c.acts || []).map(Math.abs)));
      for (const ctx of ev[k]) list.appendChild(contextRow(ctx, s));
      for (const b of tabs.children) b.setAttribute('aria-selected', b.dataset.k === k ? 'true' : 'false');
    }
    for (const [k, name] of kinds) {
      tabs.appendChild(T.el('button', {type: 'button', role: 'tab', dataset: {k}, onclick: () => show(k)}, `${name} (${ev[k].length})`));
    }
    show(kinds[0][0]);
    const facts = stats.n_tokens ? T.el('p', {class: 'muted'}, `over ${stats.n_tokens} tokens: mean ${T.num(stats.mean)}, max ${T.num(stats.max)}, min ${T.num(stats.min)}`) : null;
    return T.el('div', {}, [tabs, list, facts]);
  }

  function tokensBlock(ev) {
    if (!ev) return null;
    const items = [];
    if (Array.isArray(ev.promoted) && ev.promoted.length) items.push(T.el('p', {}, ['promotes ', tokenList(ev.promoted)]));
    if (Array.isArray(ev.suppressed) && ev.suppressed.length) items.push(T.el('p', {}, ['suppresses ', tokenList(ev.suppressed)]));
    if (Array.isArray(ev.attention) && ev.attention.length) {
      items.push(T.el('div', {class: 'attention'}, ev.attention.slice(0, 5).map((a) => T.el('div', {}, [
        T.el('code', {}, JSON.stringify(String(a.query))), ' attends to ',
        (a.keys || []).map((k) => `${JSON.stringify(String(k[0]))} ${T.num(k[1], 2)} (${k[2]} back)`).join(', ')]))));
    }
    return items.length ? T.el('div', {}, items) : null;
  }
  function tokenList(pairs) {
    return T.el('span', {}, pairs.slice(0, 8).map((p) => T.el('code', {class: 'tokchip', title: T.num(p[1])}, String(p[0]))));
  }

  function routesBlock(channel) {
    if (!D.graph || !D.graph.nodes.has(channel)) return null;
    const w = T.state.weight;
    const {incoming, outgoing} = T.routesOf(D, channel, w);
    const table = (rows, other) => T.el('table', {class: 'compact'}, [
      T.el('thead', {}, T.el('tr', {}, [T.el('th', {}, other === 'writer' ? 'from' : 'to'), T.el('th', {}, w),
                                         T.el('th', {}, 'attribution'), T.el('th', {}, 'circuits')])),
      T.el('tbody', {}, rows.slice(0, 8).map((r) => T.el('tr', {}, [
        T.el('td', {}, other === 'writer' ? [link(r.writer), r.path ? ` → :${r.path}` : ''] : [link(r.reader), r.path ? ` :${r.path}` : '']),
        T.el('td', {class: 'num'}, T.num(r[w])), T.el('td', {class: 'num'}, T.num(r.attribution)),
        T.el('td', {}, T.routeCategories(D, r.id).join(', '))])))]);
    return T.el('div', {id: 'panel-routes'}, [
      T.el('h4', {}, `strongest in (${incoming.length})`), incoming.length ? table(incoming, 'writer') : T.el('p', {class: 'muted'}, 'none'),
      T.el('h4', {}, `strongest out (${outgoing.length})`), outgoing.length ? table(outgoing, 'reader') : T.el('p', {class: 'muted'}, 'none')]);
  }

  function evidenceRoutes(ev) {
    if (!ev || (!(ev.incoming || []).length && !(ev.outgoing || []).length)) return null;
    const item = (p) => T.el('li', {}, [T.channelOf(p[0]) || D.labels.byUnit.has(p[0]) ? link(p[0]) : String(p[0]), ' ', T.num(p[1])]);
    return T.el('div', {}, [
      (ev.incoming || []).length ? T.el('p', {}, ['inputs: ']) : null, T.el('ul', {class: 'inline'}, (ev.incoming || []).map(item)),
      (ev.outgoing || []).length ? T.el('p', {}, ['outputs: ']) : null, T.el('ul', {class: 'inline'}, (ev.outgoing || []).map(item))]);
  }

  function circuitsBlock(channel) {
    if (!D.circuits || !D.graph) return null;
    const uses = D.circuits.categories.map((c) => {
      const n = [...c.routes].filter((id) => { const r = D.graph.routeById.get(id); return r && (r.writer === channel || r.reader === channel); }).length;
      return [c, n];
    }).filter(([, n]) => n > 0);
    if (!uses.length) return T.el('p', {class: 'muted'}, 'No circuit uses this channel.');
    return T.el('ul', {class: 'inline'}, uses.map(([c, n]) => {
      const sw = T.el('span', {class: 'swatch'});
      sw.style.background = c.color;
      return T.el('li', {}, [sw, `${c.name}: ${n} route${n > 1 ? 's' : ''}`]);
    }));
  }

  function polyBlock(unit, channel) {
    const own = D.poly.byUnit.get(unit);
    const rows = own ? [own] : (D.poly.byChannel.get(channel) || []);
    if (!rows.length) return null;
    return T.el('div', {id: 'panel-poly'}, [
      T.el('table', {class: 'compact'}, [
        T.el('thead', {}, T.el('tr', {}, ['unit', 'effective features', 'strongest SAE features (share)'].map((h) => T.el('th', {}, h)))),
        T.el('tbody', {}, rows.slice(0, 10).map((r) => T.el('tr', {}, [
          T.el('td', {}, r.unit === unit ? r.unit : link(r.unit)), T.el('td', {class: 'num'}, T.num(r.score)),
          T.el('td', {}, (r.top_features || []).slice(0, 5).map((f) => `${r.hook ? 'f' : ''}${f[0]} (${T.num(f[1], 2)})`).join(', '))])))]),
      T.el('p', {class: 'muted'}, `Effective number of SAE features (exp of the entropy of their shares) over the unit's top decile` +
        (rows[0].hook ? `, SAE at ${rows[0].hook}` : '') + '.')]);
  }

  function subunitsBlock(channel, unit) {
    const subs = [...D.labels.byUnit.entries()].filter(([u]) => u !== unit && T.channelOf(u) === channel && u !== channel);
    if (!subs.length) return null;
    return T.el('ul', {class: 'units'}, subs.slice(0, 20).map(([u, lab]) => T.el('li', {}, [link(u), ': ', T.clip(lab.text, 90), ` (${T.num(lab.score, 2)})`])));
  }

  function moduleBlock(unit, channel) {
    let m = null;
    if (unit.startsWith('module:')) m = Number(unit.slice(7));
    else if (channel && D.modules.of.has(channel)) m = D.modules.of.get(channel);
    if (m === null || !D.modules.list[m]) return null;
    const members = D.modules.list[m];
    const sw = T.el('span', {class: 'swatch'});
    sw.style.background = T.color(m);
    return T.el('div', {id: 'panel-module'}, [
      T.el('p', {}, [sw, unit.startsWith('module:') ? `M${m}: ${members.length} channels` : [link('module:' + m, `module M${m}`), ` (${members.length} channels)`],
        ' ', T.el('button', {type: 'button', class: 'small', onclick: () => T.emit('toggleModule', m)}, 'collapse / expand')]),
      T.el('ul', {class: 'units'}, members.map((c) => {
        const lab = D.labels.byUnit.get(c);
        return T.el('li', {}, [c === unit ? T.el('b', {}, c) : link(c), lab ? ': ' + T.clip(lab.text, 80) : '']);
      }))]);
  }

  function diffBlock(unit, channel) {
    if (D.kind !== 'diff' || !D.diff) return null;
    const sides = D.diff.channels.get(channel) || [];
    const a = D.labels.byUnit.get(unit);
    const b = D.labelsB.byUnit.get(unit);
    const routes = [...D.diff.routes.values()].filter((r) => r.writer === channel || T.channelOf(r.port) === channel || r.port === channel)
      .sort((x, y) => Math.abs(y.share_b - y.share_a) - Math.abs(x.share_b - x.share_a)).slice(0, 8);
    return T.el('div', {id: 'panel-diff'}, [
      sides.length ? T.el('table', {class: 'compact'}, [
        T.el('thead', {}, T.el('tr', {}, ['side', 'energy moved', 'largest angle', 'rank', 'z'].map((h) => T.el('th', {}, h)))),
        T.el('tbody', {}, sides.map((c) => T.el('tr', {}, [T.el('td', {}, c.side), T.el('td', {class: 'num'}, T.num(c.energy_moved)),
          T.el('td', {class: 'num'}, c.max_angle === null ? '–' : T.num(c.max_angle, 3) + '°'),
          T.el('td', {class: 'num'}, `${c.rank_a}→${c.rank_b}`), T.el('td', {class: 'num'}, T.num(c.z, 2))])))]) : null,
      routes.length ? T.el('table', {class: 'compact'}, [
        T.el('thead', {}, T.el('tr', {}, ['route', 'share a → b', 'z'].map((h) => T.el('th', {}, h)))),
        T.el('tbody', {}, routes.map((r) => T.el('tr', {}, [T.el('td', {}, `${r.writer} → ${r.port}`),
          T.el('td', {class: 'num'}, `${T.num(r.share_a)} → ${T.num(r.share_b)}`), T.el('td', {class: 'num'}, T.num(r.z, 2))])))]) : null,
      (a || b) ? T.el('p', {}, ['label: ', T.el('i', {}, a ? a.text : '–'), ' → ', T.el('i', {}, b ? b.text : '–')]) : null]);
  }

  panel.show = function (unit) {
    T.clear(root);
    root.hidden = false;
    const channel = T.channelOf(unit);
    const node = D.graph && D.graph.nodes.get(unit);
    const lab = D.labels.byUnit.get(unit);
    const kind = (node && node.kind) || (lab && (lab.kind || (lab.unit && lab.unit.kind))) || (unit.startsWith('module:') ? 'module' : 'unit');
    const ev = lab && lab.evidence;
    const parts = [
      T.el('div', {class: 'panel-head'}, [
        T.el('h2', {id: 'panel-title'}, unit.startsWith('module:') ? 'M' + unit.slice(7) : unit),
        T.el('span', {class: 'kind'}, kind),
        T.el('button', {type: 'button', class: 'close', 'aria-label': 'close the panel', onclick: () => T.select(null)}, '×')]),
      channel && channel !== unit ? T.el('p', {}, ['in channel ', link(channel)]) : null,
      section(D.kind === 'diff' ? 'label (a)' : 'label', labelBlock(unit), 'panel-label-section'),
      section('what changed', diffBlock(unit, channel || unit)),
      section('contexts', contextsBlock(unit)),
      section('what it reads and writes', tokensBlock(ev)),
      node ? section('routes', routesBlock(unit)) : section('inputs and outputs', evidenceRoutes(ev)),
      node ? section('circuits', circuitsBlock(unit)) : null,
      section(channel && channel !== unit ? `feature circuits (of ${channel})` : 'feature circuits', T.featuresBlock(D, channel || unit), 'panel-features-section'),
      section('polysemanticity', polyBlock(unit, channel)),
      section('labelled parts', channel === unit ? subunitsBlock(channel, unit) : null),
      section('module', moduleBlock(unit, channel))];
    T.append(root, parts);
    root.scrollTop = 0;
  };

  panel.hide = function () { T.clear(root); root.hidden = true; };
  return panel;
};
