"""Atomic artifact files: safetensors (tensors plus JSON metadata) and JSON.

Files are written to a temporary name in the target folder and moved into place with
``os.replace``, so a crash never leaves a half-written artifact behind. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file

__all__ = ["SCHEMA_VERSION", "read_json", "read_safetensors", "read_versioned_json", "write_json",
           "write_safetensors"]

#: Version of the on-disk formats written by tl_modular.
SCHEMA_VERSION = 1


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; artifacts are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, Any] | None = None) -> None:
    """Write ``tensors`` (made contiguous, on CPU) with JSON ``metadata`` to ``path`` atomically."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"tl_modular": json.dumps({"schema_version": SCHEMA_VERSION, **(metadata or {})})}
    _atomic(Path(path), lambda tmp: save_file(flat, tmp, metadata=meta))


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu"
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata written by :func:`write_safetensors`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such artifact: {path}")
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("tl_modular")
    metadata = json.loads(raw) if raw else {}
    return load_file(str(path), device=str(device)), metadata


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    _atomic(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def read_versioned_json(directory: str | os.PathLike, name: str, schema: str, writer: str) -> dict[str, Any]:
    """``directory/name`` written with ``{"schema": schema, "version": SCHEMA_VERSION, ...}``;
    clear errors when it is missing or of another kind/version (``writer`` names what writes it)."""
    path = Path(directory) / name
    if not path.exists():
        raise FileNotFoundError(f"no {name} in {directory}; write one with {writer}")
    meta = read_json(path)
    if meta.get("schema") != schema or meta.get("version") != SCHEMA_VERSION:
        raise ValueError(f"{path} is not a version-{SCHEMA_VERSION} {schema} file")
    return meta
