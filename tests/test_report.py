"""The report directory, its page (the browser tests are in test_report_app.py), and the `tl-modular` command."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tl_modular as tlm
from tl_modular import cli, report
from tl_modular.testing import tiny_model

IDS = ("summary", "graph", "modules", "rank-fidelity", "circuits", "polysemanticity", "labels")


def _sae(d_in: int, hook: str, seed: int = 0):
    from sae_lens import StandardSAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=d_in, d_sae=32)
    cfg.metadata.hook_name = hook
    torch.manual_seed(seed)
    return StandardSAE(cfg)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    model = tiny_model("gpt2", seed=0)
    tokens = torch.randint(0, 50, (24, 10), generator=torch.Generator().manual_seed(0))
    saes = tlm.sae.SAESet([_sae(model.cfg.d_model, "blocks.1.hook_resid_mid")])
    inputs = report.Inputs(model=model, tokens=tokens, name="tiny <b>gpt2</b>", categories={"all": tokens[:16]},
                           saes=saes, modules={"modules": [["L0.H0", "L1.H0"]], "source": "a test partition"})
    cfg = report.AnalyzeConfig(n_null=5, budgets=3, n_boot=10, n_random=2, batch_size=8)
    out = tmp_path_factory.mktemp("report")
    path = report.analyze(inputs, out, cfg, progress=False)
    return inputs, cfg, out, path


def test_analyze_writes_every_artifact_and_reuses_them(tiny_report):
    inputs, cfg, out, path = tiny_report
    assert path == out / "report.html"
    for name in ("summary.json", "graph.json", "circuits.json", "modules.json", "polysemanticity.json",
                 "rank_fidelity.json", "figures/graph.png", "figures.json", "manifest.json", "labels.json"):
        assert (out / name).exists(), name
    assert (out / "compression").is_dir()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_fingerprint"] == tlm._models.fingerprint(inputs.model)
    assert set(summary["circuits"]["categories"]) == {"all"}
    given = json.loads((out / "modules.json").read_text())["given"]      # the given partition, scored
    assert given["modules"] == [["L0.H0", "L1.H0"]] and given["source"] == "a test partition"
    assert set(given["modularity"]["Q"]) >= {"value", "z", "p"}
    assert summary["polysemanticity"]["rows"]
    # a second run with the same model, data and settings recomputes nothing
    report.analyze(inputs, out, cfg, progress=False)
    again = json.loads((out / "summary.json").read_text())
    assert set(again["reused"]) >= {"compression", "graph", "modules", "circuits", "polysemanticity", "labels"}
    assert again["compression"] == summary["compression"]
    # labels: channels, then modules (members first), then polysemantic neurons, all scored offline
    labels = tlm.labeling.Labels.load(out / "labels.json")
    kinds = [lab.kind for lab in labels]
    assert kinds[0] == "channel" and "module" in kinds and all(lab.ok for lab in labels)
    # the tiny model has polysemantic neurons: some are labeled, and the unit budget is filled
    assert "neuron" in kinds and len(labels) == cfg.n_label_units
    assert kinds.index("neuron") > max(i for i, k in enumerate(kinds) if k == "module")
    # an incomplete labels stage (a budget stop, failures) is not reused
    from tl_modular.report.pipeline import _complete_labels
    data = json.loads((out / "labels_summary.json").read_text())
    assert _complete_labels(out / "labels_summary.json") == data
    data["stopped"] = "budget"
    bad = out.parent / "labels_stopped.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="incomplete"):
        _complete_labels(bad)
    # other settings make another key
    assert report.cache_key(inputs, cfg) != report.cache_key(inputs, report.AnalyzeConfig(n_null=6))
    # so do other SAE weights at the same hook, and a given partition to test
    retrained = tlm.sae.SAESet([_sae(inputs.model.cfg.d_model, "blocks.1.hook_resid_mid", seed=1)])
    assert report.cache_key(dataclasses.replace(inputs, saes=retrained), cfg) != report.cache_key(inputs, cfg)
    given = dataclasses.replace(inputs, modules={"modules": [["L0.H1", "L1.H1"]], "source": "test"})
    assert report.cache_key(given, cfg) != report.cache_key(inputs, cfg)


def _embedded(page: str) -> dict:
    tag = '<script type="application/json" id="tlm-data">'
    start = page.index(tag) + len(tag)
    return json.loads(page[start:page.index("</script>", start)])


def test_page_embeds_the_directory_json_and_opens_offline(tiny_report, tmp_path):
    _, _, out, path = tiny_report
    page = path.read_text()
    assert "tiny &lt;b&gt;gpt2&lt;/b&gt;" in page and "<b>gpt2</b>" not in page
    # nothing is fetched: a strict policy (own script and style by hash), no external source
    assert "Content-Security-Policy" in page and "default-src 'none'" in page and "'unsafe-inline'" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) and "@import" not in page
    assert page.count("<script") == 2
    # the files are the single source: the page embeds them as they are (NaN/Infinity as null)
    data = _embedded(page)
    assert data["problems"] == []
    for name in ("graph.json", "modules.json", "circuits.json", "labels.json", "polysemanticity.json",
                 "rank_fidelity.json", "compression/compression.json"):
        assert data["files"][name] == report.html._finite(json.loads((out / name).read_text())), name
    assert data["figures"] and all((out / f).exists() for f in data["figures"])
    # text that would end the data block or become markup is escaped inside the JSON
    summary = json.loads((out / "summary.json").read_text())
    shutil.copytree(out, tmp_path / "r", dirs_exist_ok=True)
    labels = json.loads((tmp_path / "r" / "labels.json").read_text())
    labels["labels"][0]["text"] = "</script><script>alert(1)</script>\u2028&amp;"
    (tmp_path / "r" / "labels.json").write_text(json.dumps(labels))
    page = report.render(summary, tmp_path / "r").read_text()
    assert "<script>alert" not in page and page.lower().count("</script") == 2
    assert _embedded(page)["files"]["labels.json"]["labels"][0]["text"] == labels["labels"][0]["text"]
    # re-rendered from the directory alone, by the module's command
    (tmp_path / "r" / "report.html").unlink()
    run = subprocess.run([sys.executable, "-m", "tl_modular.report", str(tmp_path / "r")], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and (tmp_path / "r" / "report.html").exists(), run.stderr


def test_page_names_missing_and_corrupt_files(tiny_report, tmp_path):
    _, _, out, _ = tiny_report
    d = tmp_path / "r"
    shutil.copytree(out, d)
    (d / "circuits.json").unlink()
    (d / "modules.json").write_text("{oops")
    (d / "summary.json").unlink()
    data = _embedded(report.render(None, d).read_text())
    problems = {p["file"]: p["problem"] for p in data["problems"]}
    assert "not valid JSON (line 1, column 2" in problems["modules.json"]
    assert "missing" in problems["summary.json"]
    assert "circuits.json" not in problems       # without summary.json nobody says circuits were made
    assert "graph.json" in data["files"]
    (d / "summary.json").write_text((out / "summary.json").read_text())
    data = _embedded(report.render(None, d).read_text())
    assert "missing" in {p["file"]: p["problem"] for p in data["problems"]}["circuits.json"]


# --- the command -------------------------------------------------------------------------------

def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_cli_says_how_to_run_offline_when_the_hub_is_unreachable(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HOME=str(tmp_path / "hf"))
    run = subprocess.run([sys.executable, "-m", "tl_modular.cli", "analyze", "--model", "gpt2", "--data", str(text),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2
    assert "cannot reach the Hugging Face hub" in run.stderr and "HF_HUB_OFFLINE=1" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "o").exists()


def test_cli_diff_of_a_report_with_itself_is_empty(tiny_report, tmp_path, capsys):
    _, _, out, _ = tiny_report
    assert cli.main(["diff", str(out), str(out), "--out", str(tmp_path / "d")]) == 0
    assert "no change" in capsys.readouterr().out
    assert tlm.ModelDiff.load(tmp_path / "d").is_empty


@pytest.mark.parametrize("argv, message", [
    (["analyze", "--data", "x.txt"], "--data needs --model"),
    (["analyze", "--model", "gpt2"], "--model needs --data"),
    (["analyze", "--model", "gpt2", "--data", "x.txt", "--tokens", "1"], "at least 2"),
    (["diff", "nowhere_a", "nowhere_b"], "not a report directory"),
])
def test_cli_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_data_loading(tmp_path, gpt2_small):
    with pytest.raises(cli.UsageError, match="no such file"):
        cli._load_data(str(tmp_path / "missing.txt"), gpt2_small, 256, 16)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    tokens, info = cli._load_data(str(text), gpt2_small, 64, 16)
    assert tokens.shape == (4, 16) and int(tokens[0, 0]) == gpt2_small.tokenizer.bos_token_id
    assert info["kind"] == "text" and info["used"] == 4 * 15
    import numpy as np

    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 1000, (8, 12)))
    ids, info = cli._load_data(str(tmp_path / "ids.npy"), gpt2_small, 48, 16)
    assert ids.shape == (4, 12) and (info["read"], info["used"], info["dropped"]) == (96, 48, 48)
    np.save(tmp_path / "bad.npy", np.full((2, 4), 10**6))
    with pytest.raises(cli.UsageError, match="vocabulary"):
        cli._load_data(str(tmp_path / "bad.npy"), gpt2_small, 48, 16)
    with pytest.raises(cli.UsageError, match="unknown prompt set"):
        cli._categories(cli._parser().parse_args(["analyze", "--circuits", "nope"]), gpt2_small)


@pytest.mark.slow
def test_cli_analyze_end_to_end_on_the_bundled_model(tmp_path):
    """The README's flow: `tl-modular analyze` on the bundled (modular) model, offline, then a re-run:
    the first report shows the four trained modules, their labels and the routes between them."""
    out = tmp_path / "report"
    run = subprocess.run([sys.executable, "-m", "tl_modular.cli", "analyze", "--out", str(out), "--quiet"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "report.html").exists() and (out / "graph.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["circuits"]["categories"]) == set(tlm.toy.GENERATORS)
    assert len(summary["polysemanticity"]["rows"]) > 0
    modules = summary["modules"]["modules"]
    assert {frozenset(m) for m in modules} == {frozenset(m) for m in tlm.toy.info(tlm.toy.MODULAR_DIR)["loss_modules"]}
    assert summary["modules"]["given"]["modularity"]["Q"]["z"] >= 2
    labelled = {row["unit"] for row in summary["labels"]["labels"]}
    assert {f"module:{i}" for i in range(len(modules))} <= labelled
    assert (out / "report.html").stat().st_size <= 5 * 2 ** 20
    rerun = subprocess.run([sys.executable, "-m", "tl_modular.cli", "analyze", "--out", str(out), "--quiet"],
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0
    assert "compression" in json.loads((out / "summary.json").read_text())["reused"]


@pytest.mark.slow
def test_cli_analyze_gpt2_from_an_offline_hub(tmp_path, gpt2_tokenizer_dir):
    """`--model gpt2 --data file.txt` through from_pretrained, on a 2-layer GPT-2 in a local hub cache."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    setup = ("from tl_modular.testing import write_offline_gpt2_hub as w; "
             f"w({str(gpt2_tokenizer_dir)!r}, n_layer=2, n_embd=64, n_head=4)")
    subprocess.run([sys.executable, "-c", setup], check=True, env=env, timeout=300)
    text = tmp_path / "t.txt"
    text.write_text(Path(__file__).read_text())
    run = subprocess.run([sys.executable, "-m", "tl_modular.cli", "analyze", "--model", "gpt2", "--data", str(text),
                          "--tokens", "1024", "--seq-len", "64", "--circuits", "ioi", "--out", str(tmp_path / "o"),
                          "--quiet"], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["model"] == "gpt2" and "ioi" in summary["circuits"]["categories"]
    assert summary["data"]["used"] == 16 * 63 and summary["data"]["read"] > summary["data"]["used"]
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["data"] == summary["data"]
