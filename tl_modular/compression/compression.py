"""Low-rank compression of every channel to the subspaces it reads and writes.

Each head and MLP gets a *read side* per input port (a head's ``q``, ``k``, ``v``; an MLP's
``in``) and a *write side*. A side is an encoder/decoder pair ``[k, r]`` (``Π = E Dᵀ``,
oblique where the best projection is) plus the data mean: restricting ``x`` keeps
``μ + (x - μ) E Dᵀ`` and replaces the discarded part by its mean on the data.

Read sides live in the channel's input coordinates ``ŷ`` (its ``input_hook``: the normalized
residual stream before the normalization's scale, so that LayerNorm stays exact); their
``basis`` maps them into residual-stream coordinates (``ŷ = P x / σ``: a functional ``u`` on
``ŷ`` reads the residual direction ``P u``, with ``P`` the centering of LayerNorm). Write
sides live in residual-stream coordinates. So one channel's write basis and another's read
basis compare directly.

Statistics. ``read="fisher"`` (its ``write`` is then ``"fisher"`` too) is downstream-aware: each
side keeps the directions whose loss would move the model's own next-token distribution most (the
Fisher moments of :mod:`~tl_modular.compression.fisher`: ``KL ≈ ½ δᵀ F δ``), from one forward and
backward pass, and a budget goes to the directions worth most across all channels, since Fisher
spectra share one unit. For fidelity it is the measured best on real text
(``benchmarks/compression_text.py``: at 35% of the read and of the write dimensions, KL 0.70 nats
against 1.57 for output PCA). It is not the default yet: channel graphs built on Fisher bases
recover planted modules and the bundled modular model's modules less well than on the default's.
Candidates judged by the channel's own Jacobian (read): ``"jacobian"`` — top eigenvectors of ``E[J Jᵀ]``;
``"whitened"`` — the same weighted by the input covariance (the optimal oblique projector for
the linearized output error ``E‖(ŷ - μ)(I - Π) J‖²``); ``"rrr"`` — reduced-rank regression of
an MLP's output on its input (heads fall back to ``"whitened"``). Write: ``"output"`` — PCA of
the channel's actual write; ``"jacobian"`` — ``E[Jᵀ J]`` (MLPs; heads use ``W_O``'s row space).

>>> comp = tlm.compress(model, tokens)                       # doctest: +SKIP
>>> comp["L1.MLP"].read.basis.shape, comp["L1.H3"].read["q"].rank  # doctest: +SKIP
>>> with comp.applied(model):                                # doctest: +SKIP
...     loss = model(tokens, return_type="loss")
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int

from tl_modular._hooks import hook_guard
from tl_modular._io import (
    SCHEMA_VERSION,
    artifact_digest,
    bind_files,
    check_bound,
    check_shapes,
    read_json,
    read_safetensors,
    read_versioned_json,
    reading,
    write_json,
    write_safetensors,
)
from tl_modular._models import check_finite, fingerprint
from tl_modular._names import act_name, hook_kind
from tl_modular.compression.fidelity import fidelity
from tl_modular.compression.fisher import FisherStats, collect_fisher
from tl_modular.compression.refine import refine
from tl_modular.compression.restriction import restriction_hooks
from tl_modular.compression.statistics import Statistics, collect_statistics, read_map
from tl_modular.errors import ArtifactError, UnsupportedModelError
from tl_modular.segmentation import Channel, ChannelSet, segment

__all__ = ["ChannelCompression", "Compression", "ReadSpace", "Side", "compress"]

ReadStatistic = Literal["jacobian", "whitened", "rrr", "fisher"]
WriteStatistic = Literal["output", "jacobian", "fisher"]
# Directions whose singular value is below this fraction of the largest carry only rounding
# noise (fp32 activations give ~1e-7) and are dropped; eigenvalues of covariances use its square.
_REL_TOL = 1e-6
_SCHEMA = "tl_modular.Compression"


@dataclass
class Side:
    """One side of a channel restricted to a subspace: ``x ↦ μ + (x - μ) E Dᵀ``.

    ``encoder``/``decoder`` hold all ``max_rank`` directions, most important first; ``rank``
    says how many are kept. ``spectrum[i]`` is what direction ``i`` is worth under the defining
    statistic (units of squared output), so ``spectrum[rank:].sum()`` is what truncation costs.
    """

    full_encoder: Float[torch.Tensor, "k max_rank"]
    full_decoder: Float[torch.Tensor, "k max_rank"]
    mean: Float[torch.Tensor, " k"]
    spectrum: Float[torch.Tensor, " max_rank"]
    centered: bool  # read sides through LayerNorm: residual functionals are centred (P u)
    statistic: str
    rank: int
    role: Literal["read", "write"] = "read"

    @property
    def max_rank(self) -> int:
        return self.full_encoder.shape[1]

    @property
    def encoder(self) -> Float[torch.Tensor, "k r"]:
        return self.full_encoder[:, : self.rank]

    @property
    def decoder(self) -> Float[torch.Tensor, "k r"]:
        return self.full_decoder[:, : self.rank]

    @property
    def oblique(self) -> bool:
        return not torch.allclose(self.full_encoder, self.full_decoder, atol=1e-6)

    @property
    def basis(self) -> Float[torch.Tensor, "d_model r"]:
        """Orthonormal basis of the side's subspace in residual-stream coordinates."""
        # A read side reads the functionals x ↦ x E; a write side writes the directions of D.
        vecs = self.encoder if self.role == "read" else self.decoder
        if self.centered:
            vecs = vecs - vecs.mean(0, keepdim=True)
        if vecs.shape[1] == 0:
            return vecs
        q, r = torch.linalg.qr(vecs)
        return q[:, (r.diagonal().abs() > 1e-8 * r.diagonal().abs().max())]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``μ + (x - μ) E Dᵀ`` on the last dimension."""
        mu = self.mean.to(x)
        return mu + ((x - mu) @ self.encoder.to(x)) @ self.decoder.to(x).T

    def discarded(self, x: torch.Tensor) -> torch.Tensor:
        """``x - project(x)``, the part the restriction removes."""
        mu = self.mean.to(x)
        centred = x - mu
        return centred - (centred @ self.encoder.to(x)) @ self.decoder.to(x).T

    def with_rank(self, rank: int) -> Side:
        if not 0 <= rank <= self.max_rank:
            raise ValueError(f"rank must lie in [0, {self.max_rank}], got {rank}")
        return replace(self, rank=rank)


class ReadSpace(Mapping[str, Side]):
    """A channel's read sides by port (``"q"``, ``"k"``, ``"v"`` or ``"in"``); ``.basis`` spans all."""

    def __init__(self, sides: dict[str, Side]) -> None:
        self._sides = sides

    def __getitem__(self, port: str) -> Side:
        try:
            return self._sides[port]
        except KeyError:
            raise KeyError(f"no read port {port!r}; this channel has {sorted(self._sides)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._sides)

    def __len__(self) -> int:
        return len(self._sides)

    @property
    def basis(self) -> Float[torch.Tensor, "d_model r"]:
        """Orthonormal basis of the span of every port's read subspace (residual coordinates)."""
        vecs = torch.cat([s.basis for s in self._sides.values()], dim=1)
        if vecs.shape[1] == 0:
            return vecs
        u, s, _ = torch.linalg.svd(vecs, full_matrices=False)
        return u[:, s > 1e-6 * s.max()]

    @property
    def rank(self) -> int:
        return sum(s.rank for s in self._sides.values())


@dataclass
class ChannelCompression:
    """The read sides and write side of one channel."""

    name: str
    kind: str
    read: ReadSpace
    write: Side

    @property
    def sides(self) -> dict[str, Side]:
        """Every side by key (``"read:q"`` ..., ``"write"``)."""
        return {**{f"read:{p}": s for p, s in self.read.items()}, "write": self.write}


@dataclass(eq=True)
class Compression(Mapping[str, ChannelCompression]):
    """Every compressed channel of one model: a read-only mapping channel name → :class:`ChannelCompression`
    (``len``, ``in``, iteration over names, ``keys``/``values``/``items``/``get``), in the order compressed
    (stream order unless ``compress(channels=...)`` named them otherwise).

    Two compressions compare equal as dataclasses (same fields), not as mappings.

    >>> comp["L1.H3"].write.rank, "L0.MLP" in comp, list(comp)[:2]          # doctest: +SKIP
    (4, True, ['L0.H0', 'L0.H1'])
    """

    channels: dict[str, ChannelCompression]
    model_fingerprint: str
    n_tokens: int
    config: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> ChannelCompression:
        try:
            return self.channels[name]
        except KeyError:
            raise KeyError(f"no compressed channel {name!r}; compressed: {', '.join(list(self.channels)[:6])}"
                           ", ...") from None

    def __contains__(self, name: object) -> bool:
        return name in self.channels

    def __iter__(self) -> Iterator[str]:
        return iter(self.channels)

    def __len__(self) -> int:
        return len(self.channels)

    def __repr__(self) -> str:
        return (f"Compression({len(self)} channels, {self.total_rank} of {self.max_total_rank} dimensions, "
                f"{self.n_tokens} tokens)")

    def sides(self) -> dict[tuple[str, str], Side]:
        """Every side of every channel, keyed ``(channel, "read:q" | ... | "write")``."""
        return {(n, k): s for n, c in self.channels.items() for k, s in c.sides.items()}

    @property
    def total_rank(self) -> int:
        return sum(s.rank for s in self.sides().values())

    @property
    def max_total_rank(self) -> int:
        """The sum over channels and sides of each side's maximum rank."""
        return sum(s.max_rank for s in self.sides().values())

    def truncated(self, *, energy: float | None = None, rank: int | None = None,
                  budget: int | Mapping[str, int] | None = None) -> Compression:
        """A copy with ranks chosen anew from the stored spectra (no new pass over data).

        Exactly one of: ``energy`` (per side, the smallest rank keeping that fraction of the
        spectrum), ``rank`` (per side, capped at its maximum), ``budget`` (total dimensions,
        given to the directions worth most across all sides).
        """
        ranks = _choose_ranks(self.sides(), energy=energy, rank=rank, budget=budget)
        channels = {}
        for name, c in self.channels.items():
            read = ReadSpace({p: s.with_rank(ranks[(name, f"read:{p}")]) for p, s in c.read.items()})
            channels[name] = replace(c, read=read, write=c.write.with_rank(ranks[(name, "write")]))
        return replace(self, channels=channels)

    # --- running compressed -----------------------------------------------------------------
    @contextmanager
    def applied(self, model: Any, channels: Sequence[str] | None = None, *,
                restrict_first: bool = False) -> Iterator[Any]:
        """Run ``model`` with every (or the named) channel restricted to its subspaces.

        By hooks only; the model is exactly as before on exit, also when the body raises.
        Position 0 is left unrestricted (its statistics were excluded) unless
        ``restrict_first``.
        """
        self.check_model(model)
        names = list(self.channels) if channels is None else list(channels)
        for n in names:
            self[n]
        hooks = restriction_hooks(model, self, names, restrict_first=restrict_first)
        with hook_guard(model), model.hooks(fwd_hooks=hooks):
            yield model

    def refined(self, model: Any, tokens: Int[torch.Tensor, "batch pos"], *, steps: int = 300, **kwargs: Any
                ) -> Compression:
        """A copy whose kept directions are fitted end to end against the clean model's KL, ranks
        fixed (:func:`tl_modular.compression.refine.refine`). Choose ranks first: ``truncated`` afterwards
        keeps the refined directions but the added ones come from the closed form."""
        return refine(self, model, tokens, steps=steps, **kwargs)

    def check_model(self, model: Any) -> None:
        """Raise if ``model`` is not the model this compression was computed on."""
        if fingerprint(model) != self.model_fingerprint:
            raise ValueError("this compression belongs to another model (its weights or config differ); "
                             "compress this model with tlm.compress(model, tokens)")

    def fidelity(self, model: Any, tokens: Int[torch.Tensor, "batch pos"], **kwargs: Any) -> dict[str, float]:
        """Clean, compressed and mean-ablated CE loss, CE loss recovered and KL to the clean model."""
        return fidelity(model, self, tokens, **kwargs)

    def factored(self, model: Any, name: str, circuit: Literal["OV", "QK"] = "OV") -> Any:
        """The compressed head's OV or QK map as a ``transformer_lens.FactoredMatrix``: from input
        coordinates ``ŷ`` to the residual stream (OV), or query ``ŷ`` × key ``ŷ`` (QK), float64."""
        from transformer_lens import FactoredMatrix

        c = self[name]
        if c.kind != "head":
            raise ValueError(f"{name} is not a head; OV and QK maps exist for heads only")
        self.check_model(model)
        channel = segment(model)[name]
        maps = {p: read_map(channel, p) for p in "qkv"} | {"o": channel.weights["W_O"].detach().double()}
        if circuit == "OV":
            v, w = c.read["v"], c.write
            inner = v.decoder.T @ maps["v"] @ maps["o"] @ w.encoder      # [r_v, r_w]
            return FactoredMatrix(v.encoder, inner @ w.decoder.T)
        if circuit == "QK":
            q, k = c.read["q"], c.read["k"]
            return FactoredMatrix(q.encoder @ (q.decoder.T @ maps["q"]), (maps["k"].T @ k.decoder) @ k.encoder.T)
        raise ValueError(f"circuit must be 'OV' or 'QK', got {circuit!r}")

    # --- files ------------------------------------------------------------------------------
    def _payload(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors (float32, as stored) and the index that :meth:`save` writes."""
        tensors: dict[str, torch.Tensor] = {}
        index: dict[str, Any] = {}
        for (name, key), s in self.sides().items():
            prefix = f"{name}/{key}/"
            for part in ("full_encoder", "full_decoder", "mean", "spectrum"):
                tensors[prefix + part] = getattr(s, part).to(torch.float32)
            index.setdefault(name, {"kind": self[name].kind, "sides": {}})["sides"][key] = {
                "rank": s.rank, "statistic": s.statistic, "centered": s.centered}
        meta = {"model_fingerprint": self.model_fingerprint, "n_tokens": self.n_tokens,
                "config": self.config, "channels": index}
        return tensors, meta

    def digest(self) -> str:
        """SHA-256 of what :meth:`save` writes (the same before a save and after a load): a graph
        records it, so that loading the graph beside another compression is refused.

        >>> comp.digest() == tlm.Compression.load(comp.save("comp")).digest()   # doctest: +SKIP
        True
        """
        tensors, meta = self._payload()
        return artifact_digest(meta, tensors)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``compression.safetensors`` + ``compression.json`` into ``directory`` (atomically)."""
        directory = Path(directory)
        tensors, meta = self._payload()
        # tensors first, the index last, binding them (a save interrupted between them is refused at load)
        write_safetensors(directory / "compression.safetensors", tensors,
                          {"kind": "compression", "bound_to": "compression.json"})
        write_json(directory / "compression.json", {"schema": _SCHEMA, "version": SCHEMA_VERSION, **meta,
                                                    "files": bind_files(directory, ["compression.safetensors"])})
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, model: Any | None = None) -> Compression:
        """Read a saved compression; with ``model``, refuse it unless it is the same model. Reads the
        header of tl_modular 0.1.0.dev0 too (``{"kind": "compression", "schema_version": 1}``)."""
        directory, writer = Path(directory), "Compression.save (compress again)"
        legacy = _legacy_header(directory / "compression.json")
        meta = read_versioned_json(directory, "compression.json", "compression" if legacy else _SCHEMA, writer,
                                   schema_key="kind" if legacy else "schema",
                                   version_key="schema_version" if legacy else "version",
                                   required=("channels", "model_fingerprint"))
        tensors, _ = read_safetensors(directory / "compression.safetensors", writer=writer)
        tensors = {k: v.to(torch.float64) for k, v in tensors.items()}
        channels = {}
        with reading(directory / "compression.json", writer):
            for name, info in meta["channels"].items():
                sides = {}
                for key, side in info["sides"].items():
                    p = f"{name}/{key}/"
                    enc = tensors.get(p + "full_encoder", torch.empty(0, 0))
                    check_shapes(tensors, {p + "full_encoder": (None, None), p + "full_decoder": enc.shape,
                                           p + "mean": enc.shape[:1], p + "spectrum": enc.shape[1:]},
                                 directory / "compression.safetensors", writer)
                    if not 0 <= side["rank"] <= enc.shape[1]:
                        raise ValueError(f"{name} {key}: rank {side['rank']} outside 0..{enc.shape[1]}")
                    sides[key] = Side(tensors[p + "full_encoder"], tensors[p + "full_decoder"], tensors[p + "mean"],
                                      tensors[p + "spectrum"], side["centered"], side["statistic"], side["rank"],
                                      "write" if key == "write" else "read")
                read = ReadSpace({k[5:]: s for k, s in sides.items() if k.startswith("read:")})
                channels[name] = ChannelCompression(name, info["kind"], read, sides["write"])
            comp = cls(channels, meta["model_fingerprint"], meta.get("n_tokens"), meta.get("config", {}))
        check_bound(directory, "compression.json", meta, ["compression.safetensors"], writer)  # from one save?
        if model is not None:
            comp.check_model(model)
        return comp


def _legacy_header(path: Path) -> bool:
    """Whether ``path`` has the header compression.json had before the one artifact convention."""
    try:
        meta = read_json(path)
    except (OSError, ArtifactError):
        return False                    # read_versioned_json says what is wrong with it
    return isinstance(meta, dict) and "schema" not in meta and meta.get("kind") == "compression"


# --- building sides -----------------------------------------------------------------------------

def _sym_sqrt(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ^{1/2}, Σ^{+1/2}) on Σ's support."""
    evals, evecs = torch.linalg.eigh(cov)
    keep = evals > _REL_TOL ** 2 * evals.max().clamp_min(1e-300)
    v, lam = evecs[:, keep], evals[keep]
    return (v * lam.sqrt()) @ v.T, (v / lam.sqrt()) @ v.T


def _from_factor(factor: torch.Tensor, roots: tuple[torch.Tensor, torch.Tensor] | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoder, decoder, spectrum minimizing ``‖Σ^{1/2}(I - E Dᵀ) F‖²`` (Σ = I when ``roots`` is None;
    else ``roots = _sym_sqrt(Σ)``)."""
    if roots is None:
        u, s, _ = torch.linalg.svd(factor, full_matrices=False)
        keep = s > _REL_TOL * s.max().clamp_min(1e-300)
        return u[:, keep], u[:, keep], s[keep] ** 2
    root, inv_root = roots
    u, s, _ = torch.linalg.svd(root @ factor, full_matrices=False)
    keep = s > _REL_TOL * s.max().clamp_min(1e-300)
    u = u[:, keep]
    return inv_root @ u, root @ u, s[keep] ** 2


def _factor(moment: torch.Tensor) -> torch.Tensor:
    """F with F Fᵀ = moment (PSD)."""
    evals, evecs = torch.linalg.eigh((moment + moment.T) / 2)
    return evecs * evals.clamp_min(0).sqrt()


def _centering(channel: Channel, model: Any) -> bool:
    """Whether the channel reads through a LayerNorm (whose residual functionals are centred)."""
    return hook_kind(channel.input_hook) == "normalized" and model.cfg.normalization_type in ("LN", "LNPre")


def _read_sides(c: Channel, stats: Statistics, statistic: ReadStatistic, model: Any,
                roots: dict[str, tuple[torch.Tensor, torch.Tensor]], fisher: FisherStats | None = None
                ) -> dict[str, Side]:
    """``roots`` caches ``_sym_sqrt`` of each input covariance: every head of a layer shares it."""
    inp = stats.inputs[c.input_hook]
    if c.input_hook not in roots:
        roots[c.input_hook] = _sym_sqrt(inp.cov)
    to_res = _centering(c, model)
    sides = {}
    for port, ps in stats.reads[c.name].items():
        # the moment whose factor defines the side: what the output uses (the loss gradient's
        # moment at the port) for "fisher", the channel's own Jacobian moment otherwise
        moment = fisher.ports[(c.name, port)] if statistic == "fisher" else ps.jacobian
        if ps.map is None or moment.shape[0] != ps.map.shape[1]:
            factor = _factor(moment)
        else:  # heads: E[JJᵀ] = R M Rᵀ with R [d, d_head]
            factor = ps.map @ _factor(moment)
        stat = statistic
        if statistic == "rrr":
            if c.kind == "mlp":
                w = stats.writes[c.name]
                _, inv_root = roots[c.input_hook]
                factor = inv_root @ inv_root @ w.cross   # OLS coefficients B = Σ⁺ Cov(ŷ, out)
            else:
                stat = "whitened"
        enc, dec, spec = _from_factor(factor, None if stat == "jacobian" else roots[c.input_hook])
        sides[port] = Side(enc, dec, inp.mean.clone(), spec, to_res, stat, enc.shape[1])
    return sides


def _write_side(c: Channel, stats: Statistics, statistic: WriteStatistic, fisher: FisherStats | None = None) -> Side:
    w = stats.writes[c.name]
    if statistic == "fisher":
        # minimise E[δ F δᵀ] over the write's deviations δ: PCA of the output in the metric of the
        # Fisher at the layer's output (the oblique projector of _from_factor with the roles of
        # data and sensitivity exchanged: factor F^{1/2}, weighted by the output covariance)
        hook = act_name("attn_out" if c.kind == "head" else "mlp_out", c.layer)
        cov = w.cov_write()
        enc, dec, spec = _from_factor(_factor(fisher.writes[hook]), _sym_sqrt(cov))
        return Side(enc, dec, w.mean_write(), spec, False, statistic, enc.shape[1], "write")
    if statistic == "output":
        factor = _factor(w.cov) if w.map is None else w.map.T @ _factor(w.cov)
    elif w.jacobian is not None:
        factor = _factor(w.jacobian)
    else:  # heads write in W_O's row space; rank its directions by the write's variance there
        factor = w.map.T
    enc, dec, spec = _from_factor(factor, None)
    return Side(enc, dec, w.mean_write(), spec, False, statistic, enc.shape[1], "write")


def _choose_ranks(sides: Mapping[tuple[str, str], Side], *, energy: float | None, rank: int | None,
                  budget: int | Mapping[str, int] | None) -> dict[tuple[str, str], int]:
    given = sum(x is not None for x in (energy, rank, budget))
    if given != 1:
        raise ValueError("choose ranks with exactly one of energy=, rank= or budget=")
    if energy is not None:
        if not 0 < energy <= 1:
            raise ValueError(f"energy must lie in (0, 1], got {energy}")
        out = {}
        for key, s in sides.items():
            total = s.spectrum.sum()
            if total <= 0:
                out[key] = 0
                continue
            frac = torch.cumsum(s.spectrum, 0) / total
            out[key] = int((frac < energy - 1e-12).sum().item()) + 1
            out[key] = min(out[key], s.max_rank)
        return out
    if rank is not None:
        if rank < 0:
            raise ValueError(f"rank must be non-negative, got {rank}")
        return {key: min(rank, s.max_rank) for key, s in sides.items()}
    if isinstance(budget, Mapping):                      # separate budgets for the read and the write sides
        if set(budget) - {"read", "write"}:
            raise ValueError(f"a budget mapping takes the keys 'read' and 'write', got {sorted(budget)}")
        out = {key: 0 for key in sides}
        for role, b in budget.items():
            part = {k: s for k, s in sides.items() if (k[1] == "write") == (role == "write")}
            out.update(_allocate(part, b))
        return out
    return _allocate(sides, budget)


def _allocate(sides: Mapping[tuple[str, str], Side], budget: int) -> dict[tuple[str, str], int]:
    """Give ``budget`` dimensions to the directions worth most across ``sides``."""
    if not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be a non-negative integer, got {budget!r}")
    # Fisher spectra are in one unit everywhere (twice the KL a dropped direction costs), so the
    # directions are compared as they are: the marginal loss decides. Other statistics measure
    # each channel in its own units; there the budget goes to the directions worth most relative
    # to their side's total — a channel's small-variance directions can carry what a task needs
    # (bracket depth at one position), and relative spectra allocate like a per-side energy
    # threshold, which measured better on the bundled model than raw squared-output units.
    absolute = all(s.statistic.startswith("fisher") for s in sides.values())
    values = [(float(v if absolute else v / s.spectrum.sum()), key) for key, s in sides.items()
              if s.spectrum.sum() > 0 for v in s.spectrum]
    values.sort(key=lambda t: -t[0])
    out = {key: 0 for key in sides}
    for _, key in values[:budget]:
        out[key] += 1
    return out


def compress(
    model: Any,
    tokens: Int[torch.Tensor, "batch pos"] | None = None,
    channels: Sequence[str] | None = None,
    *,
    read: ReadStatistic = "whitened",
    write: WriteStatistic | None = None,
    energy: float | None = None,
    rank: int | None = None,
    budget: int | Mapping[str, int] | None = None,
    statistics: Statistics | None = None,
    fisher: FisherStats | None = None,
    attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
    batch_size: int = 16,
    method: Literal["closed_form", "matrix_free"] = "closed_form",
    progress: bool = True,
) -> Compression:
    """Compress every head and MLP (or the named ones) to low-rank read and write subspaces.

    Args:
        model: A HookedTransformer or TransformerBridge in compatibility mode.
        tokens: ``[batch, pos]`` data the statistics are taken on (position 0 and padding excluded).
        channels: Names of heads/MLPs to compress; all by default.
        read, write: The statistics defining the read and write bases (see the module docs).
            ``write`` defaults to ``"fisher"`` with ``read="fisher"`` and to ``"output"``
            otherwise (the pairs measured best).
        energy, rank, budget: How ranks are chosen (at most one; default ``energy=0.99``).
        statistics: Reuse statistics from :func:`~tl_modular.statistics.collect_statistics`.
        method: How the Jacobian moments are computed (exact closed forms by default).

    Returns:
        A :class:`Compression` whose sides keep every direction; ``truncated`` re-chooses ranks.

    >>> comp = tlm.compress(model, tokens, budget=200)   # doctest: +SKIP
    """
    chans: ChannelSet = segment(model)
    if write is None:      # each read statistic with the write statistic it was measured best with
        write = "fisher" if read == "fisher" else "output"
    if getattr(model.cfg, "n_key_value_heads", None):
        raise UnsupportedModelError("compression of grouped-query attention (keys and values are shared by "
                                    "the heads of a group) is not supported yet; segmentation and patching are")
    if read not in ("jacobian", "whitened", "rrr", "fisher") or write not in ("output", "jacobian", "fisher"):
        raise ValueError(f"read must be 'jacobian', 'whitened', 'rrr' or 'fisher' and write 'output', 'jacobian' or "
                         f"'fisher'; got read={read!r}, write={write!r}")
    if statistics is None and fisher is not None and fisher.statistics is not None:
        statistics = fisher.statistics       # collected with collect_fisher(..., moments=True)
    if statistics is None and tokens is None:
        raise ValueError("pass tokens (or precomputed statistics=, or fisher= collected with moments=True)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer (sequences per forward pass), got {batch_size!r}")
    check_finite(model, "compress")
    names = [c.name for c in chans.of_kind("head", "mlp")] if channels is None else list(channels)
    for name in names:
        if chans[name].kind not in ("head", "mlp"):
            raise ValueError(f"{name} is a {chans[name].kind} channel; only heads and MLPs are compressed")
    if statistics is None and tokens is not None and read == "fisher" and write in ("fisher", "output") \
            and fisher is None:
        # one pass: gradients and the moments Fisher sides need (no Jacobian moments)
        fisher = collect_fisher(model, tokens, chans, names=names, attention_mask=attention_mask,
                                batch_size=batch_size, moments=True, progress=progress)
        statistics = fisher.statistics
    if statistics is None:
        statistics = collect_statistics(model, tokens, chans, names=names, attention_mask=attention_mask,
                                        batch_size=batch_size, method=method, progress=progress)
    if "fisher" in (read, write) and fisher is None:
        if tokens is None:
            raise ValueError("read/write='fisher' needs tokens (or precomputed fisher=)")
        fisher = collect_fisher(model, tokens, chans, names=names, attention_mask=attention_mask,
                                batch_size=batch_size, progress=progress)
    if statistics.method == "moments only" and (read != "fisher" or write == "jacobian"):
        raise ValueError(f"read={read!r}, write={write!r} need Jacobian moments; these statistics were collected "
                         "without them: pass statistics from collect_statistics(model, tokens)")
    out, roots = {}, {}
    for name in names:
        c = chans[name]
        if name not in statistics.reads:
            raise ValueError(f"the statistics hold no channel {name!r}")
        sides = _read_sides(c, statistics, read, model, roots, fisher)
        out[name] = ChannelCompression(name, c.kind, ReadSpace(sides), _write_side(c, statistics, write, fisher))
    comp = Compression(out, fingerprint(model), statistics.n_tokens,
                       {"read": read, "write": write, "method": statistics.method})
    if energy is None and rank is None and budget is None:
        energy = 0.99
    return comp.truncated(energy=energy, rank=rank, budget=budget)
