"""SAEs on a model's hook points: loading, fit checks, activations, splicing and quality."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int

from tl_modular import _dist
from tl_modular._hooks import hook_guard, run_with_cache, run_with_hooks
from tl_modular._io import read_json, read_safetensors_header, reading
from tl_modular._models import fingerprint, stop_layer
from tl_modular._names import hook_kind
from tl_modular._tokens import check_tokens, valid_positions

if TYPE_CHECKING:
    from sae_lens import SAE

#: ``edit(hook_name, feature_acts) -> feature_acts``: an intervention on features while spliced.
FeatureEdit = Callable[[str, torch.Tensor], torch.Tensor]


def hook_name(sae: SAE) -> str:
    """The hook point an sae-lens SAE was trained on (``cfg.metadata.hook_name``)."""
    name = getattr(getattr(sae, "cfg", None), "metadata", None)
    name = getattr(name, "hook_name", None) if name is not None else None
    if not name:
        raise ValueError("this SAE does not say which hook it reads (cfg.metadata.hook_name is empty): "
                         "set sae.cfg.metadata.hook_name = 'blocks.0.hook_resid_pre' (or the hook it belongs to)")
    return name


def load(release_or_path: str | os.PathLike, sae_id: str | None = None, *, model: Any | None = None,
         device: str = "cpu") -> SAE:
    """Load an sae-lens SAE by release and id (hub cache) or from a ``save_model`` folder.

    Args:
        release_or_path: A release of sae-lens' pretrained directory (e.g. ``"gpt2-small-res-jb"``)
            with ``sae_id``, or a folder holding ``cfg.json`` and ``sae_weights.safetensors``.
        sae_id: The SAE's id within the release (e.g. ``"blocks.8.hook_resid_pre"``).
        model: When given, the SAE is checked to fit it (:func:`check_fits`).

    >>> sae = tlm.sae.load("gpt2-small-res-jb", "blocks.8.hook_resid_pre", model=model)  # doctest: +SKIP
    """
    from sae_lens import SAE

    if sae_id is None:
        path = Path(release_or_path)
        if not (path / "cfg.json").exists():
            raise FileNotFoundError(f"{path} is not an SAE folder (no cfg.json): pass a folder written by "
                                    "SAE.save_model / tlm.sae.train_sae, or a release name with sae_id=")
        writer = "SAE.save_model / tlm.sae.train_sae"
        read_json(path / "cfg.json", writer=writer)       # a damaged file is named, not a bare JSONDecodeError
        for weights in path.glob("*.safetensors"):
            read_safetensors_header(weights, writer=writer)
        with reading(path, writer):                          # weights that do not fit cfg.json, missing fields
            sae = SAE.load_from_disk(str(path), device=device)
    else:
        sae = SAE.from_pretrained(str(release_or_path), sae_id, device=device)
    if model is not None:
        check_fits(sae, model)
    return sae


def _width(model: Any, hook: str) -> tuple[int, ...]:
    """Trailing shape of a hook's activation, from one two-token forward pass."""
    if hook not in model.hook_dict:
        near = sorted(h for h in model.hook_dict if hook_kind(h) == hook_kind(hook))[:4]
        raise ValueError(f"the model has no hook point {hook!r}" + (f" (hooks of that kind: {near})" if near else ""))
    shape: list[tuple[int, ...]] = []

    def grab(act: torch.Tensor, hook: Any) -> None:
        shape.append(tuple(act.shape[2:]))
    with torch.no_grad():
        run_with_hooks(model, torch.zeros(1, 2, dtype=torch.long, device=model.cfg.device),
                             fwd_hooks=[(hook, grab)], return_type=None)
    if not shape:
        raise ValueError(f"hook {hook!r} never ran on this model (its flag may be off: e.g. "
                         "model.set_use_attn_result(True) for hook_result, set_use_split_qkv_input for hook_*_input)")
    return shape[0]


def check_fits(sae: SAE, model: Any) -> str:
    """Raise ``ValueError`` unless the SAE's hook exists in ``model`` and its ``d_in`` matches.

    ``hook_z`` SAEs (``reshape_activations="hook_z"``) read the heads flattened: ``n_heads * d_head``.
    Returns the hook name.
    """
    hook = hook_name(sae)
    sides = [(hook, "d_in", int(sae.cfg.d_in))]
    if getattr(sae.cfg, "d_out", None) is not None:       # a transcoder also writes a hook
        out = getattr(sae.cfg.metadata, "hook_name_out", None)
        if not out:
            raise ValueError("this transcoder does not say which hook it writes: set cfg.metadata.hook_name_out")
        sides.append((out, "d_out", int(sae.cfg.d_out)))
    for name, field_name, size in sides:
        shape = _width(model, name)
        width = math.prod(shape)
        if size != width:
            raise ValueError(f"SAE for {name!r} has {field_name}={size}, but the model's activation there is {width} "
                             f"wide (shape {list(shape)}): it was trained on another model (e.g. another size)")
    return hook


def _flat(act: torch.Tensor) -> torch.Tensor:
    return act.reshape(*act.shape[:2], -1)


def save_atomic(sae: SAE, path: str | os.PathLike) -> Path:
    """``sae.save_model(path)`` written to a sibling folder first, then moved into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
        sae.save_model(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def iter_activations(model: Any, tokens: Int[torch.Tensor, "batch pos"], hooks: Sequence[str], *,
                     attention_mask: torch.Tensor | None = None, batch_size: int = 32,
                     ) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``{hook: [n_valid, width]}`` per batch (position 0 and padding dropped), streaming."""
    tokens, attention_mask = check_tokens(tokens, attention_mask, model=model)
    hooks = list(dict.fromkeys(hooks))
    stop = stop_layer(model, hooks)
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start:start + batch_size].to(model.cfg.device)
        mask = None if attention_mask is None else attention_mask[start:start + batch_size]
        keep = valid_positions(batch, mask).to(model.cfg.device)
        kwargs: dict[str, Any] = {"attention_mask": mask.to(model.cfg.device)} if mask is not None else {}
        if stop is not None:
            kwargs["stop_at_layer"] = stop
        with torch.no_grad():
            _, cache = run_with_cache(model, batch, names_filter=lambda n: n in hooks, return_type=None, **kwargs)
        yield {h: _flat(cache[h])[keep] for h in hooks}


def collect(model: Any, tokens: Int[torch.Tensor, "batch pos"], hooks: Sequence[str], *,
            attention_mask: torch.Tensor | None = None, batch_size: int = 32,
            max_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """``{hook: [n_tokens, width]}`` over valid positions (bounded by ``max_tokens``).

    Under ``torch.distributed`` the batches it needs are split over the ranks and every rank gets
    all the activations, in order (the same as one process)."""
    out: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    batches = (_collect_shards(model, tokens, hooks, attention_mask, batch_size, max_tokens) if _dist.active()
               else iter_activations(model, tokens, hooks, attention_mask=attention_mask, batch_size=batch_size))
    n = 0
    for acts in batches:
        for h, a in acts.items():
            out[h].append(a.cpu())
        n += next(iter(acts.values())).shape[0]
        if max_tokens is not None and n >= max_tokens:
            break
    res = {h: torch.cat(v)[:max_tokens] for h, v in out.items()}
    if next(iter(res.values())).shape[0] == 0:
        raise ValueError("no valid positions: every position is padding or position 0")
    return res


def _collect_shards(model: Any, tokens: torch.Tensor, hooks: Sequence[str], attention_mask: torch.Tensor | None,
                    batch_size: int, max_tokens: int | None) -> list[dict[str, torch.Tensor]]:
    """The batches :func:`collect` reads in one process (up to ``max_tokens`` valid positions),
    each rank running its share; every rank's per-batch activations, in batch order."""
    tokens, attention_mask = check_tokens(tokens, attention_mask, model=model)
    _dist.check_consistent("activations", model, tokens, attention_mask, hooks=list(hooks), batch_size=batch_size,
                           max_tokens=max_tokens)
    counts = valid_positions(tokens, attention_mask).sum(1)
    starts, n = [], 0
    for start in range(0, tokens.shape[0], batch_size):
        starts.append(start)
        n += int(counts[start:start + batch_size].sum())
        if max_tokens is not None and n >= max_tokens:
            break
    parts = []
    for start in _dist.shard(starts):
        mask = None if attention_mask is None else attention_mask[start:start + batch_size]
        acts = next(iter_activations(model, tokens[start:start + batch_size], hooks, attention_mask=mask,
                                     batch_size=batch_size))
        parts.append({h: a.cpu() for h, a in acts.items()})
    return _dist.gather_batches(parts)


@contextlib.contextmanager
def spliced(model: Any, saes: Sequence[Any] | Any, *, use_error_term: bool = False,
            edit: FeatureEdit | None = None) -> Iterator[Any]:
    """Run ``model`` with SAEs in place of their hooks' activations (hooks removed on exit).

    Without the error term the model sees each SAE's reconstruction; with it, the
    reconstruction plus what the SAE misses (``x - sae(x)``), so the output is unchanged unless
    ``edit`` changes features: ``edit(hook, feature_acts)`` returns the features to decode.

    >>> with tlm.sae.spliced(model, sae):             # doctest: +SKIP
    ...     loss = model(tokens, return_type="loss")
    """
    saes = [saes] if not isinstance(saes, (list, tuple)) else list(saes)
    hooks = []
    for sae in saes:
        name = check_fits(sae, model)
        if getattr(sae.cfg, "d_out", None) is not None:
            hooks += _transcoder_hooks(sae, name, use_error_term, edit)
            continue

        def fn(act: torch.Tensor, hook: Any, sae: SAE = sae, name: str = name) -> torch.Tensor:
            flat = _flat(act)
            feats = sae.encode(flat.to(sae.W_dec.dtype))
            recon = sae.decode(feats)
            if edit is not None:
                edited = sae.decode(edit(name, feats))
            else:
                edited = recon
            out = edited + (flat - recon) if use_error_term else edited
            return out.to(act.dtype).reshape(act.shape)
        hooks.append((name, fn))
    with hook_guard(model), model.hooks(fwd_hooks=hooks):
        yield model


def _transcoder_hooks(tc: SAE, name: str, use_error_term: bool, edit: FeatureEdit | None) -> list:
    """A transcoder replaces its output hook with its prediction from its input hook."""
    seen: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, hook: Any) -> None:
        seen["x"] = _flat(act)

    def replace(act: torch.Tensor, hook: Any) -> torch.Tensor:
        feats = tc.encode(seen["x"].to(tc.W_dec.dtype))
        pred = tc.decode(feats)
        out = tc.decode(edit(name, feats)) if edit is not None else pred
        if use_error_term:
            out = out + (_flat(act) - pred)
        return out.to(act.dtype).reshape(act.shape)
    return [(name, grab), (tc.cfg.metadata.hook_name_out, replace)]


def quality(model: Any, sae: SAE, tokens: Int[torch.Tensor, "batch pos"], *,
            attention_mask: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
            batch_size: int = 32) -> dict[str, float]:
    """Reconstruction quality of an SAE on ``tokens``.

    Returns ``fvu`` (fraction of variance unexplained; for a transcoder, of the output it
    predicts), ``mse`` per token, ``l0`` (mean active
    features), ``dead_fraction`` (features that never fire on the data), and the next-token loss
    clean, spliced (reconstruction in place) and zero-ablated, with ``ce_loss_recovered`` =
    (zero − spliced) / (zero − clean). Position 0 and padding are excluded throughout;
    ``loss_mask`` (``[batch, pos]``) restricts the loss to the positions whose next-token
    prediction counts (e.g. the bundled model's scored positions, ``mixed_tokens(scored=True)``).
    """
    hook = check_fits(sae, model)
    tokens, attention_mask = check_tokens(tokens, attention_mask, model=model)
    d_sae = int(sae.cfg.d_sae)
    fired = torch.zeros(d_sae, dtype=torch.bool)
    sq_err = l0 = n = 0.0
    s1 = s2 = None
    target = getattr(sae.cfg.metadata, "hook_name_out", None) if getattr(sae.cfg, "d_out", None) else None
    target = target or hook                          # a transcoder is scored on the output it predicts
    with torch.no_grad():
        for acts in iter_activations(model, tokens, [hook, target], attention_mask=attention_mask,
                                     batch_size=batch_size):
            feats = sae.encode(acts[hook].to(sae.W_dec.dtype))
            recon = sae.decode(feats)
            x = acts[target].to(sae.W_dec.dtype)
            sq_err += float(((recon - x) ** 2).sum())
            active = feats != 0
            l0 += float(active.sum())
            fired |= active.any(0).cpu()
            xd = x.double()
            s1 = xd.sum(0) if s1 is None else s1 + xd.sum(0)
            s2 = (xd ** 2).sum(0) if s2 is None else s2 + (xd ** 2).sum(0)
            n += x.shape[0]
    total_var = float((s2 - s1 ** 2 / n).sum())
    if loss_mask is not None and loss_mask.shape != tokens.shape:
        raise ValueError(f"loss_mask {list(loss_mask.shape)} must match tokens {list(tokens.shape)}")
    losses = _losses(model, sae, hook, tokens, attention_mask, loss_mask, batch_size)
    clean, spliced_loss, zero = losses
    recovered = (zero - spliced_loss) / (zero - clean) if zero != clean else float("nan")
    return {"fvu": sq_err / total_var, "mse": sq_err / n, "l0": l0 / n,
            "dead_fraction": float((~fired).float().mean()), "n_tokens": int(n),
            "ce_loss_clean": clean, "ce_loss_spliced": spliced_loss, "ce_loss_zero_ablated": zero,
            "ce_loss_recovered": recovered}


def _losses(model: Any, sae: SAE, hook: str, tokens: torch.Tensor, attention_mask: torch.Tensor | None,
            loss_mask: torch.Tensor | None, batch_size: int) -> tuple[float, float, float]:
    """Mean next-token loss clean, with the SAE spliced in, and with the hook zero-ablated."""
    out = getattr(sae.cfg.metadata, "hook_name_out", None) if getattr(sae.cfg, "d_out", None) else None
    zero = [(out or hook, lambda act, hook: torch.zeros_like(act))]
    sums = [0.0, 0.0, 0.0]
    count = 0
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start:start + batch_size].to(model.cfg.device)
        mask = None if attention_mask is None else attention_mask[start:start + batch_size].to(model.cfg.device)
        # the loss at position p predicts token p + 1: count it when both are valid tokens
        keep = torch.ones_like(batch[:, 1:], dtype=torch.bool) if mask is None else (mask[:, 1:] * mask[:, :-1]).bool()
        if loss_mask is not None:
            keep &= loss_mask[start:start + batch_size, :-1].to(keep.device).bool()
        kwargs = {"attention_mask": mask} if mask is not None else {}
        with torch.no_grad():
            runs = []
            runs.append(model(batch, return_type="loss", loss_per_token=True, **kwargs))
            with spliced(model, sae):
                runs.append(model(batch, return_type="loss", loss_per_token=True, **kwargs))
            with hook_guard(model), model.hooks(fwd_hooks=zero):
                runs.append(model(batch, return_type="loss", loss_per_token=True, **kwargs))
        for i, per_token in enumerate(runs):
            sums[i] += float(per_token[keep].sum())
        count += int(keep.sum())
    if count == 0:
        raise ValueError("no position's loss counts: loss_mask and attention_mask leave nothing")
    return sums[0] / count, sums[1] / count, sums[2] / count


class SAESet(Mapping[str, Any]):
    """SAEs keyed by the hook they read, checked against one model.

    >>> saes = tlm.sae.SAESet([sae_resid0, sae_mlp0], model)   # doctest: +SKIP
    >>> saes["blocks.0.hook_resid_pre"].cfg.d_sae              # doctest: +SKIP
    """

    def __init__(self, saes: Sequence[Any] | Mapping[str, Any], model: Any | None = None):
        items = list(saes.values()) if isinstance(saes, Mapping) else list(saes)
        self._saes: dict[str, Any] = {}
        for sae in items:
            name = check_fits(sae, model) if model is not None else hook_name(sae)
            if name in self._saes:
                raise ValueError(f"two SAEs read {name!r}: keep one per hook point")
            self._saes[name] = sae
        self.model_fingerprint = fingerprint(model) if model is not None else None

    def __getitem__(self, hook: str) -> Any:
        if hook not in self._saes:
            raise KeyError(f"no SAE for {hook!r}; this set has {sorted(self._saes)}")
        return self._saes[hook]

    def __iter__(self) -> Iterator[str]:
        return iter(self._saes)

    def __len__(self) -> int:
        return len(self._saes)

    def __repr__(self) -> str:
        body = ", ".join(f"{h}: {int(s.cfg.d_in)}→{int(s.cfg.d_sae)}" for h, s in self._saes.items())
        return f"SAESet({body})"

    def spliced(self, model: Any, **kwargs: Any) -> Any:
        """Every SAE of the set spliced in at once (see :func:`spliced`)."""
        return spliced(model, list(self._saes.values()), **kwargs)

    def save(self, directory: str | os.PathLike) -> Path:
        """One sae-lens folder per hook under ``directory`` (``SAE.load_from_disk`` reads each)."""
        directory = Path(directory)
        for hook, sae in self._saes.items():
            save_atomic(sae, directory / hook)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, model: Any | None = None, *, device: str = "cpu") -> SAESet:
        """Read a folder written by :meth:`save` (each sub-folder one SAE)."""
        directory = Path(directory)
        folders = sorted(p for p in directory.iterdir() if (p / "cfg.json").exists()) if directory.is_dir() else []
        if not folders:
            raise FileNotFoundError(f"no SAE folders (with cfg.json) under {directory}")
        return cls([load(p, device=device) for p in folders], model)


def feature_directions(sae: SAE) -> Float[torch.Tensor, "d_sae d_in"]:
    """The SAE's decoder rows (feature directions in the hook's coordinates), detached."""
    return sae.W_dec.detach()
