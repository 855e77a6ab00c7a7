// Small SVG line charts (the faithfulness-vs-size curves, the rank–fidelity curve).
'use strict';

// series: [{name, color, points: [[x, y], ...], marker: [x, y] | null}]
T.lineChart = function (series, opts) {
  const o = Object.assign({width: 560, height: 300, xlabel: '', ylabel: '', hline: null, id: null, ymin: null, ymax: null}, opts || {});
  const m = {l: 52, r: 14, t: 14, b: 40};
  const pts = series.flatMap((s) => s.points).filter((p) => isFinite(p[0]) && isFinite(p[1]));
  const svg = T.svg('svg', {class: 'chart', id: o.id, viewBox: `0 0 ${o.width} ${o.height}`, role: 'img',
                            'aria-label': o.ylabel + ' against ' + o.xlabel});
  if (!pts.length) return T.el('p', {class: 'muted'}, 'no data for this chart');
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [o.ymin !== null ? o.ymin : Math.min(0, ...pts.map((p) => p[1])), o.ymax !== null ? o.ymax : Math.max(...pts.map((p) => p[1]))];
  if (o.hline !== null) y1 = Math.max(y1, o.hline);
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) y1 = y0 + 1;
  if (y0 < 0 && -y0 < 1e-3 * (y1 - y0)) y0 = 0;     // numerical noise below zero: start the axis at 0
  const integerX = pts.every((p) => Number.isInteger(p[0]));
  const X = (x) => m.l + (x - x0) / (x1 - x0) * (o.width - m.l - m.r);
  const Y = (y) => o.height - m.b - (y - y0) / (y1 - y0) * (o.height - m.t - m.b);
  const axes = T.svg('g', {class: 'axes'});
  for (let i = 0; i <= 4; i++) {
    const yv = y0 + (y1 - y0) * i / 4;
    const xv = integerX ? Math.round(x0 + (x1 - x0) * i / 4) : x0 + (x1 - x0) * i / 4;
    axes.append(T.svg('line', {x1: m.l, x2: o.width - m.r, y1: Y(yv), y2: Y(yv), class: 'grid'}),
                T.svg('text', {x: m.l - 6, y: Y(yv) + 4, 'text-anchor': 'end'}, T.num(yv, 2)),
                T.svg('text', {x: X(xv), y: o.height - m.b + 16, 'text-anchor': 'middle'}, T.num(xv, 3)));
  }
  axes.append(T.svg('text', {x: (m.l + o.width - m.r) / 2, y: o.height - 6, 'text-anchor': 'middle', class: 'axis-label'}, o.xlabel),
              T.svg('text', {x: 12, y: (m.t + o.height - m.b) / 2, 'text-anchor': 'middle', class: 'axis-label',
                             transform: `rotate(-90 12 ${(m.t + o.height - m.b) / 2})`}, o.ylabel));
  svg.appendChild(axes);
  if (o.hline !== null) {
    svg.appendChild(T.svg('line', {x1: m.l, x2: o.width - m.r, y1: Y(o.hline), y2: Y(o.hline), class: 'target'}));
  }
  for (const s of series) {
    const p = s.points.filter((q) => isFinite(q[0]) && isFinite(q[1]));
    if (!p.length) continue;
    svg.appendChild(T.svg('path', {d: p.map((q, i) => `${i ? 'L' : 'M'}${X(q[0]).toFixed(1)},${Y(q[1]).toFixed(1)}`).join(' '),
                                   class: 'series', stroke: s.color, dataset: {name: s.name}}, T.svg('title', {}, s.name)));
    if (s.marker) svg.appendChild(T.svg('circle', {cx: X(s.marker[0]), cy: Y(s.marker[1]), r: 4.5, fill: s.color, class: 'marker'},
                                        T.svg('title', {}, `${s.name}: ${T.num(s.marker[1], 3)} at ${s.marker[0]}`)));
  }
  const legend = T.el('div', {class: 'chart-legend'}, series.map((s) => {
    const sw = T.el('span', {class: 'swatch'});
    sw.style.background = s.color;
    return T.el('span', {}, [sw, s.name]);
  }));
  return T.el('div', {class: 'chart-box'}, [svg, legend]);
};
