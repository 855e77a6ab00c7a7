"""`tl-modular analyze --model textlm`: the bundled real-text GPT-2 through the whole flow, in process."""

from __future__ import annotations

import functools
import json

import pytest

from tl_modular import cli, report, textlm

# The CLI's options keep the data small (--tokens, --seq-len); the report's settings and the prompts
# per circuit category are shrunk as tests/test_faults.py does: circuits dominate (four prompt sets;
# `--circuits induction` alone, at the CLI's 32 prompts, takes longer than these four at 4 each).
_SMALL = {"n_null": 2, "budgets": 2, "n_boot": 5, "n_random": 1, "batch_size": 8, "n_label_units": 4,
          "max_score_tokens": 512}


@pytest.mark.slow
def test_cli_analyze_textlm_writes_the_report_and_records_its_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "AnalyzeConfig", functools.partial(report.AnalyzeConfig, **_SMALL))
    monkeypatch.setattr(report, "textlm_inputs", functools.partial(report.textlm_inputs, n_examples=4))
    out = tmp_path / "report"
    assert cli.main(["analyze", "--model", "textlm", "--tokens", "512", "--seq-len", "64", "--out", str(out),
                     "--quiet"]) == 0
    assert f"report: {out}" in capsys.readouterr().out
    for name in ("report.html", "summary.json", "manifest.json"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert "textlm" in summary["model"]
    assert summary["n_sequences"] == 512 // 64 and summary["n_tokens"] == 512
    data = summary["data"]
    assert data["used"] == 8 * 63 and data["rows"] == 8 and data["seq_len"] == 64
    assert data["read"] == len(textlm.token_stream("train")) and data["dropped"] == data["read"] - data["used"]
    assert json.loads((out / "manifest.json").read_text())["data"] == data
    assert set(summary["circuits"]["categories"]) == {"ioi", "greater_than", "docstring", "induction"}
    assert "textlm" in (out / "report.html").read_text(encoding="utf-8")
