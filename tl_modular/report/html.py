"""``report.html``: one self-contained page (inline CSS, images as data URIs) that opens offline.

Every piece of text from the data — channel names, labels written by a language model, tokens —
is HTML-escaped, so a label cannot inject markup into the page.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from tl_modular._io import _atomic

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#1d232a;background:#fafafa}
header{background:#18324a;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;opacity:.8}main{max-width:1180px;margin:0 auto;padding:8px 28px 40px}
section{background:#fff;border:1px solid #e3e6ea;border-radius:8px;margin:18px 0;padding:14px 20px}
h2{font-size:17px;margin:4px 0 10px}table{border-collapse:collapse;font-size:13px;width:100%}
th,td{border-bottom:1px solid #eceff2;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f5f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto}.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#f3f6f9;border-radius:6px;padding:8px 14px;min-width:130px}
.card b{display:block;font-size:20px}.muted{color:#66707a;font-size:12px}code{font-size:12px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return "0" if abs(x) < 1e-9 else f"{x:.{digits}g}"
    return _e(x)


def _img(out: Path, name: str | None, alt: str) -> str:
    if not name or not (out / name).exists():
        return f'<p class="muted">({_e(alt)}: no figure)</p>'
    data = base64.b64encode((out / name).read_bytes()).decode()
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _table(head: list[str], rows: list[list[Any]], numeric: set[int] = frozenset()) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f'<td class="num">{_num(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _labels_by_unit(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for row in (summary.get("labels") or {}).get("labels", []):
        unit = row.get("unit") or row.get("name") or row.get("id")
        if unit is not None:
            out[str(unit)] = row
    return out


def render(summary: dict[str, Any], out: Path) -> Path:
    """Write ``out/report.html`` from ``summary`` (and the figures beside it); returns its path."""
    figs = summary.get("figures", {})
    labels = _labels_by_unit(summary)
    comp = summary["compression"]
    mods = summary["modules"]
    q = mods.get("modularity", {}).get("Q", {})
    cards = [("channels", summary["channels"]["n"]),
             ("dimensions kept", f"{comp['dimensions']} / {comp['max_dimensions']}"),
             ("modules", len(mods["modules"])),
             ("modularity Q", f"{_num(q.get('value'))} (z {_num(q.get('z'), 2)})" if q else "–"),
             ("tokens", summary["n_tokens"])]
    parts = ['<section id="summary"><h2>Summary</h2><div class="cards">'
             + "".join(f'<div class="card"><b>{_e(v)}</b>{_e(k)}</div>' for k, v in cards)
             + f'</div><p class="muted">model fingerprint <code>{_e(summary["model_fingerprint"])}</code>; '
             + "stage times: " + " · ".join(f"{_e(k)} {v:.1f} s" for k, v in summary.get("timings", {}).items())
             + "</p></section>"]

    parts.append(f'<section id="graph"><h2>Channel graph and modules</h2>{_img(out, figs.get("graph"), "graph")}'
                 '<p class="muted">Channels by stream position, coloured by module; edge widths by route '
                 'strength.</p></section>')
    rows = []
    for i, m in enumerate(mods["modules"]):
        lab = labels.get(f"module:{i}") or labels.get(f"M{i}") or {}
        rows.append([f"M{i}", len(m), ", ".join(m[:12]) + (" …" if len(m) > 12 else ""),
                     lab.get("text", ""), _num(lab.get("score"), 2)])
    mod_stats = "".join(f"<li>{_e(k)}: {_num(v.get('value'))} vs null {_num(v.get('null_mean'))} "
                        f"(z {_num(v.get('z'), 2)}, p {_num(v.get('p'), 2)})</li>"
                        for k, v in mods.get("modularity", {}).items() if isinstance(v, dict))
    if len(mods["modules"]) < 2:
        mod_stats = ("<li>One module: no cut of the Gomory–Hu tree leaves both sides large enough, so the "
                     "channels form one strongly connected whole (modularity scores are trivial).</li>")
    parts.append('<section id="modules"><h2>Modules</h2>'
                 + _table(["module", "size", "channels", "label", "label score"], rows, {1, 4})
                 + (f"<ul>{mod_stats}</ul>" if mod_stats else "") + "</section>")

    rf = summary.get("rank_fidelity") or []
    parts.append('<section id="rank-fidelity"><h2>Rank–fidelity</h2>' + _img(out, figs.get("rank_fidelity"),
                                                                               "rank-fidelity")
                 + _table(["dimensions", "loss recovered", "KL"],
                          [[r["dimensions"], r["loss_recovered"], r["kl"]] for r in rf], {0, 1, 2}) + "</section>")

    circ = summary.get("circuits")
    if circ:
        rows = [[n, c["size"], f'{c["faithfulness"]:.2f} [{c["faithfulness_interval"][0]:.2f}, '
                 f'{c["faithfulness_interval"][1]:.2f}]', c["completeness"],
                 "; ".join(f"{a}→{b}" for a, b in c["routes"][:5])] for n, c in circ["categories"].items()]
        parts.append('<section id="circuits"><h2>Circuits per category</h2>'
                     + _img(out, figs.get("circuits"), "circuits")
                     + _table(["category", "routes", "faithfulness [95%]", "completeness", "strongest routes"],
                              rows, {1, 3})
                     + f'<p class="muted">{len(circ["shared"])} routes shared by every category, of '
                       f'{circ["n_routes"]}.</p></section>')

    poly = summary.get("polysemanticity")
    if poly:
        rows = [[r["unit"], r["hook"], r["score"], ", ".join(f"{f} ({s:.2f})" for f, s in r["top_features"][:3]),
                 (labels.get(r["unit"]) or {}).get("text", "")] for r in poly["rows"][:20]]
        parts.append('<section id="polysemanticity"><h2>Most polysemantic units</h2>'
                     + _img(out, figs.get("polysemanticity"), "polysemanticity")
                     + _table(["unit", "SAE hook", "effective features", "strongest features (share)", "label"],
                              rows, {2})
                     + f'<p class="muted">Over {poly["n_tokens"]} tokens.</p></section>')

    lab_summary = summary.get("labels") or {}
    if lab_summary.get("labels"):
        def interval(r: dict[str, Any]) -> str:
            iv = r.get("score_interval")
            return f"{_num(r.get('score'), 2)} [{_num(iv[0], 2)}, {_num(iv[1], 2)}]" if iv else _num(r.get("score"), 2)
        rows = [[r["unit"], r["kind"], r["text"] if r["status"] == "ok" else f'({r["status"]})', interval(r),
                 _num(r.get("detection"), 2), _num(r.get("fuzzing"), 2)] for r in lab_summary["labels"]]
        base = lab_summary.get("baseline") or {}
        usage = lab_summary.get("usage") or {}
        note = (f"Scores: correlation of activations simulated from the label alone with the true ones on "
                f"held-out contexts (top and random 1:1), with 95% bootstrap intervals; detection and fuzzing are "
                f"balanced accuracies. Random-label baseline: {_num(base.get('mean'), 2)} "
                f"(n={base.get('n', 0)}). Requests: {usage.get('requests', 0)}, cached replies: "
                f"{usage.get('cached', 0)}, cost ${usage.get('cost_usd', 0.0):.4f}."
                + (f" Stopped early: {lab_summary['stopped']}." if lab_summary.get("stopped") else ""))
        parts.append('<section id="labels"><h2>Labels</h2>'
                     + _table(["unit", "kind", "label", "score [95%]", "detection", "fuzzing"], rows, {3, 4, 5})
                     + f'<p class="muted">{_e(note)}</p></section>')

    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>tl_modular report — '
            f'{_e(summary["model"])}</title><meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<style>{_CSS}</style></head><body><header><h1>tl_modular report: {_e(summary["model"])}</h1>'
            f'<p>{summary["n_sequences"]} sequences, {summary["n_tokens"]} tokens{_data_line(summary)}</p>'
            '</header><main>'
            + "".join(parts) + "</main></body></html>")
    path = Path(out) / "report.html"
    _atomic(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return path


def _data_line(summary: dict[str, Any]) -> str:
    """Where the tokens came from and how much of the source was left out (never silently)."""
    data = summary.get("data") or {}
    if "read" not in data:
        return ""
    return _e(f" — from {data['source']}: {data['used']:,} of {data['read']:,} tokens read used, "
              f"{data['dropped']:,} dropped")
