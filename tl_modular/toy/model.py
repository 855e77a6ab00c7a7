"""The bundled checkpoint: saving a workbench model and loading the shipped one offline.

>>> model = tlm.toy.load_model()   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from tl_modular._io import (
    ArtifactError,
    bind_files,
    check_bound,
    read_json,
    read_safetensors,
    reading,
    write_json,
    write_safetensors,
)
from tl_modular.toy.vocab import VOCAB

__all__ = ["BUNDLED_DIR", "MODULAR_DIR", "info", "load_model", "load_modular_model", "save_model", "tokenizer"]

#: Folder of the shipped checkpoint (``model.safetensors`` + ``config.json``).
BUNDLED_DIR = Path(__file__).with_name("checkpoint")

#: Folder of the shipped modular variant: the bundled model continued with the modularity loss
#: (``python tools/train_toy_modular.py``), with its SAEs under ``saes/``.
MODULAR_DIR = Path(__file__).with_name("checkpoint_modular")

# HookedTransformerConfig fields that are derived in __post_init__ or hold objects, so they are
# not written to config.json (they are recomputed on load).
_DERIVED = {"device", "dtype", "n_params", "tokenizer_prepends_bos", "d_vocab_out", "rotary_base"}


def tokenizer() -> Any:
    """A Hugging Face tokenizer of the toy vocabulary (space-separated tokens, no BOS added).

    With it, TransformerLens' string utilities work on toy models: ``model.to_tokens("ADD 3 + 4
    =")``, ``to_str_tokens``, and ``transformer_lens.head_detector.detect_head``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(VOCAB)}, unk_token="PAD"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="PAD", unk_token="PAD",
                                   eos_token="PAD", bos_token="PAD")


def save_model(model: Any, directory: str | os.PathLike, *, info: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as ``model.safetensors`` + ``config.json`` (with ``info``, e.g. training
    facts) and the toy tokenizer's files into ``directory``; each file is written atomically."""
    directory = Path(directory)
    cfg = {k: v for k, v in dataclasses.asdict(model.cfg).items()
           if k not in _DERIVED and _jsonable(v)}
    # weights first, config.json last, binding them (a save interrupted between them is refused at load)
    write_safetensors(directory / "model.safetensors", model.state_dict(), {"kind": "toy_model",
                                                                          "bound_to": "config.json"})
    write_json(directory / "config.json", {"config": cfg, "vocab": VOCAB, "info": info or {},
                                           "files": bind_files(directory, ["model.safetensors"])})
    tok = tokenizer()
    tok.backend_tokenizer.save(str(directory / "tokenizer.json.tmp"))
    os.replace(directory / "tokenizer.json.tmp", directory / "tokenizer.json")
    write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "PAD", "unk_token": "PAD",
        "eos_token": "PAD", "bos_token": "PAD", "model_max_length": model.cfg.n_ctx})
    return directory


def load_model(directory: str | os.PathLike | None = None, *, device: str | torch.device = "cpu") -> Any:
    """The bundled multi-task ``HookedTransformer`` (or one saved with :func:`save_model`).

    Offline and fast: no hub, just the shipped safetensors file. The model comes in eval mode.

    Raises:
        FileNotFoundError: the folder holds no checkpoint.
        ValueError: the checkpoint's vocabulary differs from this version's toy vocabulary.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    directory = BUNDLED_DIR if directory is None else Path(directory)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"no toy checkpoint in {directory} (expected config.json and "
                                "model.safetensors); train one with tlm.toy.train and save_model")
    writer = "tlm.toy.save_model"
    spec = read_json(directory / "config.json", writer=writer)
    if not isinstance(spec, dict) or spec.get("vocab") != VOCAB:
        raise ArtifactError(f"the checkpoint in {directory} was trained on another toy vocabulary (or its config.json "
                            "is damaged)", path=directory / "config.json")
    with reading(directory / "config.json", writer):
        cfg = HookedTransformerConfig(**{**spec["config"], "device": str(device)})
    model = HookedTransformer(cfg, move_to_device=False)
    state, _ = read_safetensors(directory / "model.safetensors", device=device, writer=writer)
    with reading(directory / "model.safetensors", writer):    # missing or misshapen weights
        model.load_state_dict(state, strict=True)
    check_bound(directory, "config.json", spec, ["model.safetensors"], writer)  # both from one save?
    if (directory / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        model.set_tokenizer(AutoTokenizer.from_pretrained(str(directory)), default_padding_side="right")
    return model.to(device, print_details=False).eval()


def load_modular_model(*, device: str | torch.device = "cpu") -> Any:
    """The bundled model's modular variant: the same four tasks, trained with the modularity loss.

    ``tools/train_toy_modular.py`` continued :func:`load_model`'s checkpoint with
    ``tlm.training.train_modular``; ``info(MODULAR_DIR)`` holds the loss's modules, their z-score
    on the channel graph against its null model, the modules the graph's own Gomory–Hu rule finds,
    and the accuracies (all asserted by the tests).

    >>> model = tlm.toy.load_modular_model()                 # doctest: +SKIP
    >>> tlm.toy.info(tlm.toy.MODULAR_DIR)["loss_modules"]    # doctest: +SKIP
    """
    return load_model(MODULAR_DIR, device=device)


def info(directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """The training facts stored with a checkpoint (steps, seed, accuracies, ...)."""
    directory = BUNDLED_DIR if directory is None else Path(directory)
    return read_json(directory / "config.json").get("info", {})


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, list, dict, tuple))
