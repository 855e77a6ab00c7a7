"""Offline model builders for tests, tutorials and benchmarks (never a download).

- :func:`tiny_model` builds a small seeded ``HookedTransformer`` of each supported kind, with
  every parameter (biases and norm scales included) perturbed so that no term of a
  decomposition is trivially zero.
- :func:`offline_bridge` builds a ``TransformerBridge`` in compatibility mode around a local,
  randomly initialised ``GPT2LMHeadModel``.
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

__all__ = [
    "GPT2_SMALL_CONFIG",
    "TINY_KINDS",
    "offline_bridge",
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
