"""Offline model builders for tests, tutorials and benchmarks (never a download).

- :func:`tiny_model` builds a small seeded ``HookedTransformer`` of each supported kind, with
  every parameter (biases and norm scales included) perturbed so that no term of a
  decomposition is trivially zero.
- :func:`offline_bridge` builds a ``TransformerBridge`` in compatibility mode around a local,
  randomly initialised ``GPT2LMHeadModel``.
- :func:`planted_modules` builds a model whose channels form known modules (each reads and
  writes its own block of the residual stream) with known strongest routes.
- :func:`write_offline_gpt2_hub` lays out a Hugging Face hub cache holding a GPT-2-shaped
  model with random weights, so that the real ``HookedTransformer.from_pretrained("gpt2")``
  code path runs offline.

>>> from tl_modular.testing import tiny_model
>>> model = tiny_model("gpt2", seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from tl_modular._names import head_name, mlp_name, port_name

__all__ = [
    "GPT2_SMALL_CONFIG",
    "TINY_KINDS",
    "gpt2_small_model",
    "offline_bridge",
    "planted_modules",
    "tiny_model",
    "write_offline_gpt2_hub",
]

#: Config overrides of the tiny model kinds, one per supported architecture feature.
TINY_KINDS: dict[str, dict[str, Any]] = {
    "gpt2": {},
    "ln_pre": {"normalization_type": "LNPre", "act_fn": "gelu"},
    "no_norm": {"normalization_type": None, "act_fn": "relu"},
    "attn_only": {"attn_only": True},
    "silu": {"act_fn": "silu"},
    "solu": {"act_fn": "solu_ln"},
    "gated_rms": {"gated_mlp": True, "normalization_type": "RMS", "act_fn": "silu",
                  "positional_embedding_type": "rotary", "rotary_dim": 4},
    "rms_pre": {"normalization_type": "RMSPre", "act_fn": "gelu"},
    "shortformer": {"positional_embedding_type": "shortformer"},
    "rotary": {"positional_embedding_type": "rotary", "rotary_dim": 4},
    "alibi": {"positional_embedding_type": "alibi"},
    "parallel": {"parallel_attn_mlp": True, "positional_embedding_type": "rotary", "rotary_dim": 4},
    "gqa": {"n_key_value_heads": 2, "gated_mlp": True, "normalization_type": "RMS",
            "act_fn": "silu", "positional_embedding_type": "rotary", "rotary_dim": 4},
}

_TINY_BASE: dict[str, Any] = {
    "n_layers": 2, "d_model": 16, "n_heads": 4, "d_head": 4, "d_mlp": 32, "d_vocab": 50,
    "n_ctx": 32, "act_fn": "gelu_new", "normalization_type": "LN",
}

#: Hugging Face ``config.json`` of GPT-2 small, as published with the model.
GPT2_SMALL_CONFIG: dict[str, Any] = {
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
    "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768,
    "n_head": 12, "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1,
    "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
    "summary_type": "cls_index", "summary_use_proj": True,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
    "vocab_size": 50257,
}

_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


def tiny_model(kind: str = "gpt2", *, seed: int = 0, dtype: torch.dtype = torch.float32,
               noise: float = 0.1, **overrides: Any) -> Any:
    """A small seeded ``HookedTransformer`` of one supported kind.

    Args:
        kind: A key of :data:`TINY_KINDS` (``"gpt2"``, ``"gated_rms"``, ``"parallel"``, ...).
        seed: Seeds the initialisation and the perturbation; equal seeds give equal models.
        dtype: Parameter dtype.
        noise: Standard deviation of the Gaussian noise added to every parameter, so that
            biases and norm scales are not at their trivial initial values.
        **overrides: Any other ``HookedTransformerConfig`` field.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {sorted(TINY_KINDS)}")
    cfg = HookedTransformerConfig(**{**_TINY_BASE, **TINY_KINDS[kind], **overrides,
                                     "seed": seed, "dtype": dtype})
    model = HookedTransformer(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(noise * torch.randn(p.shape, generator=gen).to(p))
    return model.eval()


def gpt2_small_model(seed: int = 0) -> Any:
    """A ``HookedTransformer`` of GPT-2 small's shape (12 layers, 12 heads, d_model 768, d_mlp 3072,
    vocabulary 50,257) with random weights: for benchmarks, where the architecture sets the cost."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257,
                                  n_ctx=1024, act_fn="gelu_new", normalization_type="LN", seed=seed)
    return HookedTransformer(cfg).eval()


def planted_modules(n_modules: int = 3, *, n_layers: int = 3, n_heads: int = 3, d_block: int = 16,
                    leak: float = 0.0, route_gain: float = 4.0, structured: bool = True,
                    seed: int = 0) -> tuple[Any, dict[str, int], list[tuple[str, str]]]:
    """A model with planted modules and planted routes: ``(model, module_of, routes)``.

    The residual stream (``d_model = n_modules * d_block``) is cut into blocks; head ``(l, h)``
    belongs to module ``(l + h) % n_modules`` and the MLP of layer ``l`` to ``l % n_modules``, and
    each channel reads and writes only its module's block (other rows/columns get ``leak`` noise).
    The embedding and unembedding span every block. Two routes are planted inside modules by
    adding a strong shared direction to the writer's output and the reader's input weights:
    ``L0.H0 → L1.H2:v`` and ``L1.MLP → L2.H2:q`` (with 3 modules; ``H{n_modules - 1}`` in
    general). No normalization, so the blocks stay exactly separate when ``leak=0``; rotary
    positions. ``structured=False`` gives the
    same shapes with dense random weights (no modules), as a null reference.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if n_layers < 3 or n_modules < 2 or n_heads < n_modules:
        raise ValueError("planted_modules needs n_layers >= 3, n_modules >= 2 and n_heads >= n_modules")
    r = n_modules - 1  # the reader head of both planted routes sits in its writer's module
    d_model, d_head, d_mlp = n_modules * d_block, 8, 4 * d_block
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head,
                                  d_mlp=d_mlp, d_vocab=64, n_ctx=32, act_fn="gelu", normalization_type=None,
                                  positional_embedding_type="rotary", rotary_dim=d_head, seed=seed)
    model = HookedTransformer(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    module_of: dict[str, int] = {}

    def block_mask(m: int) -> torch.Tensor:
        mask = torch.full((d_model,), leak if structured else 1.0)
        mask[m * d_block:(m + 1) * d_block] = 1.0
        return mask

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.W_E.copy_(randn(cfg.d_vocab, d_model))
        model.unembed.W_U.copy_(randn(d_model, cfg.d_vocab) / d_model**0.5)
        for layer, block in enumerate(model.blocks):
            attn = block.attn
            for h in range(n_heads):
                m = (layer + h) % n_modules
                module_of[head_name(layer, h)] = m
                rows = block_mask(m)[:, None] / d_block**0.5
                for w in (attn.W_Q, attn.W_K, attn.W_V):
                    w[h] = randn(d_model, d_head) * rows
                attn.W_O[h] = randn(d_head, d_model) * rows.T / d_head**0.5
            m = layer % n_modules
            module_of[mlp_name(layer)] = m
            block.mlp.W_in.copy_(randn(d_model, d_mlp) * block_mask(m)[:, None] / d_block**0.5)
            block.mlp.W_out.copy_(randn(d_mlp, d_model) * block_mask(m)[None, :] / d_mlp**0.5)

        def direction(m: int) -> torch.Tensor:
            u = randn(d_model) * (block_mask(m) == 1)
            return u / u.norm()

        # planted route 1: L0.H0 writes u strongly and L1.H{r} reads its values along u
        u = direction(module_of["L0.H0"])
        a, b = randn(d_head), randn(d_head)
        model.blocks[0].attn.W_O[0] += route_gain * torch.outer(a / a.norm(), u)
        model.blocks[1].attn.W_V[r] += route_gain * torch.outer(u, b / b.norm())
        # planted route 2: L1.MLP writes v strongly and L2.H{r} reads its queries along v
        v = direction(module_of["L1.MLP"])
        c, e = randn(d_mlp), randn(d_head)
        model.blocks[1].mlp.W_out += route_gain * torch.outer(c / c.norm(), v)
        model.blocks[2].attn.W_Q[r] += route_gain * torch.outer(v, e / e.norm())
    routes = [("L0.H0", port_name(head_name(1, r), "v")), ("L1.MLP", port_name(head_name(2, r), "q"))]
    return model.eval(), module_of, routes


def offline_bridge(tokenizer: Any, *, n_layers: int = 2, d_model: int = 32, n_heads: int = 4,
                   n_ctx: int = 64, seed: int = 0) -> Any:
    """A ``TransformerBridge`` (compatibility mode) around a random local ``GPT2LMHeadModel``.

    Args:
        tokenizer: A Hugging Face tokenizer, or the path of a folder that
            ``AutoTokenizer.from_pretrained`` loads (the bridge would otherwise try the hub).
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    torch.manual_seed(seed)
    hf_cfg = GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=n_heads, n_positions=n_ctx,
                        vocab_size=len(tokenizer))
    hf_model = GPT2LMHeadModel(hf_cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial biases and LayerNorm scales, as in tiny_model
        for _, p in sorted(hf_model.named_parameters()):
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    bridge = TransformerBridge.boot_transformers("gpt2", hf_model=hf_model, tokenizer=tokenizer)
    bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge.eval()


def write_offline_gpt2_hub(tokenizer_dir: str | os.PathLike, *, seed: int = 0,
                           **config_overrides: Any) -> Path:
    """Lay out the hub-cache entry ``models--gpt2`` with a GPT-2-shaped random model.

    Writes into ``huggingface_hub.constants.HF_HUB_CACHE``, so set ``HF_HOME`` (and
    ``HF_HUB_OFFLINE=1``) *before* anything imports ``huggingface_hub``. Afterwards
    ``HookedTransformer.from_pretrained("gpt2")`` loads the random model through its real
    loading path. Idempotent: an existing entry is replaced.

    Args:
        tokenizer_dir: Folder holding GPT-2's ``vocab.json``, ``merges.txt`` and
            ``tokenizer_config.json``.
        seed: Seeds the random weights.
        **config_overrides: Changes to :data:`GPT2_SMALL_CONFIG` (e.g. ``n_layer=2``).

    Returns:
        The snapshot folder.
    """
    from huggingface_hub import constants
    from transformers import GPT2Config, GPT2LMHeadModel

    config = {**GPT2_SMALL_CONFIG, **config_overrides}
    repo = Path(constants.HF_HUB_CACHE) / "models--gpt2"
    revision = "0" * 40
    snapshot = repo / "snapshots" / revision
    if repo.exists():
        shutil.rmtree(repo)
    snapshot.mkdir(parents=True)
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(**config)).save_pretrained(snapshot)
    # save_pretrained writes the transformers-5 form of the config, which lacks fields
    # (n_ctx) that TransformerLens' converter reads; the published file has them.
    (snapshot / "config.json").write_text(json.dumps(config, indent=2))
    for name in _TOKENIZER_FILES:
        shutil.copy(Path(tokenizer_dir) / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot
