// Shared helpers of the report app: DOM building (text only, never HTML strings), formatting,
// colours, the unit-name grammar, and a tiny event bus. Every other file extends the `T` namespace.
'use strict';
const T = {};
T.SVG = 'http://www.w3.org/2000/svg';   // a namespace name, never fetched

// el('div', {class: 'x', onclick: f}, [child, 'text']): strings become text nodes, so data from
// the report (labels, tokens, names) can never become markup.
T.el = function (tag, attrs, children) {
  const e = document.createElement(tag);
  T.attrs(e, attrs);
  T.append(e, children);
  return e;
};
T.svg = function (tag, attrs, children) {
  const e = document.createElementNS(T.SVG, tag);
  T.attrs(e, attrs);
  T.append(e, children);
  return e;
};
T.attrs = function (e, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'text') e.textContent = String(v);
    else if (k === 'dataset') Object.assign(e.dataset, v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  return e;
};
T.append = function (e, children) {
  if (children === undefined || children === null) return e;
  for (const c of Array.isArray(children) ? children : [children]) {
    if (c === undefined || c === null || c === false) continue;
    e.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
};
T.clear = function (e) { while (e.firstChild) e.removeChild(e.firstChild); return e; };

T.num = function (x, digits) {
  if (x === null || x === undefined) return '–';
  if (typeof x !== 'number') return String(x);
  if (!isFinite(x)) return isNaN(x) ? 'nan' : (x > 0 ? '∞' : '−∞');
  if (Math.abs(x) < 1e-9) return '0';
  const d = digits === undefined ? 3 : digits;
  const a = Math.abs(x);
  if (a >= 1e5 || a < 1e-3) return x.toExponential(Math.max(d - 1, 1));
  return Number(x.toPrecision(d)).toString();
};
T.pct = function (x) { return (x === null || x === undefined || !isFinite(x)) ? '–' : (100 * x).toFixed(1) + '%'; };
T.interval = function (v, iv, digits) {
  const d = digits === undefined ? 2 : digits;
  if (v === null || v === undefined) return '–';
  const s = typeof v === 'number' && isFinite(v) ? v.toFixed(d) : T.num(v);
  return iv && iv.length === 2 && iv[0] !== null ? `${s} [${Number(iv[0]).toFixed(d)}, ${Number(iv[1]).toFixed(d)}]` : s;
};

// Categorical palette (Tableau 10 without the greys), extended by hue rotation.
T.PALETTE = ['#4e79a7', '#f28e2b', '#59a14f', '#e15759', '#76b7b2', '#edc948', '#b07aa1', '#ff9da7', '#9c755f'];
T.color = function (i) {
  if (i === null || i === undefined || i < 0) return '#9aa3ad';
  if (i < T.PALETTE.length) return T.PALETTE[i];
  return `hsl(${(i * 137.5) % 360}, 55%, 52%)`;
};
// Circuit categories get colours of their own, apart from the modules' palette.
T.CATEGORY_COLORS = ['#7b2cbf', '#0f9d8a', '#c2185b', '#8d6e00', '#3949ab', '#6d4c41', '#00838f', '#ad1457'];

// The unit names tl_modular writes (the Python side parses them in one place too): channels `embed`, `L3.H7`, `L3.MLP`,
// `L3.b_O`; ports `L3.H7:q`; neurons `L3.MLP.N42`; directions `L3.H7:k.d2`, `L3.MLP:in.d5`,
// `L3.H7:write.d0`; SAE features `blocks.3.hook_resid_pre:f12`, feature nodes `L3.MLP#f12`; modules `module:2`.
T.channelOf = function (unit) {
  if (!unit) return null;
  if (unit.startsWith('module:')) return null;
  const m = /^(L\d+\.(?:H\d+|MLP|b_O))(?:[:.#].*)?$/.exec(unit);
  if (m) return m[1];
  if (unit === 'embed' || unit === 'pos_embed' || unit === 'unembed') return unit;
  return null;
};
T.portOf = function (unit) { const i = unit.indexOf(':'); return i < 0 ? null : unit.slice(i + 1).split('.')[0]; };
T.layerOf = function (name) { const m = /^L(\d+)\./.exec(name || ''); return m ? Number(m[1]) : null; };
T.short = function (name) {
  const m = /^L(\d+)\.(.*)$/.exec(name);
  return m ? m[2] : name;
};

// A minimal event bus: T.on('select', f); T.emit('select', unit).
T._handlers = {};
T.on = function (name, f) { (T._handlers[name] = T._handlers[name] || []).push(f); };
T.emit = function (name, ...args) { for (const f of T._handlers[name] || []) f(...args); };

T.debounce = function (f, ms) {
  let t = null;
  return function (...args) { clearTimeout(t); t = setTimeout(() => f.apply(this, args), ms); };
};
