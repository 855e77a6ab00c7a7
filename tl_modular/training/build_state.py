"""The resumable state of a :func:`~tl_modular.training.build_interpretable` run in its
``checkpoint_dir``: the finished layers (model and records) and a phase's training step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tl_modular._io import (
    SCHEMA_VERSION,
    bind_files,
    check_bound,
    read_safetensors,
    read_safetensors_header,
    read_versioned_json,
    reading,
    write_json,
    write_safetensors,
)
from tl_modular.training.build_config import BuildConfig
from tl_modular.training.build_result import _MODEL, _SCHEMA, LayerRecord

_STATE = "build_state.json"
# Fields that may change on resume: they do not alter what is computed.
_FREE_ON_RESUME = ("eval_every", "checkpoint_every")


def _phase_step(phase: Path | None) -> int:
    """The step a phase's training checkpoint holds (0 when there is none)."""
    path = phase / "train_state.safetensors" if phase is not None else None
    if path is None or not path.exists():
        return 0
    meta = read_safetensors_header(path, writer="build_interpretable (start it again)")
    with reading(path, "build_interpretable (start it again)"):
        return int(meta.get("step", 0))


def _comparable(cfg_json: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg_json.items() if k not in _FREE_ON_RESUME}


def _checkpoint(root: Path, model: Any, cfg: BuildConfig, initial: dict[str, Any], done: list[LayerRecord]) -> None:
    """The model first, the state last binding it: a run killed between them is refused on resume."""
    write_safetensors(root / _MODEL, model.state_dict(), {"kind": "build_interpretable_model", "bound_to": _STATE})
    _save_state(root, cfg, initial, done)


def _save_state(root: Path, cfg: BuildConfig, initial: dict[str, Any], done: list[LayerRecord]) -> None:
    files = bind_files(root, [_MODEL]) if (root / _MODEL).exists() else {}
    write_json(root / _STATE, {"schema": _SCHEMA, "version": SCHEMA_VERSION, "config": cfg.to_json(),
                               "initial": initial, "done": [r.to_json() for r in done], "files": files})


def _resume(root: Path | None, cfg: BuildConfig, model: Any) -> dict[str, Any]:
    """The finished layers of an earlier run in ``root`` (their model state loaded into ``model``)."""
    if root is None or not (root / _STATE).exists():
        return {"done": []}
    meta = read_versioned_json(root, _STATE, _SCHEMA, "build_interpretable (use another checkpoint_dir)",
                               required=("config", "done"))
    mine = _comparable(_json_roundtrip(cfg.to_json()))
    saved = _comparable(meta.get("config", {}))
    if saved != mine:
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        raise ValueError(f"{root} holds a build_interpretable run with other settings (differing: {diff}); resume "
                         "with the same settings (only eval_every and checkpoint_every may change) or use another "
                         "checkpoint_dir")
    state, _ = read_safetensors(root / _MODEL, device=next(model.parameters()).device,
                                writer="build_interpretable (use another checkpoint_dir)")
    with reading(root / _MODEL, "build_interpretable (use another checkpoint_dir)"):
        model.load_state_dict(state, strict=True)
    check_bound(root, _STATE, meta, [_MODEL], "build_interpretable (use another checkpoint_dir)")
    with reading(root / _STATE, "build_interpretable (use another checkpoint_dir)"):
        return {"done": [LayerRecord.from_json(d) for d in meta["done"]], "initial": meta.get("initial")}


def _json_roundtrip(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), for comparing with a saved config."""
    import json

    return json.loads(json.dumps(obj))
