"""``report.html``: the report directory as an interactive page, in one file that opens offline.

The page is a small app (``tl_modular/report/app/``: plain JavaScript and CSS written for it, no
framework, nothing fetched) with the report directory's JSON files embedded at render time —
``graph.json``, ``modules.json``, ``circuits.json``, ``labels.json`` (with its evidence),
``polysemanticity.json``, ``rank_fidelity.json``, ``attribution.json`` (the feature circuits'
strongest edges; ``attribution_set.json`` stays beside the page), ``summary.json``,
``compression/compression.json`` — so the files stay the single source and the page is re-rendered
from them with ``python -m tl_modular.report DIR``. Views: the channel graph (modules, routes,
zoom/pan, hover, collapse), the circuits per category, the feature circuits beside them, every
label with search, an overview; a side panel per unit.
``tl-modular diff A B --out D`` writes ``D/report.html`` in the same viewer (:func:`render_diff`).

Safety: the data sits in a ``<script type="application/json">`` block with ``<``, ``>``, ``&`` and
the JavaScript line separators escaped, so no string (a label written by a language model, a
token) can close the block or become markup; the app builds the DOM from text nodes only; and a
Content-Security-Policy allows only the page's own script and style (by hash) and ``data:`` images
— no request can leave the page. A missing or corrupt JSON file is named in a banner on the page.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
from pathlib import Path
from typing import Any

from tl_modular._io import _atomic

__all__ = ["APP_DIR", "REPORT_FILES", "page_data", "render", "render_diff"]

#: The app's JavaScript and CSS, shipped with the package.
APP_DIR = Path(__file__).with_name("app")
_SCRIPTS = ("util.js", "data.js", "charts.js", "graph.js", "panel.js", "views.js", "features.js", "main.js")

#: The report directory's files the page embeds (paths relative to the directory).
REPORT_FILES = ("summary.json", "graph.json", "modules.json", "circuits.json", "labels.json", "polysemanticity.json",
                "rank_fidelity.json", "attribution.json", "compression/compression.json", "figures.json",
                "manifest.json")
_REQUIRED = ("summary.json", "graph.json")
_STAGE_FILES = {"modules": "modules.json", "circuits": "circuits.json", "polysemanticity": "polysemanticity.json",
                "labels": "labels.json", "rank_fidelity": "rank_fidelity.json"}
_DIFF_SIDE_FILES = ("summary.json", "graph.json", "modules.json")


def _finite(x: Any) -> Any:
    """JSON for a browser: NaN and ±Infinity (which Python's json writes, JSON.parse rejects) become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _read(directory: Path, name: str, problems: list[dict[str, str]], *, expected: bool, as_name: str | None = None
          ) -> Any:
    path = directory / name
    shown = as_name or name
    if not path.exists():
        if expected:
            problems.append({"file": shown, "problem": f"is missing from {directory}"})
        return None
    try:
        return _finite(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError) as e:
        problems.append({"file": shown, "problem": f"cannot be read ({type(e).__name__}: {e})"})
    except json.JSONDecodeError as e:
        problems.append({"file": shown, "problem": f"is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"})
    return None


def page_data(directory: str | os.PathLike, summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``report.html`` embeds for a report directory: ``{"files": {name: JSON}, "problems": [...]}``.

    ``summary`` (what :func:`tl_modular.report.analyze` just wrote) stands in for ``summary.json``.
    A file the summary says was produced but that is missing, and any file that is not valid JSON,
    is listed in ``problems`` with its name.

    >>> data = tlm.report.html.page_data("tl_modular_report")     # doctest: +SKIP
    >>> sorted(data["files"])[:3], data["problems"]                # doctest: +SKIP
    (['circuits.json', 'compression/compression.json', 'figures.json'], [])
    """
    directory = Path(directory)
    problems: list[dict[str, str]] = []
    files: dict[str, Any] = {}
    if summary is not None:
        files["summary.json"] = _finite(summary)
    else:
        files["summary.json"] = _read(directory, "summary.json", problems, expected=True)
    made = files["summary.json"] or {}
    for name in REPORT_FILES:
        if name == "summary.json":
            continue
        stage = next((k for k, v in _STAGE_FILES.items() if v == name), None)
        expected = name in _REQUIRED or (stage is not None and made.get(stage) is not None)
        if name == "attribution.json":     # written only when the stage ran (not when switched off)
            expected = "settings" in (made.get("attribution") or {})
        files[name] = _read(directory, name, problems, expected=expected)
    figures = files.get("figures.json") or (made.get("figures") if isinstance(made.get("figures"), dict) else {}) or {}
    return {"schema": "tl_modular.ReportPage", "version": 1, "kind": "report",
            "files": {k: v for k, v in files.items() if v is not None}, "problems": problems,
            "figures": [f for f in figures.values() if isinstance(f, str) and (directory / f).exists()]}


def _embed(data: dict[str, Any]) -> str:
    """JSON safe inside ``<script type="application/json">``: nothing in it can end the element."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _app() -> tuple[str, str]:
    js = "\n".join((APP_DIR / name).read_text(encoding="utf-8") for name in _SCRIPTS)
    css = (APP_DIR / "app.css").read_text(encoding="utf-8")
    script = "(function () {\n" + js + "\n})();\n"
    if "</script" in script.lower() or "</style" in css.lower():
        raise ValueError("the report app's code contains a closing </script> or </style> tag: it would end its element")
    return script, css


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def _page(data: dict[str, Any], title: str, subtitle: str) -> str:
    script, css = _app()
    csp = (f"default-src 'none'; script-src {_sha256(script)}; style-src {_sha256(css)}; img-src data:; "
           "base-uri 'none'; form-action 'none'")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{css}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header>"
        '<div id="app"><p id="boot">Loading the report…</p>'
        "<noscript><p>This report is an interactive page: it needs JavaScript (it runs offline, nothing is "
        "fetched). The same results are in the JSON files beside it and the figures in figures/.</p></noscript></div>"
        f'<script type="application/json" id="tlm-data">{_embed(data)}</script>'
        f"<script>{script}</script></body></html>")


def _subtitle(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "summary.json is missing: the views below show what the other files hold"
    line = f"{summary.get('n_sequences', '?')} sequences, {summary.get('n_tokens', '?')} tokens"
    data = summary.get("data") or {}
    if "read" in data:   # where the tokens came from and how much was left out (never silently)
        line += (f" — from {data['source']}: {data['used']:,} of {data['read']:,} tokens read used, "
                 f"{data['dropped']:,} dropped")
    return line


def render(summary: dict[str, Any] | None, out: str | os.PathLike) -> Path:
    """Write ``out/report.html`` from the report directory ``out``; returns its path.

    Args:
        summary: The run's summary (as written to ``summary.json``), or ``None`` to read
            ``out/summary.json``.
        out: The report directory.

    >>> tlm.report.render(None, "tl_modular_report")   # re-render after editing a JSON file  # doctest: +SKIP
    PosixPath('tl_modular_report/report.html')
    """
    out = Path(out)
    data = page_data(out, summary)
    s = data["files"].get("summary.json")
    name = (s or {}).get("model", out.name)
    data["title"] = f"tl_modular report: {name}"
    path = out / "report.html"
    page = _page(data, data["title"], _subtitle(s))
    _atomic(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return path


def render_diff(out: str | os.PathLike, a: str | os.PathLike, b: str | os.PathLike) -> Path:
    """Write ``out/report.html`` for a model diff: ``out/diff.json`` (``ModelDiff.save``) shown on
    report ``a``'s graph, with ``a``'s and ``b``'s summaries, graphs and modules; returns its path.

    >>> d = tlm.diff("report_a", "report_b"); d.save("diff_ab")                 # doctest: +SKIP
    >>> tlm.report.render_diff("diff_ab", "report_a", "report_b")               # doctest: +SKIP
    PosixPath('diff_ab/report.html')
    """
    out, a, b = Path(out), Path(a), Path(b)
    problems: list[dict[str, str]] = []
    files: dict[str, Any] = {"diff.json": _read(out, "diff.json", problems, expected=True)}
    for side, directory in (("a", a), ("b", b)):
        for name in _DIFF_SIDE_FILES:
            files[f"{side}/{name}"] = _read(directory, name, problems, expected=name != "modules.json",
                                            as_name=f"{side}/{name}")
    meta = (files["diff.json"] or {}).get("meta", {})
    title = f"tl_modular diff: {meta.get('label_a', a.name)} → {meta.get('label_b', b.name)}"
    data = {"schema": "tl_modular.ReportPage", "version": 1, "kind": "diff", "title": title,
            "files": {k: v for k, v in files.items() if v is not None}, "problems": problems, "figures": [],
            "meta": {"a": str(a), "b": str(b)}}
    path = out / "report.html"
    page = _page(data, title, f"a = {a}, b = {b}; routes coloured by the change of their share, channels outlined "
                              "by how far their subspaces turned")
    _atomic(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return path
