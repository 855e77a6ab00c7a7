"""The name grammar (_names): every name round-trips, hooks are TransformerLens' own, stream order agrees
with the hooks, and the shared plumbing (_tokens, _stats) keeps its rules."""

import pytest
import torch

import tl_modular as tlm
from tl_modular import _names, _stats, _tokens
from tl_modular.patching import ports, valid_route
from tl_modular.testing import tiny_model


@pytest.fixture(scope="module")
def channels():
    return tlm.segment(tiny_model())


def test_every_channel_and_port_round_trips(channels):
    for name in [*channels.names, *ports(channels)]:
        parsed = _names.parse(name)
        assert str(parsed) == name
        assert parsed.channel == (name.partition(":")[0] if name != "unembed" else "unembed")
        if parsed.kind in ("head", "mlp", "bias"):
            c = channels[name]
            assert (parsed.kind, parsed.layer, parsed.head) == (c.kind, c.layer, c.head)


@pytest.mark.parametrize("name,kind,fields", [
    ("L0.MLP.N12", "neuron", dict(layer=0, index=12)),
    ("L1.H3:q.d0", "direction", dict(layer=1, head=3, path="q", index=0)),
    ("L2.MLP:in.d4", "direction", dict(layer=2, path="in", index=4)),
    ("L1.H3:write.d1", "direction", dict(layer=1, head=3, path="write", index=1)),
    ("L1.b_O", "bias", dict(layer=1)),
    ("sae:blocks.0.hook_mlp_out/F17", "feature", dict(hook="blocks.0.hook_mlp_out", index=17, layer=None)),
    ("module:3", "module", dict(index=3, layer=None)),
])
def test_unit_names(name, kind, fields):
    parsed = _names.parse(name)
    assert parsed.kind == kind and str(parsed) == name
    assert all(getattr(parsed, k) == v for k, v in fields.items())


@pytest.mark.parametrize("bad", ["L1", "H3", "L1.H3:x", "L1.MLP:q", "L1.H3.N2", "l1.h3", "L1.MLP.N", "",
                                 "module:", "module:x", "sae:/F1", "sae:blocks.0.hook_z/17"])
def test_bad_names_say_what_is_expected(bad):
    with pytest.raises(ValueError, match="L1.H3|heads have ports"):
        _names.parse(bad)


def test_formatters_agree_with_parse():
    assert _names.parse(_names.direction_name("L2.H1", "k", 3)) == _names.Name("direction", 2, 1, "k", 3)
    assert _names.parse(_names.feature_name("blocks.1.hook_resid_pre", 5)).hook == "blocks.1.hook_resid_pre"
    assert _names.parse(_names.module_name(0)) == _names.Name("module", index=0)
    assert _names.norm_scale_hook("blocks.0.ln1.hook_normalized") == _names.act_name("scale", 0, "ln1")
    with pytest.raises(ValueError, match="no single channel"):
        _ = _names.parse("module:1").channel


def test_units_carry_their_identity(channels):
    """Every unit the constructors build parses back to its own fields, and ``unit_named`` rebuilds it
    from its name alone (the report turns saved unit names back into units this way)."""
    from tl_modular import labeling

    model = channels.model
    comp = tlm.compress(model, torch.randint(0, model.cfg.d_vocab, (4, 8), generator=torch.Generator().manual_seed(0)),
                        rank=2, progress=False)
    units = [*labeling.neurons(model, 1, [0, 5]), *labeling.channel_units(model, ["L0.H1", "L1.MLP"]),
             *labeling.direction_units(model, comp, "L1.H0", max_per_side=2)]
    for u in units:
        ident = u.identity
        assert str(ident) == u.name
        if u.kind == "neuron":
            assert (ident.layer, ident.index) == (u.info["layer"], u.info["index"])
            assert u.hooks == (_names.act_name("post", ident.layer),)
        assert labeling.unit_named(model, u.name, comp=comp) == u
    assert {u.kind for u in units} == {"neuron", "channel", "direction"}
    with pytest.raises(ValueError, match="pass comp="):
        labeling.unit_named(model, "L1.H0:q.d0")
    with pytest.raises(ValueError, match="module_unit"):
        labeling.unit_named(model, "module:0")


def test_hooks_are_transformer_lens_names(channels):
    model = channels.model
    for c in channels:
        for hook in (*c.reads, c.input_hook, c.source_hook, c.writes):
            assert hook is None or hook in model.hook_dict
    assert _names.act_name("resid_pre", 1) == "blocks.1.hook_resid_pre"
    assert _names.port_hook(channels["L1.H2"], "k") == ("blocks.1.hook_k_input", channels["L1.H2"].kv_head)
    assert _names.port_hook(channels["L0.MLP"], "") == ("blocks.0.hook_mlp_in", None)
    with pytest.raises(ValueError, match="read path"):
        _names.port_hook(channels["L0.MLP"], "q")
    # hook_kind inverts act_name for the block hooks tl_modular reads by kind
    kinds = {"z", "q", "k", "v", "pattern", "resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_out", "post",
             "pre"}
    seen = set()
    for hook in model.hook_dict:
        kind, layer = _names.hook_kind(hook), _names.hook_layer(hook)
        assert _names.is_residual(hook) == kind.startswith("resid_")
        if kind in kinds and layer is not None:
            assert _names.act_name(kind, layer) == hook
            seen.add(kind)
    assert seen == kinds and _names.hook_kind("hook_embed") == "embed"


def test_stream_order_from_names_agrees_with_hooks(channels):
    writers = [c.name for c in channels if c.kind != "bias"]
    for w in writers:
        for p in ports(channels):
            reader = p.partition(":")[0]
            if w == reader:
                continue
            by_name = _names.channel_order(w) < _names.channel_order(reader, reading=True)
            assert by_name == valid_route(channels, w, p), (w, p)


def test_token_check_and_valid_positions():
    model = tiny_model()
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert _tokens.valid_positions(tokens, mask).tolist() == [[False, True, True], [False, True, False]]
    assert torch.equal(_tokens.position_weights(tokens, mask), _tokens.valid_positions(tokens, mask).double())
    with pytest.raises(TypeError, match=r"\[batch, pos\] integer tensor"):
        _tokens.check_tokens(tokens.float())
    with pytest.raises(ValueError, match="empty"):
        _tokens.check_tokens(tokens[:, :1])
    with pytest.raises(ValueError, match="attention_mask"):
        _tokens.check_tokens(tokens, mask[:, :2])
    with pytest.raises(ValueError, match="n_ctx"):
        _tokens.check_tokens(torch.zeros(1, model.cfg.n_ctx + 1, dtype=torch.long), model=model)
    with pytest.raises(ValueError, match="token ids"):
        _tokens.check_tokens(torch.full((1, 3), model.cfg.d_vocab), model=model)


def test_stats():
    assert _stats.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert _stats.adjusted_rand_index([0, 0, 1, 1], [5, 5, 7, 7]) == 1.0
    angles = _stats.principal_angles(torch.eye(4)[:, :2], torch.eye(4)[:, 1:3])
    assert angles.tolist() == pytest.approx([0.0, torch.pi / 2])
    assert _stats.effective_number(torch.tensor([[1.0, 1.0, 1.0, 1.0]])).item() == pytest.approx(4.0)
