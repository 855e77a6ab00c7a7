"""The interactive report driven in a real browser: headless Chromium over the DevTools protocol.

Each test loads ``report.html`` from ``file://``, acts as a user would (real mouse and key events)
and checks the page: the panel shows the clicked channel's label and contexts, a circuit toggle
highlights its routes, search finds a label, the keyboard works, a missing or corrupt JSON file is
named on the page, injected markup stays text, and the page logs no error and requests nothing.
Skipped where no Chromium is installed (CI installs Debian's ``chromium``: see ``.ci/run``).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import tl_modular as tlm
from tl_modular import cli, report
from tl_modular.testing import tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sae_lens import StandardSAE, StandardSAEConfig

    model = tiny_model("gpt2", seed=0)
    tokens = torch.randint(0, 50, (24, 10), generator=torch.Generator().manual_seed(0))
    cfg = StandardSAEConfig(d_in=model.cfg.d_model, d_sae=32)
    cfg.metadata.hook_name = "blocks.1.hook_resid_mid"
    torch.manual_seed(0)
    inputs = report.Inputs(model=model, tokens=tokens, name="tiny gpt2", categories={"all": tokens[:16]},
                           saes=tlm.sae.SAESet([StandardSAE(cfg)]))
    out = tmp_path_factory.mktemp("report")
    report.analyze(inputs, out, report.AnalyzeConfig(n_null=5, budgets=3, n_boot=10, n_random=2, batch_size=8),
                   progress=False)
    return out


def _load(directory, name):
    return json.loads((directory / name).read_text())


def _open(browser, path):
    browser.open(path.as_uri())
    assert browser.js("document.body.dataset.ready") == "true", browser.console_errors()


def _clean(browser, path):
    """No console error or warning, and no request but the page itself (it runs offline)."""
    assert browser.console_errors() == []
    assert set(browser.requests()) <= {path.as_uri()}


def _text(browser, selector):
    return browser.js(f"(document.querySelector({json.dumps(selector)}) || {{}}).textContent || null")


def test_click_a_channel_and_read_its_label_and_contexts(browser, tiny, tmp_path):
    page = tiny / "report.html"
    _open(browser, page)
    graph = _load(tiny, "graph.json")
    channels = [n["id"] for n in graph["nodes"] if n["kind"] != "port"]
    assert browser.js("document.querySelectorAll('#graph-svg .node').length") == len(channels)
    labels = {lab["unit"]: lab for lab in _load(tiny, "labels.json")["labels"]}
    browser.click('.node[data-id="L1.H0"]')
    assert _text(browser, "#panel-title") == "L1.H0"
    assert _text(browser, "#panel-label") == labels["L1.H0"]["text"]
    assert "score " in _text(browser, "#panel-score")
    top = labels["L1.H0"]["evidence"]["top"]
    assert browser.js("document.querySelectorAll('#panel-contexts .context').length") == len(top)
    tokens = browser.js("[...document.querySelectorAll('#panel-contexts .context')[0].querySelectorAll('.tok')]"
                        ".map(t => t.textContent)")
    assert tokens == [str(t) for t in top[0]["tokens"]]
    # the peak token is coloured (activation colouring as circuitsvis does), the routes are listed
    assert browser.js("getComputedStyle(document.querySelector('#panel-contexts .tok.peak')).backgroundColor") \
        not in ("rgba(0, 0, 0, 0)", "transparent")
    assert browser.js("document.querySelectorAll('#panel-routes a.unit-link').length") > 0
    # a neighbour link opens that unit
    browser.click("#panel-routes a.unit-link")
    assert _text(browser, "#panel-title") != "L1.H0"
    shot = browser.screenshot(tmp_path / "report.png")
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.getextrema()[1] - img.getextrema()[0] > 100 and len(set(img.resize((200, 130)).getdata())) > 20
    _clean(browser, page)


def test_circuit_toggle_highlights_its_routes_and_hover_shows_a_route(browser, tiny):
    page = tiny / "report.html"
    _open(browser, page)
    circuit = _load(tiny, "circuits.json")["circuits"][0]
    assert browser.js("document.querySelectorAll('#graph-svg path.route.specific').length") == 0
    browser.click('#graph-categories input[data-category="all"]')
    assert browser.js("document.getElementById('graph-svg').dataset.highlighted") == str(len(circuit["routes"]))
    assert browser.js("document.querySelectorAll('#graph-svg path.route.specific').length") == len(circuit["routes"])
    n_routes = _load(tiny, "circuits.json")["n_routes"]
    assert browser.js("document.querySelectorAll('#graph-svg path.route.faded').length") == n_routes - len(
        circuit["routes"])
    # the circuits view shares the toggle and draws the faithfulness curve
    browser.click("#tab-circuits")
    assert browser.js("document.querySelector('#circuits-categories input').checked") is True
    assert browser.js("!!document.querySelector('#faithfulness-chart path.series')")
    assert browser.js("document.querySelectorAll('#circuits-table tbody tr').length") == 1
    browser.click("#circuits-categories input")
    browser.click("#tab-graph")
    assert browser.js("document.getElementById('graph-svg').dataset.highlighted") == "0"
    # hovering a route shows its static and data strength and attribution
    x, y = browser.js("""(() => { const p = document.querySelector('#graph-svg path.hit');
        const pt = p.getPointAtLength(p.getTotalLength() / 2); const m = p.getScreenCTM();
        return [pt.x * m.a + pt.y * m.c + m.e, pt.x * m.b + pt.y * m.d + m.f]; })()""")
    browser.mouse("mouseMoved", x, y)
    tip = _text(browser, "#route-tooltip")
    assert browser.js("document.getElementById('route-tooltip').hidden") is False
    assert "static" in tip and "data" in tip and "attribution" in tip and "→" in tip
    _clean(browser, page)


def test_modules_collapse_and_expand(browser, tiny):
    page = tiny / "report.html"
    _open(browser, page)
    members = _load(tiny, "modules.json")["modules"][0]
    browser.click('#module-chips .chip[data-module="0"]')
    assert browser.js("!!document.querySelector('.node.module[data-id=\"module:0\"]')")
    assert browser.js(f"!!document.querySelector('.node[data-id={json.dumps(members[0])}]')") is False
    browser.click('.node.module[data-id="module:0"]')
    assert _text(browser, "#panel-title") == "M0"
    browser.click('#module-chips .chip[data-module="0"]')
    assert browser.js("!!document.querySelector('.node.module')") is False
    _clean(browser, page)


def test_search_and_keyboard(browser, tiny):
    page = tiny / "report.html"
    _open(browser, page)
    labels = _load(tiny, "labels.json")["labels"]
    target = next(lab for lab in labels if lab["kind"] == "channel" and lab["unit"] == "L0.MLP")
    word = next(w for w in target["text"].split() if len(w) > 3)
    browser.key("/", "Slash")
    assert browser.js("document.activeElement.id") == "search"
    browser.type("L0.MLP " + word)
    units = browser.js("[...document.querySelectorAll('#search-results li[data-unit]')].map(li => li.dataset.unit)")
    assert "L0.MLP" in units
    for _ in range(units.index("L0.MLP") + 1):    # arrows move through the results
        browser.key("ArrowDown", keycode=40)
    browser.key("Enter", keycode=13)
    assert _text(browser, "#panel-title") == "L0.MLP"
    browser.key("Escape", keycode=27)             # clears and leaves the search box
    browser.key("Escape", keycode=27)             # closes the panel
    assert browser.js("document.getElementById('panel').hidden") is True
    # arrows move between channels on the graph, Enter selects
    browser.js("document.querySelector('.node[data-id=\"L0.H0\"]').focus()")
    browser.key("ArrowDown", keycode=40)
    assert browser.js("document.activeElement.dataset.id") == "L0.H1"
    browser.key("ArrowRight", keycode=39)
    assert browser.js("document.activeElement.dataset.id") == "L0.MLP"
    browser.key("Enter", keycode=13)
    assert _text(browser, "#panel-title") == "L0.MLP"
    # number keys switch views; the labels view filters by the search
    browser.js("document.activeElement.blur()")
    browser.key("3", "Digit3")
    assert browser.js("document.getElementById('view-units').hidden") is False
    assert browser.js("document.querySelectorAll('#units-table tbody tr').length") == len(labels)
    _clean(browser, page)


def test_text_from_the_data_stays_text(browser, tiny, tmp_path):
    """A label or token holding markup is shown as typed: no element, no script, no request."""
    d = tmp_path / "r"
    shutil.copytree(tiny, d)
    evil = '</script><script>window.__pwned = 1</script><img src="x.png" onerror="window.__pwned = 2">'
    labels = _load(d, "labels.json")
    first = labels["labels"][0]
    first["text"] = evil
    first["evidence"]["top"][0]["tokens"][0] = "</script><b>tok</b>"
    (d / "labels.json").write_text(json.dumps(labels))
    summary = _load(d, "summary.json")
    summary["model"] = "<i>model</i>"
    (d / "summary.json").write_text(json.dumps(summary))
    page = report.render(None, d)
    text = page.read_text()
    assert text.lower().count("</script") == 2                # the data block's and the app's own
    assert "<i>model</i>" not in text and "&lt;i&gt;model&lt;/i&gt;" in text
    _open(browser, page)
    unit = first["unit"]
    browser.js(f"document.querySelector('.node[data-id={json.dumps(unit)}]').dispatchEvent(new MouseEvent('click'))")
    assert _text(browser, "#panel-label") == evil
    assert _text(browser, "#panel-contexts .tok") == "</script><b>tok</b>"
    assert browser.js("window.__pwned === undefined && !document.querySelector('#app img, #app script, #app i')")
    _clean(browser, page)


def test_missing_and_corrupt_files_are_named_on_the_page(browser, tiny, tmp_path):
    d = tmp_path / "r"
    shutil.copytree(tiny, d)
    (d / "circuits.json").unlink()
    (d / "labels.json").write_text('{"labels": [')
    page = report.render(None, d)
    _open(browser, page)
    banner = _text(browser, "#problems")
    assert browser.js("document.getElementById('problems').hidden") is False
    assert "circuits.json" in banner and "labels.json" in banner and "not valid JSON" in banner
    assert browser.js("document.querySelectorAll('#graph-svg .node').length") > 0     # the rest still shows
    browser.click("#tab-circuits")
    assert "circuits.json" in _text(browser, "#view-circuits")
    _clean(browser, page)
    # no graph at all: named, and the overview still opens
    (d / "graph.json").write_text("not json")
    page = report.render(None, d)
    _open(browser, page)
    assert "graph.json" in _text(browser, "#problems") and "graph.json" in _text(browser, "#view-graph")
    # a page whose embedded data was damaged says so instead of staying blank
    html = page.read_text()
    start = html.index('id="tlm-data">') + len('id="tlm-data">')
    page.write_text(html[:start] + "{broken" + html[html.index("</script>", start):])
    browser.open(page.as_uri())
    assert "not valid JSON" in _text(browser, "#fatal")


def test_diff_opens_in_the_same_viewer(browser, tiny, tmp_path, capsys):
    out = tmp_path / "d"
    assert cli.main(["diff", str(tiny), str(tiny), "--out", str(out)]) == 0
    assert "report: " in capsys.readouterr().out
    page = out / "report.html"
    _open(browser, page)
    assert browser.js("document.getElementById('tab-changes').getAttribute('aria-selected')") == "true"
    assert browser.js("document.querySelectorAll('#changed-routes tbody tr').length") > 0
    browser.click("#tab-graph")
    assert browser.js("document.querySelectorAll('#graph-svg .node').length") > 0
    browser.click('.node[data-id="L0.H0"]')
    assert _text(browser, "#panel-title") == "L0.H0"
    assert browser.js("!!document.querySelector('#panel-diff')")
    _clean(browser, page)
