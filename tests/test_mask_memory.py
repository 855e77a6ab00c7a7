"""Bounded memory of partial route patching (issue 22: ``analyze --circuits ioi`` at GPT-2-small shape
was killed for memory at 14.6 GB in the circuit search's learnt mask): the per-hook stack of the
senders' deltas is rebuilt in the backward pass instead of kept (``torch.utils.checkpoint``), with
bitwise the same gradients and masks as when it was kept."""

from __future__ import annotations

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


def test_learnt_mask_is_bitwise_the_same(tiny_graph, monkeypatch):
    model, data, comp, graph = tiny_graph
    channels = tlm.segment(model)
    routes = sorted(graph.routes("static"))
    writers = {w.name: w for w in _routes.writers(comp, channels)}
    cat = circuits._category("all", data, model, channels, sorted({w for w, _ in routes}), writers, "mean")
    clean = circuits._patched_metric(model, channels, cat, [], 8)
    empty = circuits._patched_metric(model, channels, cat, routes, 8)

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
