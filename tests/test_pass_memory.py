"""Bounded memory of the route attribution passes (issue 22 item 3): ``build_graph``'s data strengths
and the circuit scores run a batch in passes of as many rows as ``routes.PASS_MEMORY`` allows, with the
same results as one pass over the whole batch."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import tl_modular as tlm
from tl_modular.graph import routes

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gpt2_small_shape_takes_one_row_of_129_per_pass():
    cfg = SimpleNamespace(d_model=768, n_heads=12, n_layers=12, d_mlp=3072, dtype=torch.float32)
    model = SimpleNamespace(cfg=cfg)
    assert routes.rows_per_pass(model, 158, 445, 129) == 1           # of build_graph's default 16
    assert routes.rows_per_pass(model, 158, 445, 129, budget=2 << 30) == 2
    assert routes.rows_per_pass(model, 158, 445, 129, budget=1) == 1   # never none
    assert routes.rows_per_pass(model, 158, 445, 16) == 9             # short prompts (circuits): more rows
    cfg64 = SimpleNamespace(**{**vars(cfg), "dtype": torch.float64})
    assert routes.rows_per_pass(SimpleNamespace(cfg=cfg64), 158, 445, 129, budget=2 << 30) == 1


def _passes(monkeypatch) -> list[int]:
    rows, real = [], routes.forward_backward

    def counted(model, channels, ws, rs, batch, *args, **kwargs):
        rows.append(batch.shape[0])
        return real(model, channels, ws, rs, batch, *args, **kwargs)
    monkeypatch.setattr(routes, "forward_backward", counted)
    return rows


def test_graph_and_circuit_scores_are_the_same_in_passes_of_one_row(tiny_graph, monkeypatch):
    model, data, comp, _ = tiny_graph
    results = {}
    for budget in (routes.PASS_MEMORY, 1):             # the tiny batch in one pass; then one row per pass
        with monkeypatch.context() as m:
            m.setattr(routes, "PASS_MEMORY", budget)
            rows = _passes(m)
            graph = tlm.build_graph(comp, model=model, tokens=data, batch_size=16, progress=False)
            n_graph = list(rows)
            circuits = graph.circuits(model, {"all": data}, n_boot=2, n_random=0, search="greedy", prune=False,
                                      batch_size=16, progress=False)
            results[budget] = graph, circuits["all"].scores, n_graph, rows[len(n_graph):]
    (whole, whole_scores, whole_rows, whole_c), (split, split_scores, split_rows, split_c) = results.values()
    assert whole_rows == [16] and split_rows == [1] * 16 and whole_c == [16] and split_c == [1] * 16
    for key in ("data", "attribution"):                # fp32 model: rounding of the per-row passes and sums
        a = np.array([d[key] for *_, d in sorted(whole.nx.edges(data=True)) if d["kind"] == "route"])
        b = np.array([d[key] for *_, d in sorted(split.nx.edges(data=True)) if d["kind"] == "route"])
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * np.abs(a).max())
    a = np.array([whole_scores[r] for r in sorted(whole_scores)])
    b = np.array([split_scores[r] for r in sorted(whole_scores)])
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * np.abs(a).max())
