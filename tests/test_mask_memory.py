"""Bounded memory of partial route patching (issue 22: ``analyze --circuits ioi`` at GPT-2-small shape
was killed for memory at 14.6 GB in the circuit search's learnt mask): the per-hook stack of the
senders' deltas is rebuilt in the backward pass instead of kept (``torch.utils.checkpoint``), with
bitwise the same gradients and masks as when it was kept; and a step's batch of prompts runs in
passes of at most ``mask_rows`` prompts, the gradient accumulated (the same to fp32 rounding)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import tl_modular as tlm
from tl_modular import circuits, patching
from tl_modular.graph import routes as _routes
from tl_modular.patching import capture_writes, patch_routes, ports, valid_route
from tl_modular.tasks.task import Task
from tl_modular.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _kept_stack(monkeypatch) -> None:
    """Partial patching as before the bound: the stack kept for the backward pass."""
    monkeypatch.setattr(patching, "checkpoint", lambda fn, *args, use_reentrant: fn(*args))


def _setup(kind):
    model = tiny_model(kind, seed=6, n_layers=2)
    g = torch.Generator().manual_seed(0)
    clean, corrupted = (torch.randint(0, model.cfg.d_vocab, (4, 6), generator=g) for _ in range(2))
    answers, wrong = (torch.randint(0, model.cfg.d_vocab, (4, 2), generator=g) for _ in range(2))
    task = Task(name="random", clean=clean, corrupted=corrupted, positions=torch.tensor([[4, 5]] * 4),
                answers=answers, wrong_answers=wrong)
    channels = tlm.segment(model)
    senders = [c.name for c in channels if c.kind != "bias"]
    routes = [(s, p) for s in senders for p in ports(channels) if valid_route(channels, s, p)]
    return model, task, channels, routes, capture_writes(model, channels, task.corrupted, senders)


def _grad_and_saved(model, task, channels, routes, source):
    """The metric's gradient w.r.t. the amounts, and the bytes the forward saved for the backward
    (each storage once: the checkpoint saves its inputs, the deltas, which the run holds anyway)."""
    amount = torch.rand(len(routes), generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        metric = task.metric(patch_routes(model, channels, task.clean, routes, source, amount=amount))
    (grad,) = torch.autograd.grad(metric, [amount])
    return grad, sum(saved.values())


@pytest.mark.parametrize("kind", ["gpt2", "gqa", "attn_only"])
def test_partial_patching_gradient_is_bitwise_the_same_and_keeps_no_stack(kind, monkeypatch):
    model, task, channels, routes, source = _setup(kind)
    grad, saved = _grad_and_saved(model, task, channels, routes, source)
    with monkeypatch.context() as m:
        _kept_stack(m)
        kept_grad, kept_saved = _grad_and_saved(model, task, channels, routes, source)
    assert grad.abs().sum() > 0 and torch.equal(grad, kept_grad)
    # the stacks took every hook point's senders × [batch, pos, d_model] floats; the checkpoints
    # save each sender's delta once instead
    d = model.cfg.d_model * 4 * task.clean.numel()
    by_hook: dict[str, set[str]] = {}
    for s, p in routes:
        by_hook.setdefault(patching._port(channels, p)[0], set()).add(s)
    stacks, deltas = sum(len(s) for s in by_hook.values()) * d, len({s for s, _ in routes}) * d
    assert stacks > 2 * deltas and kept_saved - saved >= 0.99 * (stacks - deltas)
    assert all(p.grad is None for p in model.parameters())


def _mask_setup(tiny_graph):
    model, data, comp, graph = tiny_graph
    channels = tlm.segment(model)
    routes = sorted(graph.routes("static"))
    writers = {w.name: w for w in _routes.writers(comp, channels)}
    cat = circuits._category("all", data, model, channels, sorted({w for w, _ in routes}), writers, "mean")
    clean = circuits._patched_metric(model, channels, cat, [], 8)
    empty = circuits._patched_metric(model, channels, cat, routes, 8)
    return model, channels, routes, cat, clean, empty


def test_learnt_mask_is_bitwise_the_same(tiny_graph, monkeypatch):
    model, channels, routes, cat, clean, empty = _mask_setup(tiny_graph)

    def faithful(kept):
        m = circuits._patched_metric(model, channels, cat, [r for r in routes if r not in set(kept)], 8)
        return circuits._ratio(m - empty, clean - empty), m

    def learn():
        return circuits._learn_mask(model, channels, cat, routes, clean, empty, 0.9, faithful, steps=12,
                                    batch_size=8, check_every=4)
    theta, best = learn()
    with monkeypatch.context() as m:
        _kept_stack(m)
        kept_theta, kept_best = learn()
    assert np.abs(theta - 3.0).max() > 0.1                 # the mask moved
    assert np.array_equal(theta, kept_theta) and best == kept_best


def _passes(monkeypatch) -> list[int]:
    """The prompts of every patched pass, as they run."""
    rows, real = [], circuits.patch_routes

    def counted(model, channels, tokens, *args, **kwargs):
        rows.append(len(tokens))
        return real(model, channels, tokens, *args, **kwargs)
    monkeypatch.setattr(circuits, "patch_routes", counted)
    return rows


def test_mask_gradient_in_passes_equals_the_whole_batch(tiny_graph, monkeypatch):
    model, channels, routes, cat, _, _ = _mask_setup(tiny_graph)
    theta = torch.randn(len(routes), generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    index = slice(2, 16)                                   # 14 prompts: one pass, or passes of 4, 5, 5

    def metric_and_grad(rows):
        m = circuits._mask_metric(model, channels, cat, routes, index, torch.sigmoid(theta), rows)
        (g,) = torch.autograd.grad(10 * (1 - m) ** 2, [theta])     # a non-linear loss of the mean, as the mask's
        return float(m.detach()), g
    passes = _passes(monkeypatch)
    m, g = metric_and_grad(14)
    m3, g3 = metric_and_grad(5)
    assert passes == [14, 4, 5, 5]
    assert g.abs().max() > 0 and not torch.equal(g, g3)   # different sums of floats, the same numbers:
    assert m3 == pytest.approx(m, rel=1e-12)             # the metric sums in fp64 (measured: 2e-16)
    # the gradient's backward runs in fp32 (eps 1.2e-7), its sums over prompts split differently:
    # measured 2e-7 of its largest entry
    torch.testing.assert_close(g3, g, rtol=1e-5, atol=1e-6 * float(g.abs().max()))
    assert all(p.grad is None for p in model.parameters())


def test_learnt_mask_in_passes_chooses_the_same_routes(tiny_graph, monkeypatch):
    model, channels, routes, cat, clean, empty = _mask_setup(tiny_graph)
    checked = []

    def faithful(kept):
        checked.append(len(kept))
        m = circuits._patched_metric(model, channels, cat, [r for r in routes if r not in set(kept)], 16)
        return circuits._ratio(m - empty, clean - empty), m

    def learn(rows):
        return circuits._learn_mask(model, channels, cat, routes, clean, empty, 0.9, faithful, steps=12,
                                    batch_size=16, check_every=4, rows=rows)
    passes = _passes(monkeypatch)
    theta, best = learn(None)                               # the bundled shape: one pass of the batch
    assert set(passes) == {16}
    passes.clear()
    theta3, best3 = learn(6)
    assert set(passes) == {5, 6} and len(passes) == 12 * 3
    assert np.abs(theta - 3.0).max() > 0.1 and np.abs(theta).min() > 1e-3     # moved; no θ at the edge
    np.testing.assert_allclose(theta3, theta, rtol=0, atol=1e-4)
    assert np.array_equal(theta3 > 0, theta > 0) and best3 == best


def test_mask_rows_bound_gpt2_small_within_6_gb():
    # 158 senders (144 heads, 12 MLPs, the embeddings), analyze's 32 prompts of 16 tokens: 3 passes
    # of at most 11 prompts (measured: 0.27 GB a prompt over a 1.6 GB base, benchmarks/circuit_mask_memory.py)
    model = SimpleNamespace(cfg=SimpleNamespace(d_model=768, n_layers=12, n_heads=12, d_vocab=50257,
                                                dtype=torch.float32))
    assert circuits.mask_rows(model, 158, 16) == 11
    assert circuits.mask_rows(model, 158, 16, budget=1) == 1
    assert circuits.mask_rows(tiny_model("gpt2", seed=0), 30, 10) >= 32       # the bundled shape: one pass
