"""The report's feature-circuit stage: its files against the attribution API run directly on the
report's compression, reuse (and the stage kept out of the other stages' cache key),
``--attribution``, models and categories the builder does not take (skipped with its reason),
and the "Feature circuits" tab in a real browser (skipped where no Chromium is installed)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import tl_modular as tlm
from tl_modular import cli, report
from tl_modular.attribution import AttributionSet, aggregate, faithfulness, feature_masks, prune
from tl_modular.attribution.build import unsupported
from tl_modular.compression import Compression
from tl_modular.testing import tiny_model

TASKS = ("induction", "sorting")
CFG = dict(metric="logit", n_null=2, budgets=2, n_boot=5, n_random=1, n_label_units=2, max_score_tokens=512,
           attribution=True)


def _load(directory, name):
    return json.loads((directory / name).read_text())


def _results(data):
    """attribution.json without the stage's timings, its numbers to 6 digits (a stage run again reads
    the saved float32 compression, the first run used it before saving)."""
    def rounded(x):
        if isinstance(x, float):
            return float(f"{x:.6g}")
        if isinstance(x, dict):
            return {k: rounded(v) for k, v in x.items() if k != "seconds"}
        return [rounded(v) for v in x] if isinstance(x, list) else x
    return rounded(data)


@pytest.fixture(scope="module")
def bundled(tmp_path_factory, one_thread):
    """The bundled model on two of its tasks (no SAEs: the stages this file needs, quickly)."""
    torch.manual_seed(0)
    inputs = report.bundled_inputs(n_per_task=16, n_examples=8, variant="plain")
    inputs.categories = {k: v for k, v in inputs.categories.items() if k in TASKS}
    inputs.saes = None
    out = tmp_path_factory.mktemp("report") / "r"
    report.analyze(inputs, out, report.AnalyzeConfig(**CFG), progress=False)
    return inputs, out


def test_feature_circuits_match_the_attribution_api_on_the_reports_compression(bundled):
    inputs, out = bundled
    data = _load(out, "attribution.json")
    assert data["schema"] == "tl_modular.ReportAttribution" and data["skipped"] is None
    s = data["settings"]
    assert s["n_attribution"] == 4 and s["prune"] == {"node_threshold": 0.8, "edge_threshold": 0.98}
    assert s["min_influence"] == 1e-4 and s["memory_gib"] == 1.0 and s["version"] == 3
    assert s["errors"] == "frozen" and s["folded"] == "ablated"
    assert list(data["categories"]) == list(TASKS)
    comp = Compression.load(out / "compression", inputs.model)
    sets = AttributionSet.load(out)
    model = inputs.model
    kept = {}
    for name in TASKS:
        c = data["categories"][name]
        task = inputs.categories[name][:4]
        graphs = tlm.attribution_graph(model, task, units=comp, min_influence=1e-4)
        kept[name] = [prune(g) for g in graphs]
        # every feature outside the circuit ablated, those the pruned build folded too
        check = faithfulness(model, task, comp, feature_masks(model, kept[name], comp), baseline="corrupted",
                             n_random=1)
        assert c["n_prompts"] == 4
        assert c["faithfulness"] == pytest.approx(check["faithfulness"], abs=1e-9)
        assert c["random"] == pytest.approx(check["random"], abs=1e-9)
        assert c["edges_kept"] == [k.n_edges for k in kept[name]]
        assert c["edges"] == [g.adjacency._nnz() for g in graphs]
        assert c["min_influence"] == 1e-4 and c["features_folded"] == [g.info["dropped_features"] for g in graphs]
        assert c["completeness"] == pytest.approx(max(g.completeness() for g in graphs), rel=1e-6)
        # the estimate made before building bounds the pruned builds (and is the full graph's size)
        full = tlm.attribution_graph(model, task[:1], units=comp)[0]
        assert c["estimate"]["nodes"] == len(full) == c["nodes"][0] + c["features_folded"][0]
        assert full.adjacency._nnz() <= c["estimate"]["edges"] <= 1.01 * full.adjacency._nnz()
        assert all(k < e for k, e in zip(c["edges_kept"], c["edges"], strict=True))
        assert 0 <= c["completeness"] < 1e-4              # fp32 model: incoming edges sum to the value
        # the page's lists: circuit features with share, frequency, channel and stream; the strongest edges
        names = [f[0] for f in c["features"]]
        assert names == sets[name].features and c["circuit"]["features"] == len(names)
        for f, share, freq, channel, stream in c["features"]:
            assert share == pytest.approx(sets[name].share[f], rel=1e-3) and freq >= 0.5
            assert f.startswith(channel + ":write.") and 1 <= stream <= 2 * model.cfg.n_layers
            assert stream == 2 * int(channel[1:].split(".")[0]) + (1 if ".H" in channel else 2)
        assert c["circuit"]["edges"] == len(sets[name].edges)
        assert [e[:2] for e in c["top_edges"]] == [list(e[:2]) for e in sets[name].edges[:len(c["top_edges"])]]
        assert 0 < len(c["top_edges"]) <= 120
        assert {e[0] for e in c["top_edges"]} | {e[1] for e in c["top_edges"]} <= set(names) | {"logit"}
    # the aggregate over the same pruned graphs is the saved set
    direct = aggregate(kept)
    for name in TASKS:
        assert direct[name].features == sets[name].features
        # the saved compression is float32: the shares agree to its rounding
        assert direct[name].error_share == pytest.approx(sets[name].error_share, rel=1e-6)
    # the summary sets each feature circuit beside the route circuit of the same task
    summary = _load(out, "summary.json")
    for name in TASKS:
        row = summary["attribution"]["categories"][name]
        routes = summary["circuits"]["categories"][name]
        assert row["routes"] == {"size": routes["size"], "of": summary["circuits"]["n_routes"],
                                 "faithfulness": routes["faithfulness"]}
        assert row["faithfulness"] == data["categories"][name]["faithfulness"]
        assert row["edges_kept"] == pytest.approx(sum(data["categories"][name]["edges_kept"]) / 4)
    assert summary["timings"]["attribution"] > 0


def test_rerun_reuses_the_stage_and_its_settings_stay_out_of_the_others_key(bundled, tmp_path):
    inputs, src = bundled
    out = tmp_path / "r"
    shutil.copytree(src, out)
    others = {"compression", "rank_fidelity", "graph", "modules", "circuits", "labels", "figures"}
    report.analyze(inputs, out, report.AnalyzeConfig(**CFG), progress=False)
    assert set(_load(out, "summary.json")["reused"]) == others | {"attribution"}
    before = _load(out, "attribution.json")
    # fewer prompts: only this stage runs again
    cfg = report.AnalyzeConfig(**CFG, n_attribution=2)
    assert report.cache_key(inputs, cfg) == report.cache_key(inputs, report.AnalyzeConfig(**CFG))
    report.analyze(inputs, out, cfg, progress=False)
    summary = _load(out, "summary.json")
    assert set(summary["reused"]) == others
    data = _load(out, "attribution.json")
    assert data["settings"]["n_attribution"] == 2 and data != before
    assert all(c["n_prompts"] == 2 for c in data["categories"].values())
    # switched off: every other stage reused, the stage's files and manifest entry gone, the page says why
    report.analyze(inputs, out, report.AnalyzeConfig(**{**CFG, "attribution": False}), progress=False)
    summary = _load(out, "summary.json")
    assert set(summary["reused"]) == others
    assert summary["attribution"] == {"skipped": "off (--no-attribution)"}
    assert not (out / "attribution.json").exists() and not (out / "attribution_set.json").exists()
    assert "attribution" not in _load(out, "manifest.json")["stages"]
    page = report.html.page_data(out)
    assert "attribution.json" not in page["files"] and page["problems"] == []
    # and on again: computed again
    report.analyze(inputs, out, report.AnalyzeConfig(**CFG), progress=False)
    assert _results(_load(out, "attribution.json")) == _results(before)


def test_a_damaged_or_foreign_stage_file_is_not_reused(bundled, tmp_path):
    from tl_modular.report.pipeline import _attribution_settings, _load_attribution

    _, src = bundled
    out = tmp_path / "r"
    shutil.copytree(src, out)
    settings = _attribution_settings(report.AnalyzeConfig(**CFG))
    assert _load_attribution(out, settings) == _load(out, "attribution.json")
    # the stage's runner computes again on ValueError (ArtifactError is one) or OSError
    with pytest.raises(ValueError, match="other settings"):
        _load_attribution(out, _attribution_settings(report.AnalyzeConfig(**CFG, n_attribution=3)))
    # a stage file of version 1 (full builds, error nodes recomputed, off by default) is built again
    saved = (out / "attribution.json").read_text()
    old = json.loads(saved)
    old["version"] = 1
    old["settings"] = {k: v for k, v in old["settings"].items() if k not in ("min_influence", "memory_gib", "errors")}
    old["settings"]["version"] = 1
    (out / "attribution.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="other settings"):
        _load_attribution(out, settings)
    (out / "attribution.json").write_text(saved)
    (out / "attribution_set.json").write_text("{not json")
    with pytest.raises(ValueError, match="attribution_set.json"):
        _load_attribution(out, settings)
    (out / "attribution_set.json").unlink()
    with pytest.raises((OSError, ValueError)):
        _load_attribution(out, settings)


def test_over_its_memory_budget_the_stage_prunes_harder_then_skips(bundled):
    from tl_modular.attribution.build import EDGE_BYTES, graph_size
    from tl_modular.report.pipeline import _attribution_settings, _feature_graphs

    inputs, out = bundled
    model, task = inputs.model, inputs.categories["induction"][:2]
    comp = Compression.load(out / "compression", model)
    settings = _attribution_settings(report.AnalyzeConfig(**CFG))
    size = graph_size(model, comp, task.clean.shape[1], max(len(set(p.tolist())) for p in task.positions))
    graphs = {m: tlm.attribution_graph(model, task, units=comp, min_influence=m) for m in (1e-4, 1e-3, 1e-2, 1e-1)}
    # what a build holds (max_edges counts it): its graph's edges, the folded ones merged into the error nodes'
    edges = {m: max(g.info["edges_built"] for g in gs) for m, gs in graphs.items()}
    nnz = {m: [g.adjacency._nnz() for g in gs] for m, gs in graphs.items()}
    assert edges[1e-3] < edges[1e-4] < size.edges

    def run(n_edges):
        gib = (size.node_bytes + EDGE_BYTES * n_edges + EDGE_BYTES - 1) / 2**30
        return _feature_graphs(model, task, comp, {**settings, "memory_gib": gib})
    # the estimate fits: the default pruned build; it does not, but the default build does: the same
    for n_edges in (size.edges, edges[1e-4]):
        got = run(n_edges)
        assert got["min_influence"] == 1e-4 and got["edges"] == nnz[1e-4]
        assert got["estimate"] == {"nodes": size.nodes, "edges": size.edges, "bytes": size.bytes}
    # room for the 1e-3 build only: ten times the min_influence, the pruned graphs those of that build
    got = run((edges[1e-3] + edges[1e-4]) // 2)
    assert got["min_influence"] == pytest.approx(1e-3) and got["edges"] == nnz[1e-3]
    assert [k.graph.adjacency._nnz() for k in got["kept"]] == [k.n_edges for k in got["kept"]]
    # room for no build up to min_influence 0.1, or not even for the nodes: skipped with the reason
    got = run(edges[1e-1] - 1)
    assert "still passed" in got["skipped"] and "raise the budget" in got["skipped"] and "kept" not in got
    got = _feature_graphs(model, task, comp, {**settings, "memory_gib": size.node_bytes / 2**30})
    assert "nodes alone" in got["skipped"] and "attribution_memory" in got["skipped"]
    with pytest.raises(ValueError, match="attribution_memory must be > 0"):
        report.AnalyzeConfig(attribution_memory=0)


def test_models_and_categories_the_builder_does_not_take_are_skipped_with_its_reason(tmp_path):
    tokens = torch.randint(0, 50, (16, 8), generator=torch.Generator().manual_seed(0))
    cfg = report.AnalyzeConfig(n_null=2, budgets=2, n_boot=5, n_random=1, batch_size=8, n_label_units=2,
                               attribution=True)
    # a gated RMSNorm model: the report analyzes it, the attribution builder does not
    model = tiny_model("gated_rms", seed=0)
    out = tmp_path / "rms"
    report.analyze(report.Inputs(model=model, tokens=tokens, name="rms", categories={"all": tokens[:8]}), out, cfg,
                   progress=False)
    data = _load(out, "attribution.json")
    reason = unsupported(model, Compression.load(out / "compression", model))
    assert reason and data["skipped"] == reason and data["categories"] == {}
    assert "LayerNorm" in reason
    assert not (out / "attribution_set.json").exists()
    assert _load(out, "summary.json")["attribution"]["skipped"] == reason
    assert report.html.page_data(out)["problems"] == []
    # a supported model whose category is plain tokens (no answers for a logit node)
    model = tiny_model("gpt2", seed=0)
    out = tmp_path / "tokens"
    report.analyze(report.Inputs(model=model, tokens=tokens, name="gpt2", categories={"all": tokens[:8]}), out, cfg,
                   progress=False)
    data = _load(out, "attribution.json")
    assert unsupported(model, Compression.load(out / "compression", model)) is None
    assert "not a tlm.Task" in data["categories"]["all"]["skipped"]
    assert data["skipped"] == "no category is a tlm.Task"


def test_attribution_flag_reaches_the_report(monkeypatch, tmp_path):
    seen = []

    def fake(inputs, out, config, **kwargs):
        seen.append(config)
        return tmp_path / "report.html"
    monkeypatch.setattr(report, "analyze", fake)
    for flag, want in (([], True), (["--attribution"], True), (["--no-attribution"], False)):
        assert cli.main(["analyze", "--model", "toy", "--out", str(tmp_path / "out"), "--quiet", *flag]) == 0
        assert seen[-1].attribution is want


def test_the_page_embeds_the_stage_file_not_the_whole_set(bundled):
    _, out = bundled
    page = report.html.page_data(out)
    assert page["files"]["attribution.json"] == _load(out, "attribution.json")
    assert "attribution_set.json" not in page["files"] and page["problems"] == []
    text = (out / "report.html").read_text()
    assert "Feature circuits" in text and "attribution_set" not in text.split('id="tlm-data"')[1].split("</script>")[0]


# --- the tab in a browser ---------------------------------------------------------------------------

def test_the_feature_circuits_tab_draws_each_task_and_the_panel_lists_a_channels_features(browser, bundled):
    _, out = bundled
    page = out / "report.html"
    browser.open(page.as_uri())
    assert browser.js("document.body.dataset.ready") == "true", browser.console_errors()
    data, summary = _load(out, "attribution.json"), _load(out, "summary.json")
    browser.click("#tab-features")
    assert browser.js("document.getElementById('view-features').hidden") is False
    assert browser.js("document.querySelectorAll('#features-table tbody tr').length") == len(TASKS)
    for name in TASKS:
        c = data["categories"][name]
        browser.click(f'#feature-categories button[data-category="{name}"]')
        assert browser.js("document.getElementById('feature-graph').dataset.category") == name
        assert browser.js("document.querySelectorAll('#feature-graph .fnode').length") == len(c["features"]) + 1
        assert browser.js("document.querySelectorAll('#feature-graph path.fedge').length") == len(c["top_edges"])
        routes = summary["circuits"]["categories"][name]
        assert browser.js("document.getElementById('feature-vs-routes').textContent").startswith(
            f"Route circuit: {routes['size']} routes, faithfulness {routes['faithfulness']:.2f}")
    # clicking a feature selects its channel; the panel lists the channel's features per task
    feature, channel = data["categories"][TASKS[-1]]["features"][0][0], data["categories"][TASKS[-1]]["features"][0][3]
    browser.click(f'#feature-graph .fnode[data-feature="{feature}"] circle')
    assert browser.js("document.getElementById('panel-title').textContent") == channel
    listed = browser.js("document.getElementById('panel-features').textContent")
    assert feature in listed
    want = sum(f[3] == channel for c in data["categories"].values() for f in c["features"])
    assert browser.js("document.querySelectorAll('#panel-features li').length") == min(want, 24)
    assert browser.console_errors() == []
    assert set(browser.requests()) <= {page.as_uri()}
