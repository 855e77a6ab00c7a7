"""Model introspection shared by every stage: which kind of model this is and whether
tl_modular can cut it exactly.

Supported: ``HookedTransformer`` (every architecture listed in :data:`SUPPORTED`) and
``TransformerBridge`` in compatibility mode for the architectures in
:data:`BRIDGE_ARCHITECTURES`. Imports of TransformerLens happen lazily, inside the
functions, so that ``import tl_modular`` stays cheap.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Sequence
from typing import Any

import torch

from tl_modular._names import hook_layer
from tl_modular.errors import UnsupportedModelError

SUPPORTED = (
    "HookedTransformer with LayerNorm, LayerNormPre, RMSNorm, RMSNormPre or no normalization; "
    "attention-only models; elementwise (gelu, gelu_new, relu, silu, ...) and solu_ln MLPs; "
    "gated MLPs; standard, shortformer, rotary and alibi positions; parallel attention+MLP "
    "blocks; grouped-query attention; and TransformerBridge in compatibility mode for GPT-2"
)

#: Hugging Face architectures whose TransformerBridge (compatibility mode) is tested to carry
#: the HookedTransformer hook names and weights tl_modular reads.
BRIDGE_ARCHITECTURES = frozenset({"GPT2LMHeadModel"})

_POSITIONS = ("standard", "shortformer", "rotary", "alibi")


def is_bridge(model: Any) -> bool:
    """True when ``model`` is a TransformerLens ``TransformerBridge``."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # pragma: no cover - older TransformerLens without the bridge
        return False
    return isinstance(model, TransformerBridge)


def check_supported(model: Any) -> None:
    """Raise if ``model`` cannot be cut into channels exactly.

    Raises:
        TypeError: ``model`` is not a TransformerLens model at all.
        UnsupportedModelError: a TransformerLens model with a feature tl_modular does not cut
            exactly; the message names the feature.
    """
    from transformer_lens import HookedTransformer

    bridge = is_bridge(model)
    if not bridge and not isinstance(model, HookedTransformer):
        name = type(model).__name__
        if name.startswith("HookedEncoder") or name in {"HookedAudioEncoder", "HookedEncoderDecoder"}:
            _unsupported(f"{name} is an encoder (bidirectional attention, no residual readout "
                         "into next-token logits)")
        raise TypeError(
            f"expected a transformer_lens.HookedTransformer or TransformerBridge, got "
            f"{type(model).__module__}.{name}. Load the model with "
            "HookedTransformer.from_pretrained(...) or TransformerBridge.boot_transformers(...)."
        )
    cfg = model.cfg
    if bridge:
        if not getattr(model, "compatibility_mode", False):
            _unsupported("a TransformerBridge outside compatibility mode (its hook names and "
                         "weights differ from HookedTransformer's); call "
                         "bridge.enable_compatibility_mode() first")
        arch = getattr(cfg, "architecture", None)
        if arch not in BRIDGE_ARCHITECTURES:
            _unsupported(f"TransformerBridge architecture {arch!r} (tested: "
                         f"{sorted(BRIDGE_ARCHITECTURES)}); load it with "
                         "HookedTransformer.from_pretrained instead")
    if getattr(cfg, "num_experts", None):
        _unsupported("mixture-of-experts MLPs (cfg.num_experts is set)")
    if getattr(cfg, "post_embedding_ln", False):
        _unsupported("a LayerNorm after the embeddings (cfg.post_embedding_ln): the embeddings "
                     "do not write to the residual stream additively")
    if getattr(cfg, "use_normalization_before_and_after", False):
        _unsupported("normalization after attention and MLP outputs "
                     "(cfg.use_normalization_before_and_after): heads do not write additively")
    if getattr(cfg, "load_in_4bit", False):
        _unsupported("4-bit quantized weights (cfg.load_in_4bit)")
    try:
        from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
    except ImportError:  # pragma: no cover - depends on TransformerLens version
        POST_NORM_ARCHITECTURES = ()
    if getattr(cfg, "original_architecture", None) in POST_NORM_ARCHITECTURES:
        _unsupported(f"post-norm blocks ({cfg.original_architecture}): outputs are normalized "
                     "before they reach the residual stream")
    if cfg.positional_embedding_type not in _POSITIONS:
        _unsupported(f"positional_embedding_type={cfg.positional_embedding_type!r}")
    if not bridge:
        _check_components(model)


def _check_components(model: Any) -> None:
    from transformer_lens.components import Attention, GroupedQueryAttention
    from transformer_lens.components.mlps.gated_mlp import GatedMLP
    from transformer_lens.components.mlps.mlp import MLP

    for layer, block in enumerate(model.blocks):
        if type(block.attn) not in (Attention, GroupedQueryAttention):
            _unsupported(f"attention module {type(block.attn).__name__} in layer {layer}")
        mlp = getattr(block, "mlp", None)
        if not model.cfg.attn_only and type(mlp) not in (MLP, GatedMLP):
            _unsupported(f"MLP module {type(mlp).__name__} in layer {layer}")


def _unsupported(feature: str) -> None:
    raise UnsupportedModelError(
        f"tl_modular cannot segment this model exactly: {feature}. Supported: {SUPPORTED}."
    )


def check_finite(model: Any, what: str) -> None:
    """Refuse a model with a NaN or infinite parameter, naming the first one, before ``what`` reads
    its weights (else a NaN surfaces far later, e.g. as a ``LinAlgError`` in an eigendecomposition).

    One ``isfinite`` pass over the parameters; cheap next to any pass that runs the model.

    >>> from tl_modular import toy
    >>> check_finite(toy.load_model(), "compress")
    """
    for name, param in model.named_parameters():
        finite = torch.isfinite(param)
        if not bool(finite.all()):
            n_bad = int((~finite).sum())
            raise ValueError(f"{what}: the model's parameter {name} holds {n_bad} non-finite value(s) (NaN or inf) "
                             f"of {param.numel()}; the weights are broken (a diverged fine-tune or a bad load): "
                             "reload or repair them first")


def count_hooks(model: Any) -> int:
    """Number of forward/backward hooks attached to ``model``'s hook points.

    Used by tests to prove that no stage leaves a hook behind. Only ``HookPoint`` modules are
    counted: that is where TransformerLens (and tl_modular) attach hooks, while a
    TransformerBridge installs private capture hooks on its wrapped modules at the first
    forward pass and keeps them.
    """
    from transformer_lens.hook_points import HookPoint

    total = 0
    for module in model.modules():
        if isinstance(module, HookPoint):
            total += len(module._forward_hooks) + len(module._forward_pre_hooks)
            total += len(module._backward_hooks) + len(module._backward_pre_hooks)
    return total


def fingerprint(model: Any) -> str:
    """A content hash of the model's configuration and weights (hex), to tie artifacts to it."""
    h = hashlib.blake2b(digest_size=16)
    cfg = model.cfg
    keys = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "act_fn",
            "normalization_type", "positional_embedding_type", "attn_only", "parallel_attn_mlp", "gated_mlp")
    h.update(json.dumps({k: str(getattr(cfg, k, None)) for k in keys}, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def stop_layer(model: Any, hooks: Sequence[str]) -> int | None:
    """The first block no hook needs, so the forward pass can stop early (``stop_at_layer``;
    HookedTransformer only: ``None`` when the model cannot stop early or a hook needs the whole pass)."""
    if "stop_at_layer" not in inspect.signature(model.forward).parameters:
        return None
    layers = []
    for h in hooks:
        layer = hook_layer(h)
        if layer is None:
            if h not in ("hook_embed", "hook_pos_embed"):
                return None
            layers.append(1)          # embeddings: the first block is enough (other hooks may need more)
            continue
        layers.append(layer + 1)
    top = max(layers)
    return top if top < model.cfg.n_layers else None
