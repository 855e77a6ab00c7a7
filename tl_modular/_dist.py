"""Data parallel passes over ``torch.distributed``: shards of the batches, fp64 all-reduces.

Every pass over tokens accumulates sums, so it splits over data exactly: when a process group is
initialised (``torchrun``, or ``torch.distributed.init_process_group`` by hand) each rank takes
its shard of the batch list, its partial sums are all-reduced, and every rank ends with the result
of the whole data. Without a process group (or with one rank) every function here is the identity
and no collective runs, so the single-process code path is unchanged.

Why fp64 on the wire: partial sums in fp32 lose ~1e-7 relative per addition, so a result would
depend on how the batches were split; converted to float64 before the all-reduce (and back after),
the sums of ``N`` ranks equal the single process's to fp64 rounding (≤ 1e-9 relative).

Shards are contiguous blocks of the batch list, as even as they come: rank ``r`` of ``W`` takes
batches ``[r B // W, (r + 1) B // W)``; with fewer batches than ranks some ranks get none, and still
take part in every collective (with zeros). Randomness inside a pass is seeded by the *global*
batch index (:func:`batch_seed`), so the samples do not depend on the number of ranks.

>>> starts = batch_starts(10, 4)          # no process group: every batch
>>> starts
[0, 4, 8]
>>> all_reduce_sum({"n": 3.0})["n"]
3.0
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import sys
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import torch

from tl_modular.errors import DistributedMismatchError

__all__ = ["DistributedMismatchError", "RankFailedError", "active", "all_gather_object", "all_reduce",
           "all_reduce_sum", "batch_seed", "batch_starts", "broadcast_object", "check_consistent", "exit_if_asked",
           "gather_batches", "is_main", "model_fingerprint", "on_main", "rank", "shard", "world_size"]

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
Op = Literal["sum", "max", "min"]


class RankFailedError(RuntimeError):
    """Another rank of the process group failed: its connection closed in a collective, or rank 0
    raised in :func:`on_main`. This rank cannot go on (the sums would lack that rank's shard)."""


@contextlib.contextmanager
def _collective() -> Any:
    """Errors of a collective (gloo: "Connection closed by peer", NCCL errors) as :class:`RankFailedError`:
    with the shapes and keys agreed beforehand, a collective fails only when a peer is gone."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, RankFailedError):
            raise
        raise RankFailedError(f"another rank of the run failed ({_first_sentence(e)})") from e


def _first_sentence(error: BaseException) -> str:
    """``"Read error [127.0.0.1]:22933: Connection reset by peer"`` from gloo's message (less its
    source location and advice)."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip().splitlines()[0] if str(error).strip() else "")
    return re.split(r"\.\s", text, maxsplit=1)[0][:300] or type(error).__name__


def active() -> bool:
    """Whether a process group of more than one rank is initialised (else everything is local)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return torch.distributed.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or no process group): the process that writes files and shows progress bars."""
    return rank() == 0


def shard(items: Sequence[T]) -> list[T]:
    """This rank's contiguous block of ``items`` (all of them without a process group).

    Blocks differ in length by at most one; a rank may get none.

    >>> shard(["a", "b", "c"])
    ['a', 'b', 'c']
    """
    n, r, w = len(items), rank(), world_size()
    return list(items[r * n // w:(r + 1) * n // w])


def batch_starts(n_rows: int, batch_size: int) -> list[int]:
    """This rank's share of the row offsets ``range(0, n_rows, batch_size)``; the global batch index
    of a start is ``start // batch_size``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer (sequences per forward pass), got {batch_size!r}")
    return shard(range(0, n_rows, batch_size))


def batch_seed(seed: int, index: int) -> int:
    """A generator seed for global batch ``index`` of a pass seeded with ``seed`` (the same on every
    rank and for any number of ranks)."""
    return (int(seed) * 1_000_003 + int(index)) % (2 ** 63)


def _comm_device() -> torch.device:
    """Where tensors must sit for this backend's collectives (NCCL: this rank's GPU)."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce(values: Mapping[K, torch.Tensor | float], op: Op = "sum", *, device: Any = None
               ) -> dict[K, torch.Tensor | float]:
    """``values`` reduced over the ranks with ``op``, in float64, back in each value's dtype and device.

    Values are tensors or Python numbers (returned as floats). A key some rank lacks (e.g. a sum
    over no batch) counts as zeros of the shape the others report for ``"sum"`` (as ``∓inf`` for
    ``"max"``/``"min"``); every rank returns every key, a missing one on ``device`` (default: where
    this rank's values are, else the backend's device). One flat buffer, one collective (plus a
    small gather of the keys and shapes).

    >>> all_reduce({"x": torch.ones(2)}, "max")["x"]
    tensor([1., 1.])
    """
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    if not active():
        return dict(values)
    meta = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) if isinstance(v, torch.Tensor)
            else None for k, v in values.items()}
    every: dict[Any, Any] = {}
    for part in all_gather_object(meta):
        for k, m in part.items():
            seen = every.setdefault(k, m)
            if (seen is None) != (m is None) or (m is not None and seen[0] != m[0]):
                raise DistributedMismatchError(f"the ranks hold different shapes for {k!r}: {seen} and {m}")
    keys = sorted(every, key=repr)
    fill = {"sum": 0.0, "max": -torch.inf, "min": torch.inf}[op]
    comm = _comm_device()
    here = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), None)
    home = torch.device(device) if device is not None else here or comm
    # one preallocated buffer (no list of copies and no cat: the sums of a GPT-2-XL pass are GBs)
    sizes = [1 if every[k] is None else math.prod(every[k][0]) for k in keys]
    buffer = torch.empty(sum(sizes), dtype=torch.float64, device=comm)
    for k, part in zip(keys, buffer.split(sizes), strict=True):
        v = values.get(k)
        if v is None:
            part.fill_(fill)
        else:
            part.copy_(v.reshape(-1) if isinstance(v, torch.Tensor) else torch.tensor([float(v)], dtype=torch.float64))
    with _collective():
        torch.distributed.all_reduce(buffer, op=getattr(torch.distributed.ReduceOp, _OPS[op]))
    out: dict[K, torch.Tensor | float] = {}
    for k, part in zip(keys, buffer.split(sizes), strict=True):
        m, v = every[k], values.get(k)
        if m is None:
            out[k] = float(part.item())
        else:
            dtype = v.dtype if isinstance(v, torch.Tensor) else getattr(torch, m[1])
            target = v.device if isinstance(v, torch.Tensor) else home
            out[k] = part.reshape(m[0]).to(device=target, dtype=dtype)
    return out


def all_reduce_sum(values: Mapping[K, torch.Tensor | float], *, device: Any = None) -> dict[K, torch.Tensor | float]:
    """:func:`all_reduce` with ``op="sum"``: partial sums (and counts) of every rank added in fp64."""
    return all_reduce(values, "sum", device=device)


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` without a process group); small objects only."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    with _collective():
        torch.distributed.all_gather_object(out, obj)
    return out


def gather_batches(parts: Sequence[T]) -> list[T]:
    """Every rank's per-batch results (``parts``, one per batch of :func:`batch_starts`) in global
    batch order, on every rank: for passes whose results are rows (per example), not sums.
    Objects travel pickled in memory, so keep them small (per-example numbers, not activations).

    >>> gather_batches([1, 2])
    [1, 2]
    """
    if not active():
        return list(parts)
    return [p for part in all_gather_object(list(parts)) for p in part]   # blocks are contiguous


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself without a process group)."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    with _collective():
        torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 only and its result sent to every rank (e.g. calls to a paid API that
    must not repeat per rank). An exception on rank 0 is raised on every rank (not a hang): as
    itself on rank 0, as :class:`RankFailedError` naming it on the others."""
    if not active():
        return fn()
    if is_main():
        try:
            result = fn()
        except BaseException as e:
            broadcast_object(("error", f"{type(e).__name__}: {e}"))
            raise
        box = broadcast_object(("ok", result))
    else:
        box = broadcast_object(None)
    status, value = box
    if status == "error":
        raise RankFailedError(f"rank 0 failed: {value}")
    return value


def model_fingerprint(model: Any) -> str:
    """A cheap fingerprint of a model: every parameter's name, shape and float64 sum and sum of
    squares (reads each weight once on its device; no copy to the host, unlike a content hash)."""
    h = hashlib.blake2b(digest_size=12)
    items = sorted(model.state_dict().items())
    sums = []
    for name, t in items:
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        if t.is_floating_point() or t.is_complex():
            d = t.detach().to(torch.float64)
            sums.append(torch.stack([d.sum(), (d * d).sum()]).cpu())
    if sums:
        # rounded: the same weights give the same sums on every rank; 10 digits ignore nothing real
        h.update(repr([f"{x:.10e}" for x in torch.cat(sums).tolist()]).encode())
    return h.hexdigest()


def _tokens_digest(tokens: torch.Tensor | None) -> str | None:
    if tokens is None:
        return None
    h = hashlib.blake2b(digest_size=12)
    h.update(tokens.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return f"{list(tokens.shape)}:{h.hexdigest()}"


def _describe(value: Any) -> str | None:
    if isinstance(value, torch.Tensor):
        return _tokens_digest(value)
    text = repr(value)
    return text if len(text) <= 120 else f"{text[:60]}... ({hashlib.blake2b(text.encode(), digest_size=8).hexdigest()})"


def check_consistent(what: str, model: Any = None, tokens: torch.Tensor | None = None,
                     attention_mask: torch.Tensor | None = None, **extra: Any) -> None:
    """Raise :class:`DistributedMismatchError` on *every* rank unless all ranks run the same pass
    ``what`` on the same model, tokens (shape and content), mask and ``extra`` settings (tensors
    among them compared by shape and content).

    Run once at the start of a data-parallel pass: a rank that saw other data would otherwise add
    wrong partial sums, or wait forever in a collective of another shape. A no-op without a process
    group.
    """
    if not active():
        return
    mine = {"pass": what, "model": None if model is None else model_fingerprint(model),
            "tokens": _tokens_digest(tokens), "attention_mask": _tokens_digest(attention_mask),
            **{k: _describe(v) for k, v in sorted(extra.items())}}
    every = all_gather_object(mine)
    for r, theirs in enumerate(every):
        diff = [k for k in sorted(set(mine) | set(theirs)) if every[0].get(k) != theirs.get(k)]
        if diff:
            k = diff[0]
            raise DistributedMismatchError(
                f"{what}: the ranks of the process group disagree on {', '.join(diff)} (rank 0: {every[0].get(k)}, "
                f"rank {r}: {theirs.get(k)}); every rank must load the same model and pass the same tokens and "
                "settings (each takes its own shard of the batches)")


TEST_EXIT_ENV = "TL_MODULAR_TEST_RANK_EXIT"


def exit_if_asked(stage: str) -> None:
    """Tests only: a rank that dies. With ``TL_MODULAR_TEST_RANK_EXIT="RANK:STAGE[:STATUS]"`` the
    process of rank ``RANK`` (``0`` without a process group) exits at once with ``STATUS`` (default
    1; no clean-up, no ``atexit``, as a crash) where ``stage`` begins."""
    spec = os.environ.get(TEST_EXIT_ENV, "")
    if not spec:
        return
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(p.strip().lstrip("-").isdigit() for p in parts[::2]):
        raise ValueError(f"{TEST_EXIT_ENV}={spec!r}: expected RANK:STAGE or RANK:STAGE:STATUS, e.g. 1:graph")
    if int(parts[0]) == rank() and parts[1] == stage:
        status = int(parts[2]) if len(parts) == 3 else 1
        print(f"rank {rank()}: exits with status {status} at {stage!r} ({TEST_EXIT_ENV})", file=sys.stderr, flush=True)
        os._exit(status)
