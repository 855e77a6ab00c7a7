// The other views: overview (summary, modules, rank–fidelity, polysemanticity), circuits
// (toggles, faithfulness curves, overlap), units (every label, filtered by the search), and for
// a diff report the table of changes.
'use strict';

T.table = function (head, rows, opts) {
  const o = opts || {};
  return T.el('table', {class: o.cls || null, id: o.id || null}, [
    T.el('thead', {}, T.el('tr', {}, head.map((h, i) => T.el('th', {class: (o.numeric || []).includes(i) ? 'num' : null}, h)))),
    T.el('tbody', {}, rows.map((r) => T.el('tr', {dataset: r.dataset || null}, (r.cells || r).map((c, i) =>
      T.el('td', {class: (o.numeric || []).includes(i) ? 'num' : null}, c)))))]);
};

T.missing = function (D, what, files) {
  const probs = D.problems.filter((p) => files.includes(p.file));
  const why = probs.length ? probs.map((p) => `${p.file} ${p.problem}`).join('; ') : `${files.join(' / ')} not in the report directory`;
  return T.el('p', {class: 'missing'}, `No ${what}: ${why}.`);
};

T.OverviewView = function (D, root) {
  const s = D.summary || {};
  const link = (u, text) => T.el('a', {href: '#', class: 'unit-link', dataset: {unit: u}, onclick: (e) => { e.preventDefault(); T.select(u); }}, text || u);
  const mod = D.modules.modularity || {};
  const q = mod.Q || {};
  const comp = s.compression || {};
  const cards = [
    ['channels', s.channels ? s.channels.n : (D.graph ? D.graph.channels.length : '–')],
    ['dimensions kept', comp.dimensions !== undefined ? `${comp.dimensions} / ${comp.max_dimensions}` : '–'],
    ['modules', D.modules.list.length],
    ['modularity Q', q.value !== undefined ? `${T.num(q.value)} (z ${T.num(q.z, 2)}, p ${T.num(q.p, 2)})` : '–'],
    ...(D.modulesFile && D.modulesFile.given && (D.modulesFile.given.modularity || {}).Q
      ? [['given modules: Q z', `${T.num(D.modulesFile.given.modularity.Q.z, 2)} (p ${T.num(D.modulesFile.given.modularity.Q.p, 2)})`]] : []),
    ['tokens', s.n_tokens !== undefined ? s.n_tokens : '–']];
  const parts = [T.el('section', {id: 'summary'}, [
    T.el('h2', {}, 'Summary'),
    T.el('div', {class: 'cards'}, cards.map(([k, v]) => T.el('div', {class: 'card'}, [T.el('b', {}, String(v)), k]))),
    s.model_fingerprint ? T.el('p', {class: 'muted'}, ['model fingerprint ', T.el('code', {}, s.model_fingerprint),
      s.timings ? '; stage times: ' + Object.entries(s.timings).map(([k, v]) => `${k} ${Number(v).toFixed(1)} s`).join(' · ') : '']) : null])];

  // modules
  let modBody;
  if (!D.modulesFile) modBody = T.missing(D, 'modules', ['modules.json', 'summary.json']);
  else {
    const rows = D.modules.list.map((m, i) => {
      const lab = D.labels.byUnit.get('module:' + i);
      const sw = T.el('span', {class: 'swatch'});
      sw.style.background = T.color(i);
      return {cells: [T.el('span', {}, [sw, link('module:' + i, 'M' + i)]), String(m.length),
                      T.el('span', {}, m.flatMap((c, j) => [j ? ', ' : '', link(c)])), lab ? lab.text : '', lab ? T.interval(lab.score, lab.score_interval) : '–']};
    });
    const stats = Object.entries(mod).filter(([, v]) => v && typeof v === 'object' && 'value' in v)
      .map(([k, v]) => T.el('li', {}, `${k}: ${T.num(v.value)} vs null ${T.num(v.null_mean)} ± ${T.num(v.null_std)} (z ${T.num(v.z, 2)}, p ${T.num(v.p, 2)})`));
    const given = D.modulesFile.given;
    let givenBlock = null;
    if (given && Array.isArray(given.modules)) {
      const key = (mods) => mods.map((m) => m.slice().sort().join(',')).sort().join('|');
      const same = key(given.modules) === key(D.modules.list);
      const gq = (given.modularity || {}).Q || {};
      givenBlock = T.el('div', {id: 'given-modules'}, [
        T.el('h3', {}, 'A partition given with the model'),
        T.el('p', {}, `${given.source}: ` + given.modules.map((m) => '{' + m.join(', ') + '}').join(' ') +
          (same ? ' — the same modules the graph\'s own rule finds.' : ' — not the modules the graph\'s own rule finds.')),
        gq.value !== undefined ? T.el('p', {}, [T.el('b', {}, `Q ${T.num(gq.value)} vs null ${T.num(gq.null_mean)} ± ${T.num(gq.null_std)}: z ${T.num(gq.z, 2)}, p ${T.num(gq.p, 2)}`),
          ' — this partition scored as fixed on the graph and on every null graph (are routes concentrated inside these modules more than chance would put them?).']) : null]);
    }
    modBody = T.el('div', {}, [
      T.table(['module', 'size', 'channels', 'label', 'label score [95%]'], rows, {numeric: [1], id: 'modules-table'}),
      D.modules.list.length < 2 ? T.el('p', {}, 'One module: no cut of the Gomory–Hu tree leaves both sides large enough, so the channels form one strongly connected whole.') : null,
      stats.length ? T.el('ul', {}, stats) : null,
      mod.null ? T.el('p', {class: 'muted'}, `The graph's own modules against ${mod.n_null} null graphs (${mod.null === 'permute' ? 'route strengths permuted within layer pairs' : 'subspaces rotated at random'}), each finding its own modules by the same rule; p is one-sided.`) : null,
      givenBlock]);
  }
  parts.push(T.el('section', {id: 'modules'}, [T.el('h2', {}, 'Modules'), modBody]));

  // rank–fidelity
  const rf = D.rankFidelity;
  parts.push(T.el('section', {id: 'rank-fidelity'}, [T.el('h2', {}, 'Rank–fidelity'),
    rf && rf.length ? T.el('div', {class: 'row'}, [
      T.lineChart([{name: 'loss recovered', color: T.PALETTE[0], points: rf.map((r) => [r.dimensions, r.loss_recovered])},
                   {name: 'KL (nats)', color: T.PALETTE[1], points: rf.map((r) => [r.dimensions, r.kl])}],
                  {xlabel: `dimensions kept (of ${rf[0].max_dimensions})`, ylabel: 'fidelity', id: 'rank-fidelity-chart', width: 480, height: 260}),
      T.table(['dimensions', 'loss recovered', 'KL'], rf.map((r) => [String(r.dimensions), T.num(r.loss_recovered), T.num(r.kl)]), {numeric: [0, 1, 2]})])
      : T.missing(D, 'rank–fidelity curve', ['rank_fidelity.json', 'summary.json'])]));

  // polysemanticity
  const poly = D.poly.rows;
  parts.push(T.el('section', {id: 'polysemanticity'}, [T.el('h2', {}, 'Most polysemantic units'),
    poly.length ? T.el('div', {}, [
      T.table(['unit', 'SAE hook', 'effective features', 'strongest features (share)', 'label'], poly.slice(0, 20).map((r) => [
        link(r.unit), r.hook || '', T.num(r.score), (r.top_features || []).slice(0, 3).map((f) => `${f[0]} (${T.num(f[1], 2)})`).join(', '),
        (D.labels.byUnit.get(r.unit) || {}).text || '']), {numeric: [2]}),
      D.poly.nTokens ? T.el('p', {class: 'muted'}, `Over ${D.poly.nTokens} tokens.`) : null])
      : T.missing(D, 'polysemanticity scores (analyze with SAEs)', ['polysemanticity.json'])]));

  if (D.figures.length) {
    parts.push(T.el('section', {id: 'figures'}, [T.el('h2', {}, 'Static figures (for papers)'),
      T.el('p', {}, ['PNG files beside this page: ', ...D.figures.flatMap((f, i) => [i ? ', ' : '', T.el('a', {href: f}, f)])])]));
  }
  T.append(root, parts);
};

T.CircuitsView = function (D, root) {
  const view = {};
  if (!D.circuits) { root.appendChild(T.missing(D, 'circuits', ['circuits.json'])); view.draw = () => {}; return view; }
  const C = D.circuits.categories;
  const toggles = T.categoryToggles(D, 'circuits');
  const body = T.el('div', {});
  T.append(root, [T.el('p', {}, ['Toggle categories to highlight their routes on the ', T.el('a', {href: '#graph'}, 'graph'),
    ': routes every toggled category uses are shared (dark), routes of one category alone are specific (its colour).']), toggles, body]);
  view.draw = function () {
    T.clear(body);
    for (const input of toggles.querySelectorAll('input')) input.checked = T.state.categories.has(input.dataset.category);
    const on = C.filter((c) => T.state.categories.has(c.name));
    const shown = on.length ? on : C;
    const series = shown.map((c) => ({name: c.name, color: c.color,
      points: c.curve.map((p) => [p.size, p.faithfulness]), marker: [c.routes.size, c.faithfulness]}));
    body.appendChild(T.el('h3', {}, 'Faithfulness against circuit size'));
    body.appendChild(T.lineChart(series, {xlabel: `routes kept (of ${D.circuits.n_routes})`, ylabel: 'faithfulness',
      hline: C[0].target, id: 'faithfulness-chart', width: 640, height: 300}));
    body.appendChild(T.el('p', {class: 'muted'}, 'Dots: the circuit chosen (the smallest reaching the target, dashed). Random circuits of the same size reach the faithfulness in the last column.'));
    const mean = (xs) => xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : null;
    body.appendChild(T.table(['category', 'routes', 'faithfulness [95%]', 'completeness [95%]', 'random circuits', 'examples'],
      C.map((c) => ({dataset: {category: c.name}, cells: [c.name, String(c.routes.size), T.interval(c.faithfulness, c.interval),
        T.interval(c.completeness, c.completenessInterval), T.num(mean(c.random), 2), String(c.nExamples || '–')]})),
      {numeric: [1], id: 'circuits-table'}));
    // overlap
    body.appendChild(T.el('h3', {}, 'Overlap (Jaccard index of the route sets)'));
    const jac = (a, b) => { const i = [...a.routes].filter((r) => b.routes.has(r)).length; return i / Math.max(1, a.routes.size + b.routes.size - i); };
    body.appendChild(T.table(['', ...C.map((c) => c.name)], C.map((a) => [a.name, ...C.map((b) => T.num(jac(a, b), 2))]),
                             {numeric: C.map((_, i) => i + 1), cls: 'narrow', id: 'overlap-table'}));
    if (on.length > 1) {
      const shared = [...on[0].routes].filter((r) => on.every((c) => c.routes.has(r)));
      body.appendChild(T.el('h3', {}, `Routes shared by ${on.map((c) => c.name).join(', ')} (${shared.length})`));
      body.appendChild(T.el('ul', {class: 'inline', id: 'shared-routes'}, shared.map((r) => T.el('li', {}, r))));
    }
  };
  view.draw();
  return view;
};

T.UnitsView = function (D, root) {
  const view = {};
  const index = T.searchIndex(D);
  const info = T.el('p', {class: 'muted'});
  const body = T.el('div', {});
  T.append(root, [info, body]);
  view.draw = function () {
    const q = (T.state.query || '').trim().toLowerCase();
    const words = q.split(/\s+/).filter(Boolean);
    const hits = index.filter((x) => words.every((w) => x.hay.includes(w)));
    info.textContent = `${hits.length} of ${index.length} labelled units` + (q ? ` matching "${q}"` : '') + '. Type in the search box above.';
    T.clear(body);
    if (!index.length) { body.appendChild(T.missing(D, 'labels', ['labels.json', 'summary.json'])); return; }
    body.appendChild(T.table(['unit', 'kind', 'label', 'score [95%]', 'detection', 'fuzzing'], hits.map((x) => {
      const lab = D.labels.byUnit.get(x.unit);
      return {dataset: {unit: x.unit}, cells: [T.el('a', {href: '#', class: 'unit-link', dataset: {unit: x.unit}, onclick: (e) => { e.preventDefault(); T.select(x.unit); }}, x.unit),
        x.kind, lab.status && lab.status !== 'ok' ? `(${lab.status})` : x.text, T.interval(lab.score, lab.score_interval),
        T.num(lab.detection, 2), T.num(lab.fuzzing, 2)]};
    }), {numeric: [3, 4, 5], id: 'units-table'}));
    const base = D.labels.baseline;
    const usage = D.labels.usage;
    if (base || usage) {
      body.appendChild(T.el('p', {class: 'muted'}, (base ? `Random-label baseline ${T.num(base.mean, 2)} (n=${base.n}). ` : '') +
        (usage ? `LLM requests ${usage.requests || 0}, cached ${usage.cached || 0}, cost $${Number(usage.cost_usd || 0).toFixed(4)}.` : '') +
        (D.labels.stopped ? ` Stopped early: ${D.labels.stopped}.` : '')));
    }
  };
  view.draw();
  return view;
};

T.ChangesView = function (D, root) {
  if (!D.diff) { root.appendChild(T.missing(D, 'diff', ['diff.json'])); return {draw: () => {}}; }
  const d = D.diff;
  const link = (u) => T.el('a', {href: '#', class: 'unit-link', dataset: {unit: u}, onclick: (e) => { e.preventDefault(); T.select(u); }}, u);
  const m = d.meta;
  const parts = [T.el('p', {}, `${m.label_a || 'a'} → ${m.label_b || 'b'}: ${m.n_channels || '?'} channels, ${m.n_routes || '?'} routes` +
                                (d.hasNull ? `; changes ranked against ${m.n_null} null models (z)` : ''))];
  parts.push(T.el('h3', {}, 'Channels turned most'));
  parts.push(T.table(['channel', 'side', 'energy moved', 'largest angle', 'rank', 'spectrum Δ', 'z'], d.raw.channels.slice(0, 30).map((c) => ({
    dataset: {channel: c.channel}, cells: [link(c.channel), c.side, T.num(c.energy_moved), c.max_angle === null ? '–' : T.num(c.max_angle, 3) + '°',
      `${c.rank_a}→${c.rank_b}`, T.num(c.spectrum_change), T.num(c.z, 2)]})), {numeric: [2, 3, 4, 5, 6], id: 'changed-channels'}));
  parts.push(T.el('h3', {}, 'Routes changed most'));
  parts.push(T.table(['route', 'weight', 'share a', 'share b', 'change', 'z'], d.raw.routes.slice(0, 30).map((r) => ({
    dataset: {route: T.routeId(r.writer, r.port)}, cells: [T.el('span', {}, [link(r.writer), ' → ', r.port]), r.weight, T.num(r.share_a), T.num(r.share_b),
      T.num(r.share_b - r.share_a), T.num(r.z, 2)]})), {numeric: [2, 3, 4, 5], id: 'changed-routes'}));
  if (d.modules) parts.push(T.el('p', {}, `Modules: ${d.modules.n_a} → ${d.modules.n_b}, adjusted Rand index ${T.num(d.modules.ari, 3)}; moved: ${(d.modules.moved || []).join(', ') || 'none'}`));
  for (const [cat, v] of Object.entries(d.circuits)) {
    parts.push(T.el('p', {}, `Circuit ${cat}: ${v.size_a} → ${v.size_b} routes, Jaccard ${T.num(v.jaccard, 2)}; gained ${(v.gained || []).length}, lost ${(v.lost || []).length}`));
  }
  if (d.labels.length) {
    parts.push(T.el('h3', {}, 'Labels changed'));
    parts.push(T.table(['unit', 'a', 'b'], d.labels.map((l) => [link(l.unit), String(l.a), String(l.b)])));
  }
  T.append(root, parts);
  return {draw: () => {}};
};
