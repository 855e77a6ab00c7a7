// The graph view: channels on the layer layout (stream order left to right), coloured by module;
// routes as curves whose width is their strength, into the head's q/k/v port. Zoom with the wheel
// or the buttons, pan by dragging; hover a route for its numbers; click a channel for the panel;
// click a module chip to collapse the module into one node (and again to expand it). Circuit
// categories toggled on highlight their routes: shared by every toggled category, or specific.
'use strict';

T.GEOM = {colW: 160, rowH: 58, nodeW: 68, nodeH: 30, margin: 50};

T.layout = function (graph) {
  const cols = new Map();
  for (const id of graph.channels) {
    const n = graph.nodes.get(id);
    const key = T.order(n);
    if (!cols.has(key)) cols.set(key, []);
    cols.get(key).push(id);
  }
  const keys = [...cols.keys()].sort((a, b) => a - b);
  const tallest = Math.max(...keys.map((k) => cols.get(k).length), 1);
  const pos = new Map();
  const G = T.GEOM;
  keys.forEach((k, ci) => {
    const ids = cols.get(k);
    const offset = (tallest - ids.length) * G.rowH / 2;
    ids.forEach((id, i) => pos.set(id, {x: G.margin + ci * G.colW, y: G.margin + offset + i * G.rowH, col: ci, row: i}));
  });
  return {pos, width: 2 * G.margin + (keys.length - 1) * G.colW + G.nodeW, height: 2 * G.margin + tallest * G.rowH,
          columns: keys.map((k) => cols.get(k))};
};

T.GraphView = function (D, root) {
  const S = T.state;
  const graph = D.graph;
  const view = {root, zoom: {k: 1, x: 0, y: 0}};
  const layout = T.layout(graph);
  const G = T.GEOM;
  const diff = D.kind === 'diff' ? D.diff : null;

  const toolbar = T.el('div', {class: 'toolbar', role: 'toolbar', 'aria-label': 'graph controls'});
  const chips = T.el('div', {class: 'chips', id: 'module-chips'});
  const svg = T.svg('svg', {id: 'graph-svg', class: 'graph', role: 'img', 'aria-label': 'channel graph'});
  const port = T.svg('g', {class: 'viewport'});
  svg.appendChild(port);
  const tip = T.el('div', {class: 'tooltip', id: 'route-tooltip', role: 'tooltip', hidden: true});
  const stage = T.el('div', {class: 'stage'}, [svg, tip]);
  T.append(root, [toolbar, chips, stage]);

  // --- toolbar ------------------------------------------------------------------------------
  if (graph.weights.length > 1) {
    const sel = T.el('select', {id: 'weight-select', 'aria-label': 'route strength',
                                onchange: (e) => { S.weight = e.target.value; T.emit('change'); }},
      graph.weights.map((w) => T.el('option', {value: w, selected: w === S.weight}, w + ' strength')));
    toolbar.appendChild(T.el('label', {}, ['routes by ', sel]));
  }
  const nRoutes = graph.routes.length;
  const tops = [50, 100, 200, 400, 1000, 3000].filter((n) => n < nRoutes).concat([nRoutes]);
  const topSel = T.el('select', {id: 'top-select', 'aria-label': 'routes shown',
                                 onchange: (e) => { S.topN = Number(e.target.value); draw(); }},
    tops.map((n) => T.el('option', {value: n, selected: n === S.topN}, n === nRoutes ? `all ${n} routes` : `top ${n} routes`)));
  toolbar.appendChild(topSel);
  const zoomBtn = (text, label, f) => T.el('button', {type: 'button', class: 'small', 'aria-label': label, onclick: f}, text);
  toolbar.appendChild(T.el('span', {class: 'group'}, [
    zoomBtn('+', 'zoom in', () => zoomBy(1.25)), zoomBtn('−', 'zoom out', () => zoomBy(0.8)),
    zoomBtn('fit', 'fit the graph', () => fit())]));
  if (D.circuits && D.circuits.categories.length && !diff) toolbar.appendChild(T.categoryToggles(D, 'graph'));
  toolbar.appendChild(T.el('span', {class: 'muted keys'}, 'keys: / search · 1–5 views · Tab/arrows move · Enter select · c collapse · Esc close'));
  if (diff) {
    toolbar.appendChild(T.el('span', {class: 'legend'}, [
      T.el('span', {class: 'swatch', dataset: {c: 'up'}}), ' share up  ',
      T.el('span', {class: 'swatch', dataset: {c: 'down'}}), ' share down  (width: |change|' +
      (diff.hasNull ? ', ranked by |z| against the null models)' : ')')]));
  }

  // --- drawing ------------------------------------------------------------------------------
  function displayOf(channel) {
    const m = D.modules.of.get(channel);
    return m !== undefined && S.collapsed.has(m) ? 'module:' + m : channel;
  }
  function anchor(id, side, path) {
    if (id.startsWith('module:')) {
      const p = modulePos(Number(id.slice(7)));
      return {x: side === 'out' ? p.x + G.nodeW : p.x, y: p.y + G.nodeH / 2};
    }
    const p = layout.pos.get(id);
    if (!p) return null;
    if (side === 'out') return {x: p.x + G.nodeW, y: p.y + G.nodeH / 2};
    const dy = {q: -9, k: 0, v: 9}[path] || 0;
    return {x: p.x, y: p.y + G.nodeH / 2 + dy};
  }
  function modulePos(m) {
    const ps = D.modules.list[m].map((c) => layout.pos.get(c)).filter(Boolean);
    if (!ps.length) return {x: G.margin, y: G.margin};
    return {x: ps.reduce((s, p) => s + p.x, 0) / ps.length, y: ps.reduce((s, p) => s + p.y, 0) / ps.length};
  }
  function strength(r) {
    if (diff) {
      const ch = diff.routes.get(r.id);
      if (!ch) return 0;
      return diff.hasNull && ch.z !== null && ch.z !== undefined ? Math.abs(ch.z) : Math.abs(ch.share_b - ch.share_a);
    }
    const v = r[S.weight];
    return typeof v === 'number' ? Math.abs(v) : 0;
  }

  function draw() {
    T.clear(port);
    const shown = graph.routes.slice().sort((a, b) => strength(b) - strength(a)).slice(0, S.topN);
    // aggregate routes whose ends sit in a collapsed module
    const edges = new Map();
    for (const r of shown) {
      const w = displayOf(r.writer);
      const rd = displayOf(r.reader);
      if (w === rd) continue;   // inside a collapsed module
      const key = rd.startsWith('module:') ? w + '|' + rd : w + '|' + r.port;
      if (!edges.has(key)) edges.set(key, {w, rd, path: rd.startsWith('module:') ? null : r.path, routes: []});
      edges.get(key).routes.push(r);
    }
    const maxS = Math.max(1e-12, ...[...edges.values()].map((e) => e.routes.reduce((s, r) => s + strength(r), 0)));
    const cats = D.circuits ? D.circuits.categories.filter((c) => S.categories.has(c.name)) : [];
    let highlighted = 0;
    let shared = 0;
    const eg = T.svg('g', {class: 'edges'});
    for (const e of edges.values()) {
      const a = anchor(e.w, 'out');
      const b = anchor(e.rd, 'in', e.path);
      if (!a || !b) continue;
      const s = e.routes.reduce((t, r) => t + strength(r), 0);
      const width = 0.6 + 7 * Math.sqrt(s / maxS);
      const dx = Math.max(40, (b.x - a.x) / 2);
      const d = `M${a.x},${a.y} C${a.x + dx},${a.y} ${b.x - dx},${b.y} ${b.x},${b.y}`;
      let color = T.color(D.modules.of.get(e.w));
      let cls = 'route';
      if (diff) {
        const ch = diff.routes.get(e.routes[0].id);
        const delta = ch ? ch.share_b - ch.share_a : 0;
        color = delta >= 0 ? 'var(--up)' : 'var(--down)';
      } else if (cats.length) {
        const ins = cats.filter((c) => e.routes.some((r) => c.routes.has(r.id)));
        if (!ins.length) cls += ' faded';
        else if (ins.length === cats.length && cats.length > 1) { cls += ' shared'; color = 'var(--shared)'; shared += 1; }
        else if (ins.length === 1) { cls += ' specific'; color = ins[0].color; }
        else { cls += ' partly'; color = 'var(--partly)'; }
        if (ins.length) highlighted += 1;
      }
      const ids = e.routes.map((r) => r.id);
      const sel = S.selected && (e.w === S.selected || e.rd === S.selected || e.routes.some((r) => r.reader === S.selected));
      const path = T.svg('path', {d, class: cls + (sel ? ' incident' : ''), 'stroke-width': width.toFixed(2),
                                  dataset: {routes: ids.join('\n')}});
      path.style.stroke = color;   // CSSOM, so var(--shared) resolves
      const hit = T.svg('path', {d, class: 'hit', 'stroke-width': Math.max(9, width).toFixed(1), dataset: {routes: ids.join('\n')},
                                 onmousemove: (ev) => showTip(ev, e), onmouseleave: hideTip});
      eg.append(path, hit);
    }
    port.appendChild(eg);
    svg.dataset.highlighted = String(highlighted);
    svg.dataset.shared = String(shared);
    svg.dataset.edges = String(edges.size);
    drawNodes();
    drawChips();
    applyZoom();
  }

  function nodeLabel(id) {
    const lab = D.labels.byUnit.get(id);
    return id + (lab && lab.text ? ': ' + lab.text : '');
  }

  function drawNodes() {
    const ng = T.svg('g', {class: 'nodes'});
    const drawn = new Set();
    const selected = S.selected ? (T.channelOf(S.selected) || S.selected) : null;   // a neuron marks its channel
    for (const id of graph.channels) {
      const shown = displayOf(id);
      if (drawn.has(shown)) continue;
      drawn.add(shown);
      if (shown.startsWith('module:')) { ng.appendChild(moduleNode(Number(shown.slice(7)))); continue; }
      const p = layout.pos.get(id);
      const n = graph.nodes.get(id);
      const m = D.modules.of.get(id);
      let ring = null;
      if (diff && diff.channelScore.has(id)) {
        const top = Math.max(1e-12, ...diff.channelScore.values());
        ring = 1 + 5 * diff.channelScore.get(id) / top;
      }
      const g = T.svg('g', {class: 'node' + (selected === id ? ' selected' : '') + (ring ? ' changed' : ''),
                            transform: `translate(${p.x},${p.y})`, tabindex: 0, role: 'button',
                            'aria-label': nodeLabel(id), dataset: {id, kind: n.kind, module: m === undefined ? '' : m},
                            onclick: () => T.select(id), onkeydown: (ev) => nodeKey(ev, id)}, [
        T.svg('title', {}, nodeLabel(id)),
        T.svg('rect', {width: G.nodeW, height: G.nodeH, rx: 6, fill: T.color(m),
                       'stroke-width': ring ? ring.toFixed(1) : null}),
        T.svg('text', {x: G.nodeW / 2, y: G.nodeH / 2 + 4, 'text-anchor': 'middle'}, T.short(id))]);
      if (n.kind === 'head') {
        for (const [path, dy] of [['q', -9], ['k', 0], ['v', 9]]) {
          g.appendChild(T.svg('circle', {class: 'port', cx: 0, cy: G.nodeH / 2 + dy, r: 2.6}, T.svg('title', {}, id + ':' + path)));
        }
      }
      ng.appendChild(g);
    }
    // layer captions
    const cap = T.svg('g', {class: 'captions'});
    layout.columns.forEach((ids, ci) => {
      const n = graph.nodes.get(ids[0]);
      const text = n.kind === 'head' ? `layer ${n.layer} heads` : n.kind === 'mlp' ? `layer ${n.layer} MLP`
        : ({sink: 'output', embed: 'embeddings', pos_embed: 'embeddings', bias: 'biases'}[n.kind] || n.kind);
      cap.appendChild(T.svg('text', {x: G.margin + ci * G.colW + G.nodeW / 2, y: 22, 'text-anchor': 'middle'}, text));
    });
    port.append(cap, ng);
  }

  function moduleNode(m) {
    const p = modulePos(m);
    const id = 'module:' + m;
    const lab = D.labels.byUnit.get(id);
    return T.svg('g', {class: 'node module' + (S.selected === id ? ' selected' : ''), transform: `translate(${p.x},${p.y})`,
                       tabindex: 0, role: 'button', 'aria-label': `module M${m} (collapsed): ${lab ? lab.text : ''}`,
                       dataset: {id, module: m}, onclick: () => T.select(id), ondblclick: () => toggleModule(m),
                       onkeydown: (ev) => nodeKey(ev, id)}, [
      T.svg('title', {}, `M${m}: ${D.modules.list[m].join(', ')}` + (lab ? '\n' + lab.text : '')),
      T.svg('rect', {width: G.nodeW, height: G.nodeH, rx: 14, fill: T.color(m)}),
      T.svg('text', {x: G.nodeW / 2, y: G.nodeH / 2 + 4, 'text-anchor': 'middle'}, `M${m} (${D.modules.list[m].length})`)]);
  }

  function drawChips() {
    T.clear(chips);
    if (!D.modules.list.length) return;
    chips.appendChild(T.el('span', {class: 'muted'}, 'modules (click to collapse/expand):'));
    D.modules.list.forEach((mod, m) => {
      const lab = D.labels.byUnit.get('module:' + m);
      const on = S.collapsed.has(m);
      chips.appendChild(T.el('button', {type: 'button', class: 'chip' + (on ? ' collapsed' : ''), 'aria-pressed': on ? 'true' : 'false',
                                        dataset: {module: m}, title: mod.join(', '), onclick: () => toggleModule(m)}, [
        T.el('span', {class: 'dot', dataset: {m}}), `M${m} · ${mod.length}` + (lab && lab.text ? ' · ' + T.clip(lab.text, 48) : '')]));
    });
    for (const dot of chips.querySelectorAll('.dot')) dot.style.background = T.color(Number(dot.dataset.m));
  }

  function toggleModule(m) {
    if (S.collapsed.has(m)) S.collapsed.delete(m); else S.collapsed.add(m);
    draw();
  }
  view.toggleModule = toggleModule;

  // --- tooltip ------------------------------------------------------------------------------
  function showTip(ev, e) {
    T.clear(tip);
    if (e.routes.length === 1) {
      const r = e.routes[0];
      tip.appendChild(T.el('b', {}, r.id));
      tip.appendChild(T.routeFacts(D, r));
    } else {
      tip.appendChild(T.el('b', {}, `${e.w} → ${e.rd}: ${e.routes.length} routes`));
      const sum = (k) => e.routes.reduce((s, r) => s + (typeof r[k] === 'number' ? r[k] : 0), 0);
      tip.appendChild(T.el('div', {}, `static ${T.num(sum('static'))} · data ${T.num(sum('data'))} · attribution ${T.num(sum('attribution'))}`));
    }
    tip.hidden = false;
    const box = stage.getBoundingClientRect();
    tip.style.left = Math.min(ev.clientX - box.left + 14, box.width - 280) + 'px';
    tip.style.top = (ev.clientY - box.top + 14) + 'px';
  }
  function hideTip() { tip.hidden = true; }

  // --- zoom and pan -------------------------------------------------------------------------
  view.userZoomed = false;
  function applyZoom() { port.setAttribute('transform', `translate(${view.zoom.x},${view.zoom.y}) scale(${view.zoom.k})`); }
  function zoomBy(f, cx, cy) {
    const r = svg.getBoundingClientRect();
    const x = cx === undefined ? r.width / 2 : cx;
    const y = cy === undefined ? r.height / 2 : cy;
    const k = Math.min(8, Math.max(0.15, view.zoom.k * f));
    view.zoom.x = x - (x - view.zoom.x) * k / view.zoom.k;
    view.zoom.y = y - (y - view.zoom.y) * k / view.zoom.k;
    view.zoom.k = k;
    view.userZoomed = true;
    applyZoom();
  }
  function fit() {
    const r = svg.getBoundingClientRect();
    const k = Math.min(r.width / layout.width, r.height / layout.height, 2.5) || 1;
    view.zoom = {k, x: (r.width - layout.width * k) / 2, y: (r.height - layout.height * k) / 2};
    view.userZoomed = false;
    applyZoom();
  }
  view.fit = fit;
  // the panel opening or closing changes the graph's width: fit again unless the user zoomed
  if (window.ResizeObserver) new ResizeObserver(() => { if (!view.userZoomed && svg.getBoundingClientRect().width) fit(); }).observe(svg);
  svg.addEventListener('wheel', (ev) => {
    ev.preventDefault();
    const r = svg.getBoundingClientRect();
    zoomBy(Math.exp(-ev.deltaY * 0.0015), ev.clientX - r.left, ev.clientY - r.top);
  }, {passive: false});
  let drag = null;
  svg.addEventListener('mousedown', (ev) => {
    if (ev.target.closest('.node')) return;
    drag = {x: ev.clientX, y: ev.clientY, zx: view.zoom.x, zy: view.zoom.y};
    svg.classList.add('dragging');
  });
  window.addEventListener('mousemove', (ev) => {
    if (!drag) return;
    view.zoom.x = drag.zx + ev.clientX - drag.x;
    view.zoom.y = drag.zy + ev.clientY - drag.y;
    view.userZoomed = true;
    applyZoom();
  });
  window.addEventListener('mouseup', () => { drag = null; svg.classList.remove('dragging'); });

  // --- keyboard: arrows move between channels, Enter selects, c collapses the module ---------
  function nodeKey(ev, id) {
    if (ev.key === 'Enter' || ev.key === ' ') { ev.preventDefault(); T.select(id); return; }
    if (ev.key === 'c' && !id.startsWith('module:') && D.modules.of.has(id)) { toggleModule(D.modules.of.get(id)); focusNode(displayOf(id)); return; }
    if (ev.key === 'c' && id.startsWith('module:')) { toggleModule(Number(id.slice(7))); focusNode(D.modules.list[Number(id.slice(7))][0]); return; }
    const p = id.startsWith('module:') ? null : layout.pos.get(id);
    if (!p) return;
    let next = null;
    if (ev.key === 'ArrowDown' || ev.key === 'ArrowUp') {
      const col = layout.columns[p.col];
      next = col[p.row + (ev.key === 'ArrowDown' ? 1 : -1)];
    } else if (ev.key === 'ArrowRight' || ev.key === 'ArrowLeft') {
      const col = layout.columns[p.col + (ev.key === 'ArrowRight' ? 1 : -1)];
      if (col) next = col.reduce((best, c) => Math.abs(layout.pos.get(c).y - p.y) < Math.abs(layout.pos.get(best).y - p.y) ? c : best, col[0]);
    }
    if (next) { ev.preventDefault(); focusNode(displayOf(next)); }
  }
  function focusNode(id) {
    const n = port.querySelector(`.node[data-id="${CSS.escape(id)}"]`);
    if (n) n.focus();
  }
  view.focusNode = focusNode;

  view.draw = draw;
  draw();
  return view;
};

// One route's numbers (static/data strength, share, attribution, circuits) as a small block.
T.routeFacts = function (D, r) {
  const cats = T.routeCategories(D, r.id);
  return T.el('div', {class: 'facts'}, [
    T.el('div', {}, `static ${T.num(r.static)} · data ${T.num(r.data)} · share ${T.num(r.share, 2)}`),
    T.el('div', {}, `attribution ${T.num(r.attribution)} (first-order loss change if mean-ablated)`),
    cats.length ? T.el('div', {}, 'in the circuits of: ' + cats.join(', ')) : null]);
};

T.clip = function (s, n) { s = String(s || ''); return s.length > n ? s.slice(0, n - 1) + '…' : s; };

// A checkbox per circuit category; toggling one redraws every view (shared state).
T.categoryToggles = function (D, where) {
  const box = T.el('fieldset', {class: 'categories', id: where + '-categories'}, [T.el('legend', {}, 'circuits')]);
  for (const c of D.circuits.categories) {
    const input = T.el('input', {type: 'checkbox', checked: T.state.categories.has(c.name), dataset: {category: c.name},
                                 onchange: (e) => {
                                   if (e.target.checked) T.state.categories.add(c.name); else T.state.categories.delete(c.name);
                                   T.emit('change');
                                 }});
    const sw = T.el('span', {class: 'swatch'});
    sw.style.background = c.color;
    box.appendChild(T.el('label', {class: 'category'}, [input, sw, c.name]));
  }
  return box;
};
