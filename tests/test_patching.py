"""Route and activation patching, against TransformerLens' own patching and exact identities."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import patching as tl_patching

import tl_modular as tlm
from tl_modular._models import count_hooks
from tl_modular.patching import (
    capture_writes,
    channel_effect,
    mean_writes,
    patch_channels,
    patch_routes,
    path_effect,
    ports,
    route_effect,
    split_inputs,
    valid_route,
)
from tl_modular.tasks.task import Task
from tl_modular.testing import tiny_model

ATOL = 1e-5  # fp32 logits of a tiny model (|logit| ~ 1): a few ulps after re-ordered sums


def _task(model, seed=0, batch=4, pos=6):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=g)
    corrupted = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=g)
    positions = torch.tensor([[pos - 2, pos - 1]] * batch)
    answers = torch.randint(0, model.cfg.d_vocab, (batch, 2), generator=g)
    wrong = torch.randint(0, model.cfg.d_vocab, (batch, 2), generator=g)
    return Task(name="random", clean=clean, corrupted=corrupted, positions=positions,
                answers=answers, wrong_answers=wrong)


@pytest.mark.parametrize("kind", ["gpt2", "parallel", "gqa", "shortformer", "attn_only"])
def test_patching_every_route_out_of_a_channel_equals_activation_patching(kind):
    model = tiny_model(kind, seed=1)
    channels = tlm.segment(model)
    task = _task(model)
    for sender in ["embed", "L0.H1", "L0.MLP" if "L0.MLP" in channels else "L0.H2"]:
        source = capture_writes(model, channels, task.corrupted, [sender])
        outgoing = [(sender, p) for p in ports(channels) if valid_route(channels, sender, p)]
        if kind == "gqa":  # a key/value port reaches its whole group: patch each group once
            outgoing = [(s, p) for s, p in outgoing if not p.endswith((":k", ":v"))
                        or int(p.split(".H")[1][0]) % 2 == 0]
        by_routes = patch_routes(model, channels, task.clean, outgoing, source)
        by_channel = patch_channels(model, channels, task.clean, [sender], source)
        torch.testing.assert_close(by_routes, by_channel, atol=ATOL, rtol=0)
        assert not torch.allclose(by_channel, model(task.clean), atol=1e-3)
    assert count_hooks(model) == 0


def test_head_patching_matches_transformer_lens_activation_patching():
    model = tiny_model("gpt2", seed=2)
    channels = tlm.segment(model)
    task = _task(model, seed=3)
    _, corrupted_cache = model.run_with_cache(task.corrupted)
    # TransformerLens patches the cached run's z into the run on its first argument.
    reference = tl_patching.get_act_patch_attn_head_out_all_pos(
        model, task.clean, corrupted_cache, lambda logits: task.metric(logits))
    heads = [c.name for c in channels.of_kind("head")]
    source = capture_writes(model, channels, task.corrupted, heads)
    for c in channels.of_kind("head"):
        ours = task.metric(patch_channels(model, channels, task.clean, [c.name], source))
        torch.testing.assert_close(ours, reference[c.layer, c.head], atol=ATOL, rtol=0)


def test_route_to_unembed_from_the_last_layer_is_its_direct_effect():
    model = tiny_model("gpt2", seed=4)
    channels = tlm.segment(model)
    task = _task(model)
    source = capture_writes(model, channels, task.corrupted, ["L1.H0"])
    clean = capture_writes(model, channels, task.clean, ["L1.H0"])
    patched = patch_routes(model, channels, task.clean, [("L1.H0", "unembed")], source)
    # By hand: shift the final residual stream by the write difference, then ln_final + unembed.
    _, cache = model.run_with_cache(task.clean)
    resid = cache["blocks.1.hook_resid_post"] + source["L1.H0"] - clean["L1.H0"]
    expected = model.unembed(model.ln_final(resid))
    torch.testing.assert_close(patched, expected, atol=ATOL, rtol=0)


def test_route_into_one_port_leaves_the_others_clean():
    model = tiny_model("gpt2", seed=5)
    channels = tlm.segment(model)
    task = _task(model)
    source = capture_writes(model, channels, task.corrupted, ["L0.H0"])
    _, cache = model.run_with_cache(task.clean)
    seen = {}
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_q", lambda a, hook: seen.setdefault("q", a)),
                                ("blocks.1.attn.hook_k", lambda a, hook: seen.setdefault("k", a))]):
        patch_routes(model, channels, task.clean, [("L0.H0", "L1.H2:k")], source)
    torch.testing.assert_close(seen["q"], cache["blocks.1.attn.hook_q"])            # untouched
    torch.testing.assert_close(seen["k"][:, :, [0, 1, 3]], cache["blocks.1.attn.hook_k"][:, :, [0, 1, 3]])
    assert not torch.allclose(seen["k"][:, :, 2], cache["blocks.1.attn.hook_k"][:, :, 2])


def test_patching_with_clean_source_changes_nothing():
    model = tiny_model("gated_rms", seed=6)
    channels = tlm.segment(model)
    task = _task(model)
    clean = capture_writes(model, channels, task.clean)
    routes = [(s, p) for s in channels.names for p in ports(channels) if valid_route(channels, s, p)]
    torch.testing.assert_close(patch_routes(model, channels, task.clean, routes, clean),
                               model(task.clean), atol=ATOL, rtol=0)


def test_mean_and_zero_baselines_and_effects():
    model = tiny_model("gpt2", seed=7)
    task = _task(model)
    channels = tlm.segment(model)
    means = mean_writes(model, channels, task.clean, ["L0.H1"])
    assert means["L0.H1"].shape == (task.clean.shape[1], model.cfg.d_model)
    flat = mean_writes(model, channels, task.clean, ["L0.H1"], per_position=False)
    assert flat["L0.H1"].shape == (model.cfg.d_model,)
    effect = route_effect(model, task, [("L0.H1", "L1.H0:v")])
    gap = effect.clean - effect.corrupted
    assert effect.fraction == pytest.approx((effect.clean - effect.patched) / gap)
    zero = channel_effect(model, task, ["L0.H1"], baseline="zero")
    assert zero.patched != pytest.approx(zero.clean)
    # Patching the corrupted write of every channel reproduces the corrupted run.
    everything = channel_effect(model, task, [c.name for c in channels if c.kind != "bias"])
    assert everything.patched == pytest.approx(everything.corrupted, abs=1e-4)
    assert everything.fraction == pytest.approx(1.0, abs=1e-4)


def _plain_sum(model, channels, tokens, routes, source, weights=None):
    """Reference route patching: each port adds Σ weight · (source - write) over its routes' senders."""
    from tl_modular.patching import _port
    from tl_modular.patching import channel_write as _write
    weights = [1.0] * len(routes) if weights is None else weights
    by_port = {}
    for (s, p), w in zip(routes, weights, strict=True):
        by_port.setdefault(p, []).append((channels[s], w))
    current = {}
    hooks = [(h, lambda a, hook: current.__setitem__(hook.name, a)) for h in
             sorted({channels[s].source_hook for s, _ in routes if channels[s].source_hook})]
    for p, cs in by_port.items():
        hook, index, _ = _port(channels, p)

        def fn(a, hook, cs=cs, index=index):
            like = a if index is None else a[..., index, :]
            d = sum(w * (source[c.name].to(like) - _write(c, current.get(c.source_hook), like)) for c, w in cs)
            a = a.clone()
            if index is None:
                a += d
            else:
                a[..., index, :] += d
            return a
        hooks.append((hook, fn))
    with split_inputs(model), model.hooks(fwd_hooks=hooks):
        return model(tokens)


@pytest.mark.parametrize("kind", ["gpt2", "parallel", "shortformer"])
@torch.no_grad()
def test_many_routes_match_a_plain_sum_over_senders(kind):
    """Patching most routes into a port goes through "all upstream minus the rest": check it against
    a plain sum of (source - write) over the patched senders of each port."""
    model = tiny_model(kind, seed=5, n_layers=3)
    task = _task(model)
    channels = tlm.segment(model)
    senders = [c.name for c in channels if c.kind != "bias"]
    every = [(s, p) for s in senders for p in ports(channels) if valid_route(channels, s, p)]
    rng = torch.Generator().manual_seed(0)
    for keep in (0.9, 0.5, 0.1):
        routes = [r for r in every if torch.rand(1, generator=rng) < keep]
        source = capture_writes(model, channels, task.corrupted, senders)
        got = patch_routes(model, channels, task.clean, routes, source)
        torch.testing.assert_close(got, _plain_sum(model, channels, task.clean, routes, source), atol=ATOL, rtol=0)
    assert count_hooks(model) == 0


@pytest.mark.parametrize("kind", ["gpt2", "gqa", "attn_only"])
def test_partial_patching_interpolates_each_route_and_is_differentiable(kind):
    model = tiny_model(kind, seed=6, n_layers=2)
    task = _task(model)
    channels = tlm.segment(model)
    senders = [c.name for c in channels if c.kind != "bias"]
    routes = [(s, p) for s in senders for p in ports(channels) if valid_route(channels, s, p)]
    source = capture_writes(model, channels, task.corrupted, senders)
    amount = torch.rand(len(routes), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(patch_routes(model, channels, task.clean, routes, source, amount=amount),
                                   _plain_sum(model, channels, task.clean, routes, source, amount.tolist()),
                                   atol=ATOL, rtol=0)
        full = patch_routes(model, channels, task.clean, routes, source)
        torch.testing.assert_close(patch_routes(model, channels, task.clean, routes, source,
                                                amount=torch.ones(len(routes))), full, atol=ATOL, rtol=0)
        torch.testing.assert_close(patch_routes(model, channels, task.clean, routes, source,
                                                amount=torch.zeros(len(routes))), model(task.clean), atol=ATOL, rtol=0)
    # the gradient w.r.t. the amounts matches central differences of the metric
    amount = amount.double().requires_grad_(True)
    f = lambda a: task.metric(patch_routes(model, channels, task.clean, routes, source, amount=a))  # noqa: E731
    (grad,) = torch.autograd.grad(f(amount), [amount])
    for i in torch.randperm(len(routes), generator=torch.Generator().manual_seed(2))[:4].tolist():
        e = torch.zeros_like(amount)
        e[i] = 1e-2
        with torch.no_grad():
            numeric = (f(amount + e) - f(amount - e)) / 2e-2
        assert float(grad[i]) == pytest.approx(float(numeric), abs=2e-3 * (1 + abs(float(numeric))))
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="one value per route"):
        patch_routes(model, channels, task.clean, routes, source, amount=torch.ones(3))
    assert count_hooks(model) == 0


@pytest.mark.parametrize("kind", ["gpt2", "no_norm"])
@torch.no_grad()
def test_path_patching(kind):
    model = tiny_model(kind, seed=3, n_layers=3)
    task = _task(model)
    channels = tlm.segment(model)
    downstream = [p for p in ports(channels) if valid_route(channels, "L0.H1", p)]
    # every direct edge out of the sender is the sender's activation patching
    whole = channel_effect(model, task, ["L0.H1"])
    assert path_effect(model, task, "L0.H1", downstream, through_mlps=False).patched == pytest.approx(
        whole.patched, abs=ATOL)
    # without MLPs the path is the direct edge
    keys = ["L2.H0:k", "L2.H3:q"]
    direct = route_effect(model, task, [("L0.H1", k) for k in keys])
    assert path_effect(model, task, "L0.H1", keys, through_mlps=False).patched == pytest.approx(direct.patched,
                                                                                             abs=ATOL)
    # with MLPs the two in between are recomputed: the same as patching the sender's edges into
    # them, capturing their outputs, and sending those on to the receivers only
    corrupt = capture_writes(model, channels, task.corrupted, ["L0.H1"])
    source = dict(corrupt)
    for mlp, earlier in (("L0.MLP", []), ("L1.MLP", ["L0.MLP"])):
        out = {}
        keep = lambda a, hook, out=out: out.__setitem__("w", a.clone())  # noqa: E731
        with model.hooks(fwd_hooks=[(channels[mlp].source_hook, keep)]):
            patch_routes(model, channels, task.clean, [("L0.H1", mlp)] + [(m, mlp) for m in earlier], source)
        source[mlp] = out["w"]
    routes = [(s, k) for s in ("L0.H1", "L0.MLP", "L1.MLP") for k in keys]
    expected = float(task.metric(patch_routes(model, channels, task.clean, routes, source)))
    assert path_effect(model, task, "L0.H1", keys).patched == pytest.approx(expected, abs=ATOL)
    assert count_hooks(model) == 0
    with pytest.raises(ValueError, match="does not exist"):
        path_effect(model, task, "L1.H0", ["L0.H1:k"])


def test_invalid_routes_and_ports_raise_and_leave_no_hooks():
    model = tiny_model("gpt2")
    channels = tlm.segment(model)
    task = _task(model)
    source = capture_writes(model, channels, task.corrupted, ["L1.H0", "L0.H0"])
    with pytest.raises(ValueError, match="does not exist"):
        patch_routes(model, channels, task.clean, [("L1.H0", "L0.H1:q")], source)
    with pytest.raises(KeyError, match="unknown port"):
        patch_routes(model, channels, task.clean, [("L0.H0", "L1.H0:x")], source)
    with pytest.raises(KeyError, match="no source value"):
        patch_routes(model, channels, task.clean, [("L0.H2", "L1.H0:q")], source)
    assert valid_route(channels, "L0.H0", "L0.MLP")       # heads write resid_mid, the MLP reads it
    assert not valid_route(channels, "L0.MLP", "L0.H0:q")
    assert count_hooks(model) == 0
    assert not model.cfg.use_split_qkv_input and not model.cfg.use_hook_mlp_in


def test_split_inputs_restores_flags_on_error():
    model = tiny_model("gpt2")
    with pytest.raises(RuntimeError), split_inputs(model):
        assert model.cfg.use_split_qkv_input and model.cfg.use_hook_mlp_in
        raise RuntimeError("boom")
    assert not model.cfg.use_split_qkv_input and not model.cfg.use_hook_mlp_in


def test_bridge_route_patching(bridge, gpt2_tokenizer):
    channels = tlm.segment(bridge)
    tokens = gpt2_tokenizer(["The cat sat on the mat", "A dog ran in the big park"][:1],
                            return_tensors="pt")["input_ids"]
    corrupted = gpt2_tokenizer(["The dog ran on the rug"], return_tensors="pt")["input_ids"]
    assert tokens.shape == corrupted.shape
    source = capture_writes(bridge, channels, corrupted, ["L0.H1"])
    outgoing = [("L0.H1", p) for p in ports(channels) if valid_route(channels, "L0.H1", p)]
    by_routes = patch_routes(bridge, channels, tokens, outgoing, source)
    by_channel = patch_channels(bridge, channels, tokens, ["L0.H1"], source)
    torch.testing.assert_close(by_routes, by_channel, atol=1e-4, rtol=1e-4)
    assert count_hooks(bridge) == 0
