// The report's data: the JSON files of the report directory, embedded in the page at render time
// (the files stay the source of truth), indexed for the views. A missing or corrupt file is
// listed in `D.problems` by name and the views that need it say so; nothing here throws for it.
'use strict';

T.routeId = function (writer, port) { return writer + ' → ' + port; };

T.loadData = function () {
  const node = document.getElementById('tlm-data');
  if (!node) throw new Error('this page has no embedded report data (no #tlm-data element)');
  let page;
  try {
    page = JSON.parse(node.textContent);
  } catch (e) {
    throw new Error('the report data embedded in this page is not valid JSON (' + e.message + '); ' +
                    'render the page again from its directory: python -m tl_modular.report DIR');
  }
  const D = {kind: page.kind || 'report', files: page.files || {}, problems: (page.problems || []).slice(),
             title: page.title || 'tl_modular report', figures: page.figures || [], meta: page.meta || {}};
  const file = (name) => D.files[name] || null;
  const prefix = D.kind === 'diff' ? 'a/' : '';
  D.summary = file(prefix + 'summary.json');
  D.graph = T.indexGraph(file(prefix + 'graph.json'), D.problems, prefix + 'graph.json');
  D.modulesFile = file(prefix + 'modules.json') || (D.summary && D.summary.modules) || null;
  D.modules = T.indexModules(D.modulesFile, D.graph);
  D.labels = T.indexLabels(file(prefix + 'labels.json'), D.summary);
  D.poly = T.indexPoly(file(prefix + 'polysemanticity.json') || (D.summary && D.summary.polysemanticity));
  D.circuits = T.indexCircuits(file(prefix + 'circuits.json'), D.graph, D.problems);
  D.attribution = D.kind === 'diff' ? null : T.indexAttribution(file('attribution.json'), D.summary, D.problems);
  D.rankFidelity = file(prefix + 'rank_fidelity.json') || (D.summary && D.summary.rank_fidelity) || null;
  D.compression = file(prefix + 'compression/compression.json');
  if (D.kind === 'diff') {
    D.diff = T.indexDiff(file('diff.json'), D.problems);
    D.graphB = T.indexGraph(file('b/graph.json'), [], 'b/graph.json');
    D.summaryB = file('b/summary.json');
    D.labelsB = T.indexLabels(null, D.summaryB);
  }
  return D;
};

T.indexGraph = function (g, problems, name) {
  if (!g) return null;
  if (!Array.isArray(g.nodes) || !Array.isArray(g.edges)) {
    problems.push({file: name, problem: 'has no "nodes" and "edges" lists: not a graph.json written by ChannelGraph.save'});
    return null;
  }
  const nodes = new Map();
  for (const n of g.nodes) if (n && typeof n.id === 'string') nodes.set(n.id, n);
  const channelOfPort = (p) => { const n = nodes.get(p); return n && n.kind === 'port' ? (n.channel || T.channelOf(p)) : p; };
  const routes = [];
  const routeById = new Map();
  for (const e of g.edges) {
    if (!e || e.kind !== 'route' || !nodes.has(e.source) || !nodes.has(e.target)) continue;
    const r = {id: T.routeId(e.source, e.target), writer: e.source, port: e.target, reader: channelOfPort(e.target),
               path: (nodes.get(e.target) || {}).path || null, static: e.static, data: e.data, share: e.share,
               attribution: e.attribution};
    routes.push(r);
    routeById.set(r.id, r);
  }
  const channels = [...nodes.values()].filter((n) => n.kind !== 'port')
    .sort((a, b) => T.order(a) - T.order(b) || (a.head || 0) - (b.head || 0) || (a.id < b.id ? -1 : 1)).map((n) => n.id);
  const ports = new Map();
  for (const n of nodes.values()) {
    if (n.kind !== 'port') continue;
    const c = n.channel || T.channelOf(n.id);
    if (!ports.has(c)) ports.set(c, []);
    ports.get(c).push(n.id);
  }
  const config = g.config || {};
  const weights = ['data', 'static'].filter((w) => routes.some((r) => typeof r[w] === 'number'));
  return {raw: g, nodes, routes, routeById, channels, ports, config, weights,
          weight: weights.includes(config.weight) ? config.weight : (weights[0] || 'static')};
};

// Stream order; the unembedding (order Infinity in graph.json, null once embedded) comes last.
T.order = function (n) {
  if (n.kind === 'sink' || n.id === 'unembed') return 1e9;
  return typeof n.order === 'number' ? n.order : (n.layer !== undefined ? n.layer : 0);
};

T.indexModules = function (m, graph) {
  const list = m && Array.isArray(m.modules) ? m.modules.filter(Array.isArray) : [];
  const of = new Map();
  list.forEach((mod, i) => mod.forEach((c) => of.set(c, i)));
  return {list, of, modularity: (m && m.modularity) || {}, raw: m};
};

T.indexLabels = function (labelsFile, summary) {
  const out = new Map();
  const rows = (labelsFile && labelsFile.labels) || (summary && summary.labels && summary.labels.labels) || [];
  for (const r of rows) {
    const unit = r.unit && typeof r.unit === 'object' ? r.unit.name : r.unit;
    if (typeof unit === 'string') out.set(unit, r);
  }
  const meta = labelsFile || (summary && summary.labels) || {};
  return {byUnit: out, baseline: meta.baseline || null, usage: meta.usage || null, stopped: meta.stopped || null,
          hasEvidence: Boolean(labelsFile)};
};

T.indexPoly = function (p) {
  const rows = p && Array.isArray(p.rows) ? p.rows : [];
  const byUnit = new Map();
  const byChannel = new Map();
  for (const r of rows) {
    byUnit.set(r.unit, r);
    const c = T.channelOf(r.unit);
    if (!byChannel.has(c)) byChannel.set(c, []);
    byChannel.get(c).push(r);
  }
  return {rows, byUnit, byChannel, nTokens: p ? p.n_tokens : null};
};

T.indexCircuits = function (c, graph, problems) {
  if (!c) return null;
  const list = Array.isArray(c.circuits) ? c.circuits : [];
  if (!list.length) return {categories: [], n_routes: c.n_routes};
  const categories = list.map((x, i) => {
    const routes = new Set((x.routes || []).map((r) => T.routeId(r[0], r[1])));
    const unknown = graph ? [...routes].filter((r) => !graph.routeById.has(r)) : [];
    if (unknown.length) problems.push({file: 'circuits.json', problem: `category ${x.category}: ${unknown.length} routes not in graph.json (${unknown.slice(0, 3).join(', ')})`});
    return {name: String(x.category), index: i, color: T.CATEGORY_COLORS[i % T.CATEGORY_COLORS.length], routes,
            order: (x.routes || []).map((r) => T.routeId(r[0], r[1])), curve: x.curve || [],
            faithfulness: x.faithfulness, interval: x.faithfulness_interval, completeness: x.completeness,
            completenessInterval: x.completeness_interval, random: x.random_faithfulness || [], target: x.target,
            nExamples: x.n_examples, search: x.search};
  });
  return {categories, n_routes: c.n_routes, byName: new Map(categories.map((x) => [x.name, x]))};
};

// Which categories' circuits hold a route (a list of names, empty when none).
T.routeCategories = function (D, routeId) {
  if (!D.circuits) return [];
  return D.circuits.categories.filter((c) => c.routes.has(routeId)).map((c) => c.name);
};

T.indexDiff = function (d, problems) {
  if (!d) return null;
  if (!Array.isArray(d.routes) || !Array.isArray(d.channels)) {
    problems.push({file: 'diff.json', problem: 'has no "routes" and "channels" lists: not written by ModelDiff.save'});
    return null;
  }
  const routes = new Map();
  for (const r of d.routes) routes.set(T.routeId(r.writer, r.port), r);
  const channels = new Map();
  for (const c of d.channels) {
    if (!channels.has(c.channel)) channels.set(c.channel, []);
    channels.get(c.channel).push(c);
  }
  const score = (c) => (c.z !== null && c.z !== undefined ? Math.abs(c.z) : (c.energy_moved !== null && c.energy_moved !== undefined ? c.energy_moved : c.spectrum_change || 0));
  const channelScore = new Map([...channels].map(([k, v]) => [k, Math.max(...v.map(score))]));
  return {raw: d, routes, channels, channelScore, meta: d.meta || {}, modules: d.modules, circuits: d.circuits || {},
          labels: d.labels || [], hasNull: Boolean((d.meta || {}).n_null)};
};

// Routes into and out of a channel, strongest first, under weight `w`.
T.routesOf = function (D, channel, w) {
  if (!D.graph) return {incoming: [], outgoing: []};
  const s = (r) => Math.abs(r[w] || 0);
  const incoming = D.graph.routes.filter((r) => r.reader === channel).sort((a, b) => s(b) - s(a));
  const outgoing = D.graph.routes.filter((r) => r.writer === channel).sort((a, b) => s(b) - s(a));
  return {incoming, outgoing};
};

// Labelled units, for search: [{unit, text, kind, score}] (the module labels included).
T.searchIndex = function (D) {
  const out = [];
  for (const [unit, r] of D.labels.byUnit) {
    out.push({unit, kind: r.kind || (r.unit && r.unit.kind) || '', text: r.text || '', score: r.score,
              hay: (unit + ' ' + (r.text || '') + ' ' + (r.negative_text || '')).toLowerCase()});
  }
  return out;
};
