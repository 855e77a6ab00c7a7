// The feature circuits: per category, the features (write directions of the compression) that
// carry the logit's influence over a few prompts, drawn by the stream point where they write
// (layer by layer, attention then MLP) with their strongest edges, and set beside the category's
// route circuit (edges, faithfulness). Data: attribution.json (the report's stage) and
// summary.json's comparison; the full sets stay in attribution_set.json beside the page.
'use strict';

T.indexAttribution = function (a, summary, problems) {
  const s = (summary && summary.attribution) || null;
  if (!a) return s && s.skipped ? {skipped: s.skipped, categories: [], settings: s.settings || {}} : null;
  if (!a.categories || typeof a.categories !== 'object') {
    problems.push({file: 'attribution.json', problem: 'has no "categories": not written by the report\'s feature-circuit stage'});
    return null;
  }
  const compare = (s && s.categories) || {};
  const categories = Object.entries(a.categories).map(([name, c], i) => ({
    name, index: i, color: T.CATEGORY_COLORS[i % T.CATEGORY_COLORS.length], skipped: c.skipped || null,
    faithfulness: c.faithfulness, random: c.random || [], completeness: c.completeness, nPrompts: c.n_prompts,
    edges: c.edges || [], edgesKept: c.edges_kept || [], circuit: c.circuit || {}, nStreams: c.n_streams || 0,
    features: (c.features || []).map((f) => ({name: f[0], share: f[1], frequency: f[2], channel: f[3], stream: f[4]})),
    topEdges: (c.top_edges || []).map((e) => ({source: e[0], target: e[1], weight: e[2], frequency: e[3]})),
    routes: (compare[name] || {}).routes || null}));
  const byChannel = new Map();
  for (const c of categories) {
    for (const f of c.features) {
      if (!byChannel.has(f.channel)) byChannel.set(f.channel, []);
      byChannel.get(f.channel).push({category: c.name, feature: f});
    }
  }
  return {skipped: a.skipped || null, settings: a.settings || {}, categories, byChannel,
          byName: new Map(categories.map((c) => [c.name, c]))};
};

// Column caption of a stream point: 0 the embeddings, 2l+1 layer l's attention, 2l+2 its MLP, the last the logit.
T.streamName = function (stream, nStreams) {
  if (stream === 0) return 'embed';
  if (stream >= nStreams - 1) return 'logit';
  return `L${Math.floor((stream - 1) / 2)} ${stream % 2 ? 'attn' : 'MLP'}`;
};

T.featureGraph = function (c) {
  const G = {colW: 120, rowH: 22, margin: 40, top: 30};
  const streams = [...new Set(c.features.map((f) => f.stream))].sort((a, b) => a - b);
  const logitStream = Math.max(c.nStreams - 1, ...streams.map((s) => s + 1));
  const cols = [...streams, logitStream];
  const colOf = new Map(cols.map((s, i) => [s, i]));
  const byCol = new Map(cols.map((s) => [s, []]));
  for (const f of c.features) byCol.get(f.stream).push(f);
  const tallest = Math.max(1, ...[...byCol.values()].map((fs) => fs.length));
  const pos = new Map();
  for (const [s, fs] of byCol) {
    fs.sort((a, b) => b.share - a.share);
    const offset = (tallest - fs.length) * G.rowH / 2;
    fs.forEach((f, i) => pos.set(f.name, {x: G.margin + colOf.get(s) * G.colW, y: G.top + G.margin + offset + i * G.rowH}));
  }
  pos.set('logit', {x: G.margin + colOf.get(logitStream) * G.colW, y: G.top + G.margin + (tallest - 1) * G.rowH / 2});
  const width = 2 * G.margin + (cols.length - 1) * G.colW + 60;
  const height = G.top + 2 * G.margin + tallest * G.rowH;
  const svg = T.svg('svg', {class: 'feature-graph', id: 'feature-graph', role: 'img', viewBox: `0 0 ${width} ${height}`,
                            width, height, 'aria-label': `feature circuit of ${c.name}`, dataset: {category: c.name}});
  const captions = T.svg('g', {class: 'captions'});
  cols.forEach((s, i) => captions.appendChild(T.svg('text', {x: G.margin + i * G.colW, y: 18, 'text-anchor': 'middle'}, T.streamName(s, logitStream + 1))));
  svg.appendChild(captions);
  const edges = c.topEdges.filter((e) => pos.has(e.source) && pos.has(e.target));
  const maxW = Math.max(1e-12, ...edges.map((e) => Math.abs(e.weight)));
  const eg = T.svg('g', {class: 'edges'});
  for (const e of edges.slice().reverse()) {          // strongest drawn last, on top
    const a = pos.get(e.source);
    const b = pos.get(e.target);
    const dx = Math.max(30, (b.x - a.x) / 2);
    const path = T.svg('path', {class: 'fedge', d: `M${a.x},${a.y} C${a.x + dx},${a.y} ${b.x - dx},${b.y} ${b.x},${b.y}`,
                                'stroke-width': (0.4 + 5 * Math.abs(e.weight) / maxW).toFixed(2),
                                stroke: e.weight >= 0 ? '#2e9d4a' : '#d0453b', dataset: {source: e.source, target: e.target}},
      T.svg('title', {}, `${e.source} → ${e.target}: ${T.num(e.weight)} (in ${T.pct(e.frequency)} of the prompts)`));
    eg.appendChild(path);
  }
  svg.appendChild(eg);
  const maxShare = Math.max(1e-12, ...c.features.map((f) => f.share));
  const ng = T.svg('g', {class: 'fnodes'});
  for (const f of c.features) {
    const p = pos.get(f.name);
    const selected = T.state.selected && (T.state.selected === f.channel || T.channelOf(T.state.selected) === f.channel);
    ng.appendChild(T.svg('g', {class: 'fnode' + (selected ? ' selected' : ''), dataset: {feature: f.name, channel: f.channel},
                               onclick: () => T.select(f.channel)}, [
      T.svg('circle', {cx: p.x, cy: p.y, r: (3 + 6 * Math.sqrt(f.share / maxShare)).toFixed(2), fill: T.color(T.D.modules.of.get(f.channel))}),
      T.svg('text', {x: p.x + 10, y: p.y + 4}, f.name.replace(/^L\d+\./, '').replace(':write', '')),
      T.svg('title', {}, `${f.name}: share ${T.num(f.share)} of the logit's influence, kept in ${T.pct(f.frequency)} of the prompts`)]));
  }
  const lp = pos.get('logit');
  ng.appendChild(T.svg('g', {class: 'fnode logit'}, [T.svg('rect', {x: lp.x - 8, y: lp.y - 8, width: 16, height: 16}),
    T.svg('text', {x: lp.x + 12, y: lp.y + 4}, 'logit')]));
  svg.appendChild(ng);
  svg.dataset.edges = String(edges.length);
  svg.dataset.nodes = String(c.features.length);
  return svg;
};

T.count = function (x) { return x === null || x === undefined ? '–' : Math.round(x).toLocaleString('en'); };

T.FeaturesView = function (D, root) {
  const view = {};
  const A = D.attribution;
  if (!A) { root.appendChild(T.missing(D, 'feature circuits', ['attribution.json'])); view.draw = () => {}; return view; }
  if (A.skipped) {
    root.appendChild(T.el('p', {class: 'missing', id: 'features-skipped'}, `No feature circuits: ${A.skipped}.`));
    view.draw = () => {};
    return view;
  }
  const C = A.categories;
  const shown = C.filter((c) => !c.skipped);
  let current = shown.length ? shown[0].name : null;
  const mean = (xs) => xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : null;
  const st = A.settings;
  const pr = st.prune || {};
  const intro = T.el('p', {}, `Per category, attribution graphs of ${st.n_attribution || '?'} prompts over the compression's write directions, ` +
    `pruned to the features holding ${T.pct(pr.node_threshold)} of the logit's influence and the edges holding ${T.pct(pr.edge_threshold)}; ` +
    `a feature is in the category's circuit when at least ${T.pct(st.min_frequency)} of its prompts keep it. Faithfulness keeps only the kept ` +
    `features (the others at their ${st.baseline || 'baseline'}-run value, as the route circuits patch routes); random feature sets of the same size are the control.`);
  const rows = C.map((c) => ({dataset: {category: c.name}, cells: c.skipped ? [c.name, T.el('span', {class: 'muted'}, c.skipped), '', '', '', '', '', ''] : [
    c.name, String(c.circuit.features ?? '–'), String(c.circuit.edges ?? '–'),
    `${T.count(mean(c.edgesKept))} of ${T.count(mean(c.edges))} (${T.pct(mean(c.edgesKept) / Math.max(1, mean(c.edges)))})`,
    T.interval(c.faithfulness), T.interval(mean(c.random)),
    c.routes ? `${c.routes.size} of ${c.routes.of ?? '?'}` : '–', c.routes ? T.interval(c.routes.faithfulness) : '–']}));
  const table = T.table(['category', 'features', 'feature edges', 'edges kept per prompt', 'faithfulness', 'random sets', 'routes', 'route faithfulness'],
                        rows, {numeric: [1, 2, 4, 5, 7], id: 'features-table'});
  const picker = T.el('div', {class: 'tabs small', role: 'tablist', id: 'feature-categories', 'aria-label': 'feature circuit shown'});
  const body = T.el('div', {id: 'feature-circuit'});
  T.append(root, [intro, table, T.el('h3', {}, 'Feature circuit'), picker, body]);
  view.draw = function () {
    T.clear(picker);
    for (const c of shown) {
      picker.appendChild(T.el('button', {type: 'button', role: 'tab', 'aria-selected': c.name === current ? 'true' : 'false', dataset: {category: c.name},
                                         onclick: () => { current = c.name; view.draw(); }}, c.name));
    }
    T.clear(body);
    const c = A.byName.get(current);
    if (!c) { body.appendChild(T.el('p', {class: 'muted'}, 'No category has a feature circuit.')); return; }
    const chans = new Set(c.features.map((f) => f.channel));
    const route = D.circuits && D.circuits.byName.get(c.name);
    const routeChans = route ? new Set([...route.routes].flatMap((r) => { const [w, p] = r.split(' → '); return [w, T.channelOf(p) || p]; })) : null;
    T.append(body, [
      T.el('p', {}, `${c.name}: ${c.features.length} features in ${chans.size} channels, the ${c.topEdges.length} strongest of ${c.circuit.edges} edges drawn ` +
        `(green excites, red inhibits; width |weight|, summed over positions and averaged over prompts); node size: share of the logit's influence. ` +
        `Error share ${T.num(c.circuit.error_share, 2)} (what the compression's directions do not explain); completeness ${T.num(c.completeness, 2)} at most.`),
      T.el('div', {class: 'feature-stage'}, T.featureGraph(c)),
      routeChans ? T.el('p', {id: 'feature-vs-routes'}, [
        `Route circuit: ${route.routes.size} routes, faithfulness ${T.interval(route.faithfulness)}; its channels: ${[...routeChans].filter((x) => x !== 'embed' && x !== 'unembed').sort().join(', ')}. `,
        `Channels with features only: ${[...chans].filter((x) => !routeChans.has(x)).sort().join(', ') || 'none'}; `,
        `in the route circuit only: ${[...routeChans].filter((x) => !chans.has(x) && x !== 'embed' && x !== 'unembed' && T.channelOf(x)).sort().join(', ') || 'none'}.`]) : null]);
  };
  T.on('select', () => { if (!root.hidden) view.draw(); });
  view.draw();
  return view;
};

// The panel's section of a channel: its features in each category's feature circuit.
T.featuresBlock = function (D, channel) {
  const A = D.attribution;
  const rows = A && A.byChannel && A.byChannel.get(channel);
  if (!rows || !rows.length) return null;
  return T.el('ul', {class: 'units', id: 'panel-features'}, rows.slice(0, 24).map((r) => T.el('li', {dataset: {category: r.category}}, [
    T.el('b', {}, r.category), `: ${r.feature.name} (share ${T.num(r.feature.share, 2)}, in ${T.pct(r.feature.frequency)} of the prompts)`])));
};
