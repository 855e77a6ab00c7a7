"""Ctrl-C at any moment of a pass leaves the user's model exactly as it was: no hook, same weights.

A thread sends SIGINT to this process at random moments of ``compress``, ``build_graph``,
``circuits``, ``label`` and the attribution passes (``attribution_graph``, ``run_with_features``)
(every other time followed by a second interrupt a few TransformerLens calls into the unwinding,
which lands while TL removes its hooks); after each, the call either finished or
raised ``KeyboardInterrupt``, no HookPoint holds a hook (torch's dicts and TransformerLens' handle
lists) and every weight is bit-identical.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time

import pytest
import torch

import tl_modular as tlm
from tl_modular._hooks import _func_outside, hook_guard
from tl_modular.attribution import run_with_features
from tl_modular.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
MOMENTS = 50  # per entry; the whole file takes ~20 s on one core (TLM_INTERRUPT_SEED=n: other moments)


def _stray_hooks(model) -> list[str]:
    """Every hook on a HookPoint, by name; also TL's handle lists and context level."""
    found = []
    for name, hp in model.hook_dict.items():
        for attr in ("_forward_hooks", "_backward_hooks", "_forward_pre_hooks", "_backward_pre_hooks",
                     "fwd_hooks", "bwd_hooks"):
            n = len(getattr(hp, attr, None) or ())
            if n:
                found.append(f"{name}.{attr}={n}")
    if getattr(model, "context_level", 0) != 0:
        found.append(f"context_level={model.context_level}")
    return found


def _inside_library(frame) -> bool:
    while frame is not None:
        path = frame.f_code.co_filename
        if f"{os.sep}tl_modular{os.sep}" in path or f"{os.sep}transformer_lens{os.sep}" in path:
            return True
        frame = frame.f_back
    return False


SECOND = {"after_calls": 0}  # > 0: a second Ctrl-C lands that many TransformerLens calls after the first


def _second_interrupt(after_calls: int):
    count = {"n": 0}

    def tracer(frame, event, arg):
        if event == "call" and f"{os.sep}transformer_lens{os.sep}" in frame.f_code.co_filename:
            count["n"] += 1
            if count["n"] >= after_calls:
                sys.settrace(None)
                raise KeyboardInterrupt
        return None
    return tracer


@pytest.fixture()
def ctrl_c():
    """SIGINT raises KeyboardInterrupt when it lands inside tl_modular or TransformerLens (as Ctrl-C
    would), and is dropped once the call has returned, so the test's own bookkeeping is not hit.
    With ``SECOND["after_calls"]``, a second one follows within the unwinding (where hooks are removed)."""
    def handler(signum, frame):
        if _inside_library(frame):
            if SECOND["after_calls"]:
                sys.settrace(_second_interrupt(SECOND["after_calls"]))
                SECOND["after_calls"] = 0
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _fire(delays: list[float]) -> None:
    for d in delays:
        time.sleep(d)
        os.kill(os.getpid(), signal.SIGINT)


def _settle(thread: threading.Thread) -> None:
    """Wait for the sender, absorbing interrupts that land after the call returned."""
    while True:
        try:
            thread.join()
            time.sleep(0.002)  # a handler already pending runs here
            return
        except KeyboardInterrupt:
            continue


def _interrupt_at_random(model, call, seconds: float, rng: random.Random) -> dict[str, int]:
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: getattr(model.cfg, k) for k in ("use_split_qkv_input", "use_attn_in", "use_hook_mlp_in")}
    outcomes = {"interrupted": 0, "finished": 0}
    for i in range(MOMENTS):
        delays = [rng.uniform(0, seconds)]
        # every other moment, a second Ctrl-C 1-40 TransformerLens calls into the unwinding: inside
        # TL's own hook removal (reset_hooks, remove_hooks, handle.remove)
        SECOND["after_calls"] = rng.randint(1, 40) if i % 2 else 0
        sender = threading.Thread(target=_fire, args=(delays,))
        try:
            sender.start()
            call()
            outcome = "finished"
        except KeyboardInterrupt:
            outcome = "interrupted"
        finally:
            _settle(sender)
            sys.settrace(None)
            SECOND["after_calls"] = 0
        outcomes[outcome] += 1
        assert _stray_hooks(model) == [], f"moment {i} ({delays}): hooks left {_stray_hooks(model)}"
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items()), f"moment {i}: weights"
        assert {k: getattr(model.cfg, k) for k in flags} == flags, f"moment {i}: config switches changed"
        assert _func_outside(), f"moment {i}: torch.func levels left open"
    return outcomes


@pytest.fixture(scope="module")
def world(tiny_graph):
    return tiny_graph


def _entries(world):
    from tl_modular.attribution.intervention import _writers

    model, data, comp, graph = world
    target = {"positions": [8], "answers": [int(data[0, 9])]}
    rng = torch.Generator().manual_seed(0)
    masks = {w.channel.name: torch.rand(*data.shape, w.size, generator=rng) > 0.5 for w in _writers(model, comp)}
    base = {name: torch.zeros(m.shape) for name, m in masks.items()}
    return {
        "compress": lambda: tlm.compress(model, data, progress=False),
        "build_graph": lambda: tlm.build_graph(comp, model=model, tokens=data, progress=False),
        "circuits": lambda: graph.circuits(model, {"all": data[:8]}, n_boot=5, n_random=1, search="greedy",
                                           progress=False),
        "label": lambda: tlm.label(tlm.labeling.neurons(model, 0, range(8)), model, data, n_baseline=0, n_boot=20,
                                   progress=False),
        "attribution_graph": lambda: tlm.attribution_graph(model, data[:2], units=comp, target=target),
        "run_with_features": lambda: run_with_features(model, comp, data, masks, base),
    }


@pytest.mark.parametrize("entry", ["compress", "build_graph", "circuits", "label", "attribution_graph",
                                   "run_with_features"])
def test_sigint_at_random_moments_leaves_no_hook(world, entry, ctrl_c):
    model = world[0]
    call = _entries(world)[entry]
    call()  # warm: the first call is slower (caches), so it does not set the span
    times = []
    for _ in range(3):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[1]  # the median call: the moments span it
    rng = random.Random(f"{entry}-{os.environ.get('TLM_INTERRUPT_SEED', '0')}")
    outcomes = _interrupt_at_random(model, call, seconds, rng)
    assert outcomes["interrupted"] >= 5, outcomes  # the moments did land inside the call


def test_guard_removes_what_an_interrupted_removal_left():
    """TL's own removal loop stopped half way (as by a second Ctrl-C) still ends with no hook."""
    model = tiny_model("gpt2", seed=0)
    names = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.0.mlp.hook_post"]
    with pytest.raises(KeyboardInterrupt), hook_guard(model):
        model.hooks(fwd_hooks=[(n, lambda x, hook: x) for n in names]).__enter__()  # never exited by TL
        model.add_hook(names[0], lambda x, hook: x, dir="bwd")
        raise KeyboardInterrupt
    assert _stray_hooks(model) == []
    out = model(torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(out).all()
