"""The bundled real-text GPT-2: loading (through TransformerLens' own conversion) and its text."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Int

#: The shipped Hugging Face GPT-2 directory (config, fp16 weights, the GPT-2 tokenizer files).
BUNDLED_DIR = Path(__file__).resolve().parent / "checkpoint"
_DATA = Path(__file__).resolve().parent / "data"
EOT = 50256


def load_model(directory: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, fold_ln: bool = True, center_writing_weights: bool = True,
               center_unembed: bool = True, fold_value_biases: bool = True) -> Any:
    """The bundled GPT-2 trained on real text, as a ``HookedTransformer`` (offline, eval mode).

    It is loaded exactly as ``HookedTransformer.from_pretrained("gpt2")`` loads GPT-2 — the same
    config conversion (``get_pretrained_model_config``), the same weight conversion from the
    Hugging Face checkpoint (``get_pretrained_state_dict``) and the same processing (LayerNorm
    folded, writing weights and unembedding centred, value biases folded) — only from a local
    directory, which ``from_pretrained`` itself refuses (it accepts hub names only).

    Args:
        directory: A Hugging Face GPT-2 directory (default: the bundled one, ``BUNDLED_DIR``).
        device, dtype: Where and in which precision the weights go (fp32 by default; stored fp16).
        fold_ln, center_writing_weights, center_unembed, fold_value_biases: As in ``from_pretrained``.

    Raises:
        FileNotFoundError: the directory holds no ``config.json`` / weights.

    >>> model = tlm.textlm.load_model()                                 # doctest: +SKIP
    >>> model.cfg.n_layers, model.cfg.d_model, model.cfg.n_heads, model.cfg.d_vocab
    (4, 192, 6, 50257)
    """
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    directory = BUNDLED_DIR if directory is None else Path(directory)
    if not (directory / "config.json").exists() or not any(directory.glob("*.safetensors")):
        raise FileNotFoundError(f"no Hugging Face GPT-2 checkpoint in {directory} (expected config.json and "
                                "model.safetensors); `python tools/train_textlm.py export` writes one")
    cfg = loading.get_pretrained_model_config(str(directory), fold_ln=fold_ln, device=str(device), dtype=dtype)
    cfg.model_name = "textlm"
    state = loading.get_pretrained_state_dict(str(directory), cfg, None, dtype=dtype)
    model = HookedTransformer(cfg, None, move_to_device=False)   # the tokenizer from the directory (offline)
    model.load_and_process_state_dict(state, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                      center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                                      refactor_factored_attn_matrices=False)
    return model.to(device, print_details=False).eval()


def info(directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """How the checkpoint was trained: steps, settings, the loss log and the corpus's packages."""
    directory = BUNDLED_DIR if directory is None else Path(directory)
    return json.loads((directory / "training.json").read_text(encoding="utf-8"))


def token_stream(split: Literal["train", "heldout"] = "heldout") -> Int[np.ndarray, " n"]:
    """A shipped sample of the corpus as one stream of GPT-2 token ids (documents end with
    ``<|endoftext|>``): 262,144 tokens of the training text (Python documentation and source) or of
    the held-out text (NetworkX's source, a project the model never saw)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return np.load(_DATA / f"{split}.npy", allow_pickle=False)


def tokens(split: Literal["train", "heldout"] = "heldout", n_tokens: int = 4096, seq_len: int = 128, *,
           offset: int = 0) -> Int[torch.Tensor, "batch pos"]:
    """Rows of the shipped text for analysis: ``<|endoftext|>`` (the BOS TransformerLens prepends)
    then ``seq_len - 1`` tokens of the stream, ``n_tokens // seq_len`` rows from ``offset`` on.

    >>> rows = tlm.textlm.tokens("train", 16384, 128)          # [128, 128]
    >>> rows.shape
    torch.Size([128, 128])
    """
    stream = token_stream(split)
    if not isinstance(seq_len, int) or not 2 <= seq_len <= 512:
        raise ValueError(f"seq_len must be an integer in 2..512 (the model's n_ctx), got {seq_len!r}")
    body, rows = seq_len - 1, n_tokens // seq_len
    available = (len(stream) - offset) // body
    if rows < 1 or rows > available or offset < 0:
        raise ValueError(f"{split} text: {n_tokens} tokens from offset {offset} in rows of {seq_len} need "
                         f"{max(rows, 1)} rows; the shipped sample has {max(available, 0)} from there "
                         f"(n_tokens <= {max(available, 0) * seq_len})")
    table = torch.from_numpy(stream[offset: offset + rows * body].astype(np.int64)).reshape(rows, body)
    return torch.cat([torch.full((rows, 1), EOT, dtype=torch.long), table], 1)
