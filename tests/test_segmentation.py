"""Channel segmentation: exact decomposition, names, weights, errors and hook hygiene."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer

import tl_modular as tlm
from tl_modular._models import count_hooks
from tl_modular.testing import TINY_KINDS, tiny_model

# Summing ~2*n_layers*n_heads fp32 terms of size ~1 in another order than the model does:
# a few ulps of the largest partial sum.
ATOL = 1e-5


def _decompose(model, tokens):
    channels = tlm.segment(model)
    _, cache = channels.run_with_cache(tokens)
    return channels, cache, channels.contributions(cache)


def _reference(model, tokens):
    """TransformerLens' own decomposition of the final residual stream, by label."""
    _, cache = model.run_with_cache(tokens)
    stack, labels = cache.get_full_resid_decomposition(expand_neurons=False, return_labels=True)
    return dict(zip(labels, stack, strict=True)), cache


def _check_against_reference(model, tokens, channels, parts):
    ref, cache = _reference(model, tokens)
    cfg = model.cfg
    for c in channels:
        row = parts[channels.index(c.name)]
        if c.kind == "head":
            expected = ref[f"L{c.layer}H{c.head}"]
        elif c.kind == "mlp":
            expected = ref[f"{c.layer}_mlp_out"]
        elif c.kind == "bias":
            continue  # compared summed below: TransformerLens accumulates all b_O in one row
        else:
            expected = ref[c.kind]
        torch.testing.assert_close(row, expected, atol=ATOL, rtol=0)
    biases = sum(parts[channels.index(c.name)] for c in channels.of_kind("bias"))
    torch.testing.assert_close(biases, ref["bias"], atol=ATOL, rtol=0)
    if cfg.positional_embedding_type == "shortformer":
        # TransformerLens' reference lists a pos_embed row for shortformer models although they
        # never add it to the residual stream (it only enters the query/key inputs): the
        # reference does not sum to the residual, ours does.
        assert "pos_embed" in ref and "pos_embed" not in channels
        resid = cache[channels.final_hook]
        assert not torch.allclose(sum(ref.values()), resid, atol=1e-3)
    expected_rows = set(ref) - {"bias"} - ({"pos_embed"} if "pos_embed" not in channels else set())
    assert len(expected_rows) == len(channels.of_kind("embed", "pos_embed", "head", "mlp"))


@pytest.mark.parametrize("kind", sorted(TINY_KINDS))
def test_contributions_sum_to_residual_and_match_transformer_lens(kind, tokens):
    model = tiny_model(kind, seed=3)
    channels, cache, parts = _decompose(model, tokens)
    assert parts.shape == (len(channels), *tokens.shape, model.cfg.d_model)
    torch.testing.assert_close(parts.sum(0), channels.residual(cache), atol=ATOL, rtol=0)
    _check_against_reference(model, tokens, channels, parts)
    assert count_hooks(model) == 0


def test_bridge_matches_hooked_transformer_names_and_reference(bridge, gpt2_tokenizer):
    tokens = gpt2_tokenizer(["The cat sat on the mat", "A dog ran in the park"],
                            return_tensors="pt")["input_ids"]
    channels, cache, parts = _decompose(bridge, tokens)
    cfg = bridge.cfg
    hooked_names = tlm.segment(tiny_model("gpt2", n_layers=cfg.n_layers, n_heads=cfg.n_heads)).names
    assert channels.names == hooked_names
    torch.testing.assert_close(parts.sum(0), channels.residual(cache), atol=ATOL, rtol=0)
    _check_against_reference(bridge, tokens, channels, parts)
    assert set(channels["L0.MLP"].weights) == {"W_in", "b_in", "W_out", "b_out", "ln2.w", "ln2.b"}
    assert count_hooks(bridge) == 0


def test_channel_names_order_and_hooks():
    model = tiny_model("gpt2")
    channels = tlm.segment(model)
    assert channels.names == ["embed", "pos_embed",
                              "L0.H0", "L0.H1", "L0.H2", "L0.H3", "L0.b_O", "L0.MLP",
                              "L1.H0", "L1.H1", "L1.H2", "L1.H3", "L1.b_O", "L1.MLP"]
    head = channels["L1.H2"]
    assert (head.kind, head.layer, head.head, head.kv_head) == ("head", 1, 2, 2)
    assert head.reads == ("blocks.1.hook_resid_pre",)
    assert head.input_hook == "blocks.1.ln1.hook_normalized"
    assert head.source_hook == "blocks.1.attn.hook_z"
    assert head.writes == "blocks.1.hook_resid_mid"
    mlp = channels["L0.MLP"]
    assert mlp.reads == ("blocks.0.hook_resid_mid",) and mlp.writes == "blocks.0.hook_resid_post"
    assert channels["embed"].writes == "blocks.0.hook_resid_pre"
    assert channels.final_hook == "blocks.1.hook_resid_post"
    assert "L0.MLP" in channels and "L9.MLP" not in channels
    assert [c.name for c in channels.in_layer(0)][-2:] == ["L0.b_O", "L0.MLP"]
    assert repr(channels) == "ChannelSet(14 channels: 1 embed, 1 pos_embed, 8 head, 2 bias, 2 mlp)"
    with pytest.raises(KeyError, match="no channel named 'L0.H9'"):
        channels["L0.H9"]


def test_architecture_specific_reads_and_writes():
    par = tlm.segment(tiny_model("parallel"))
    assert par["L0.H0"].writes == "blocks.0.hook_resid_post"
    assert par["L0.MLP"].reads == ("blocks.0.hook_resid_pre",)
    assert "pos_embed" not in par  # rotary: positions live inside attention
    short = tlm.segment(tiny_model("shortformer"))
    assert "pos_embed" not in short
    assert short["L1.H0"].reads == ("blocks.1.hook_resid_pre", "hook_pos_embed")
    no_norm = tlm.segment(tiny_model("no_norm"))
    assert no_norm["L0.H0"].input_hook == "blocks.0.hook_resid_pre"
    attn_only = tlm.segment(tiny_model("attn_only"))
    assert not attn_only.of_kind("mlp")
    assert attn_only["L0.H0"].writes == "blocks.0.hook_resid_post"
    gqa = tlm.segment(tiny_model("gqa"))
    assert [gqa[f"L0.H{h}"].kv_head for h in range(4)] == [0, 0, 1, 1]


def test_weights_are_transformer_lens_weights():
    model = tiny_model("gated_rms")
    channels = tlm.segment(model)
    w = channels["L1.H3"].weights
    assert set(w) == {"W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "ln1.w"}
    assert torch.equal(w["W_O"], model.blocks[1].attn.W_O[3])
    m = channels["L0.MLP"].weights
    assert set(m) == {"W_in", "b_in", "W_out", "b_out", "W_gate", "ln2.w"}
    assert m["W_in"] is model.blocks[0].mlp.W_in
    assert channels["embed"].weights["W_E"] is model.W_E
    assert channels["L0.b_O"].weights["b_O"] is model.blocks[0].attn.b_O
    ln = tlm.segment(tiny_model("gpt2"))["L0.H0"].weights
    assert {"ln1.w", "ln1.b"} <= set(ln)
    gqa_model = tiny_model("gqa")
    gqa = tlm.segment(gqa_model)
    assert torch.equal(gqa["L0.H3"].weights["W_K"], gqa_model.blocks[0].attn._W_K[1])


def test_contributions_subset_and_unbatched_cache(tokens):
    model = tiny_model("gpt2")
    channels, cache, parts = _decompose(model, tokens)
    some = ["L1.MLP", "L0.H2", "embed", "L1.b_O"]
    sub = channels.contributions(cache, channels=some)
    torch.testing.assert_close(sub, parts[[channels.index(n) for n in some]])
    _, single = channels.run_with_cache(tokens[:1], remove_batch_dim=True)
    one = channels.contributions(single)
    assert one.shape == (len(channels), tokens.shape[1], model.cfg.d_model)
    torch.testing.assert_close(one, parts[:, 0], atol=ATOL, rtol=0)


def test_names_filter_caches_only_what_is_needed(tokens):
    model = tiny_model("gpt2")
    channels = tlm.segment(model)
    _, cache = channels.run_with_cache(tokens)
    assert set(cache.keys()) == set(channels.hook_names)
    assert set(channels.hook_names) == {"hook_embed", "hook_pos_embed", "blocks.0.attn.hook_z",
                                        "blocks.1.attn.hook_z", "blocks.0.hook_mlp_out",
                                        "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"}


def test_missing_activation_says_how_to_cache(tokens):
    model = tiny_model("gpt2")
    channels = tlm.segment(model)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("resid_post"))
    with pytest.raises(KeyError, match="names_filter=channels.names_filter"):
        channels.contributions(cache)


def test_follows_model_dtype(tokens):
    model = tiny_model("gpt2", dtype=torch.float64)
    channels, cache, parts = _decompose(model, tokens)
    assert parts.dtype == torch.float64
    # fp64: the sum is exact to ~1e-15 relative.
    torch.testing.assert_close(parts.sum(0), channels.residual(cache), atol=1e-12, rtol=0)
    model32 = model.to(torch.float32)
    c32, cache32, p32 = _decompose(model32, tokens)
    assert p32.dtype == torch.float32 and c32["L0.H0"].weights["W_O"].dtype == torch.float32


def test_no_hooks_left_when_a_run_raises():
    model = tiny_model("gpt2")
    channels = tlm.segment(model)
    bad = torch.full((1, 4), 10_000)  # out of vocabulary: the embedding lookup raises
    with pytest.raises(IndexError):
        channels.run_with_cache(bad)
    assert count_hooks(model) == 0
    too_long = torch.zeros((1, model.cfg.n_ctx + 5), dtype=torch.long)
    with pytest.raises((IndexError, RuntimeError, ValueError)):
        channels.run_with_cache(too_long)
    assert count_hooks(model) == 0


def test_segment_does_not_touch_the_model():
    model = tiny_model("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    channels = tlm.segment(model)
    channels.contributions(channels.run_with_cache(torch.zeros((1, 3), dtype=torch.long))[1])
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert count_hooks(model) == 0


# --- unsupported models -------------------------------------------------------------------

@pytest.mark.parametrize("overrides, feature", [
    ({"num_experts": 4, "experts_per_token": 2, "gated_mlp": True}, "mixture-of-experts"),
    ({"post_embedding_ln": True}, "LayerNorm after the embeddings"),
    ({"use_normalization_before_and_after": True, "normalization_type": "RMS"},
     "normalization after attention"),
    ({"original_architecture": "Olmo2ForCausalLM"}, "post-norm"),
])
def test_unsupported_architectures_raise_clearly(overrides, feature):
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32,
                                  d_vocab=20, n_ctx=8, act_fn="gelu", **overrides)
    model = HookedTransformer(cfg)
    with pytest.raises(tlm.UnsupportedModelError, match=feature) as info:
        tlm.segment(model)
    assert "Supported:" in str(info.value)
    assert count_hooks(model) == 0


def test_encoders_and_foreign_models_are_refused():
    from transformer_lens import HookedEncoder, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32,
                                  d_vocab=20, n_ctx=8, act_fn="gelu")
    with pytest.raises(tlm.UnsupportedModelError, match="encoder"):
        tlm.segment(HookedEncoder(cfg))
    with pytest.raises(TypeError, match="HookedTransformer or TransformerBridge"):
        tlm.segment(torch.nn.Linear(3, 3))


def test_unknown_component_is_refused():
    model = tiny_model("gpt2")
    model.blocks[1].mlp = torch.nn.Identity()
    with pytest.raises(tlm.UnsupportedModelError, match="MLP module Identity in layer 1"):
        tlm.segment(model)


def test_bridge_outside_compatibility_mode_is_refused(gpt2_tokenizer):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(gpt2_tokenizer)))
    raw = TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=gpt2_tokenizer)
    with pytest.raises(tlm.UnsupportedModelError, match="enable_compatibility_mode"):
        tlm.segment(raw)


@pytest.mark.slow
def test_gpt2_small_from_offline_hub(gpt2_small, gpt2_tokenizer):
    """The real from_pretrained("gpt2") path (random weights, real config and tokenizer)."""
    channels = tlm.segment(gpt2_small)
    assert len(channels) == 2 + 12 * (12 + 2)
    assert len(channels.of_kind("head", "mlp")) == 156
    tokens = gpt2_small.to_tokens(["Hello world, this is GPT-2.", "Offline and exact."])
    assert tokens[0, 0].item() == 50256  # the BOS the real tokenizer prepends
    _, cache = channels.run_with_cache(tokens)
    parts = channels.contributions(cache)
    # 12 layers of fp32 sums with residual norms ~O(10): looser absolute tolerance.
    torch.testing.assert_close(parts.sum(0), channels.residual(cache), atol=1e-4, rtol=1e-5)
    _check_against_reference_loose(gpt2_small, tokens, channels, parts)
    assert count_hooks(gpt2_small) == 0


def _check_against_reference_loose(model, tokens, channels, parts):
    ref, _ = _reference(model, tokens)
    for c in channels.of_kind("head", "mlp", "embed", "pos_embed"):
        key = {"head": f"L{c.layer}H{c.head}", "mlp": f"{c.layer}_mlp_out"}.get(c.kind, c.kind)
        torch.testing.assert_close(parts[channels.index(c.name)], ref[key], atol=1e-4, rtol=1e-5)
