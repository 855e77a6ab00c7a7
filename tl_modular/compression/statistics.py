"""Streaming statistics of every channel: input, output and Jacobian second moments.

One pass over token batches (memory independent of the number of tokens) accumulates, in
float64 on the model's device, everything :func:`tl_modular.compress` needs:

- per input hook (a layer's normalized input ``y``): mean and covariance;
- per channel write: mean and covariance in its *source* coordinates (``z`` of a head, whose
  write is ``z @ W_O``; the MLP output itself);
- per read port (a head's query, key and value paths, an MLP's input): the read-side Jacobian
  moment ``E[J Jᵀ]`` of the channel's write with respect to that input, in the port's
  coordinates (``d_head`` for heads, ``d_model`` for MLPs);
- per MLP: the write-side moment ``E[Jᵀ J]`` and the input/output cross-covariance.

Closed forms (exact, cheap): MLPs with elementwise activations ``J = W_in diag(s) W_out``
(gated MLPs as ``[W_gate | W_in] diag([act'(g) l, act(g)]) [W_out; W_out]``); heads through the
softmax Jacobian from the cached q, k, v and pattern (rotary positions included). The
matrix-free path estimates the same moments with random probes through ``torch.func`` /
autograd vector-Jacobian products, never materialising a per-token Jacobian; it validates the
closed forms and covers what they do not (``solu_ln``, qk-norm, soft-capped scores).

Conventions: TransformerLens' row vectors, ``d_out = d_in @ J``. Position 0 (BOS) and padded
positions are excluded from every statistic (as inputs and as outputs).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from tl_modular import _dist
from tl_modular._hooks import func_guard, hook_guard, run_with_cache
from tl_modular._names import act_name
from tl_modular._tokens import check_tokens, position_weights
from tl_modular.segmentation import Channel, ChannelSet, segment

__all__ = ["InputStats", "PortStats", "Statistics", "WriteStats", "collect_statistics", "read_map"]

Method = Literal["closed_form", "matrix_free"]


class _Sum:
    """Running sums of rows: count, sum and sum of outer products (float64)."""

    def __init__(self) -> None:
        self.n = 0.0
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    def add(self, rows: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        rows = rows.to(torch.float64)
        w = rows if weight is None else rows * weight[:, None]
        s1, s2 = w.sum(0), w.T @ rows
        self.n += float(rows.shape[0] if weight is None else weight.sum())
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2

    def mean(self) -> torch.Tensor:
        return self.s1 / self.n

    def cov(self) -> torch.Tensor:
        mu = self.mean()
        return self.s2 / self.n - torch.outer(mu, mu)


@dataclass
class InputStats:
    """Mean and covariance of a channel input ``y`` (a layer's normalized residual stream)."""

    hook: str
    mean: Float[torch.Tensor, " d_y"]
    cov: Float[torch.Tensor, "d_y d_y"]
    n_tokens: int


@dataclass
class PortStats:
    """Read-side Jacobian moment of one input port.

    ``E[J Jᵀ]`` in input coordinates is ``map @ jacobian @ map.T`` (``map`` is ``None`` for an
    identity port): heads keep it in their ``d_head`` q/k/v coordinates, where it is small.
    """

    input_hook: str
    jacobian: Float[torch.Tensor, "k k"] | None      # None when collected without Jacobians
    map: Float[torch.Tensor, "d_y k"] | None = None

    def in_input_coordinates(self) -> torch.Tensor:
        return self.jacobian if self.map is None else self.map @ self.jacobian @ self.map.T


@dataclass
class WriteStats:
    """Write-side statistics in source coordinates; the write is ``source @ map``.

    ``map`` is the head's ``W_O`` (``[d_head, d_model]``) or ``None`` for MLPs (identity).
    """

    mean: Float[torch.Tensor, " k"]
    cov: Float[torch.Tensor, "k k"]
    map: Float[torch.Tensor, "k d_model"] | None = None
    jacobian: Float[torch.Tensor, "k k"] | None = None   # E[Jᵀ J], MLPs only
    cross: Float[torch.Tensor, "d_y k"] | None = None     # Cov(y, source), MLPs only

    def mean_write(self) -> torch.Tensor:
        return self.mean if self.map is None else self.mean @ self.map

    def cov_write(self) -> torch.Tensor:
        return self.cov if self.map is None else self.map.T @ self.cov @ self.map


@dataclass
class Statistics:
    """Everything one pass collected. ``reads[channel][port]``, ``writes[channel]``, ``inputs[hook]``."""

    inputs: dict[str, InputStats]
    reads: dict[str, dict[str, PortStats]]
    writes: dict[str, WriteStats]
    n_tokens: int
    method: str
    channel_names: list[str] = field(default_factory=list)
    #: Seconds spent in the forward passes, input moments, head and MLP statistics.
    timings: dict[str, float] = field(default_factory=dict)


# --- helpers --------------------------------------------------------------------------------

def _norm_affine(c: Channel) -> tuple[Any, Any]:
    """The (scale, shift) a channel's normalization applies after ``hook_normalized``."""
    ln = "ln1" if c.kind == "head" else "ln2"
    w, b = c.weights.get(f"{ln}.w"), c.weights.get(f"{ln}.b")
    return (1.0 if w is None else w.detach()), (0.0 if b is None else b.detach())


def read_map(c: Channel, port: str) -> torch.Tensor:
    """The linear map from a channel's input coordinates (``input_hook``) into a port, float64.

    The input hook holds the normalized residual stream *before* the normalization's scale:
    a head's query is ``(y * w + b) @ W_Q + b_Q``, so its map is ``diag(w) @ W_Q``. Ports:
    ``"q"``, ``"k"``, ``"v"`` (heads), ``"in"`` and ``"gate"`` (MLPs).
    """
    name = {"q": "W_Q", "k": "W_K", "v": "W_V", "in": "W_in", "gate": "W_gate"}[port]
    w = c.weights[name].detach().to(torch.float64)
    scale, _ = _norm_affine(c)
    return w if isinstance(scale, float) else scale.to(torch.float64)[:, None] * w


def _query_moment(A: torch.Tensor, k: torch.Tensor, vc: torch.Tensor, kbar: torch.Tensor,
                  w: torch.Tensor) -> torch.Tensor:
    """``Σ_b Σ_i w_i y_i y_iᵀ`` with ``y_i = Σ_j A_ij (k_j - kbar_i) ⊗ vc_j``, without forming ``y``.

    ``y_i y_iᵀ = K̃_iᵀ W_i K̃_i`` with ``W_i = (a_i a_iᵀ) ∘ (VC VCᵀ)`` and ``K̃_i = K - 1 kbar_iᵀ``;
    expanding the centring turns the sum over queries into ``[pos, pos]`` and ``[pos, d]`` products
    (O(n²d) per head instead of O(n²d²)).
    """
    m = vc @ vc.transpose(1, 2)                                          # [b, j, j']
    w_sum = (A.transpose(1, 2) * w[:, None, :]) @ A * m                  # Σ_i w_i W_i
    r = A * (A @ m)                                                      # r_i = W_i 1
    cross = (kbar * w[..., None]).transpose(1, 2) @ (r @ k)              # Σ_i w_i kbar_i (r_iᵀ K)
    c = r.sum(-1) * w                                                    # w_i 1ᵀ W_i 1
    out = k.transpose(1, 2) @ w_sum @ k - cross - cross.transpose(1, 2)
    out = out + (kbar * c[..., None]).transpose(1, 2) @ kbar
    return out.sum(0)


def _rotations(attn: Any, n: int, d_head: int, device: Any) -> torch.Tensor:
    """``R[i]`` with rotary(q)_i = q_i @ R[i], read off the model's own rotary function."""
    eye = torch.eye(d_head, device=device, dtype=attn.rotary_sin.dtype)
    probe = eye[:, None, None, :].expand(d_head, n, 1, d_head).contiguous()
    out = attn.apply_rotary(probe)                      # [a, pos, 1, d_head] = e_a @ R[pos]
    return out[:, :, 0, :].permute(1, 0, 2).to(torch.float64)  # [pos, a, b]


def _act_fn(model: Any, mlp: Any) -> Any:
    """The MLP's elementwise activation (a TransformerBridge MLP does not expose it)."""
    fn = getattr(mlp, "act_fn", None)
    if fn is None:
        from transformer_lens.factories.activation_function_factory import ActivationFunctionFactory

        fn = ActivationFunctionFactory.pick_activation_function(model.cfg)
    return fn


def _attn_scale(model: Any, layer: int) -> float:
    """What the attention scores are divided by (TransformerLens' ``attn_scale``)."""
    scale = getattr(model.blocks[layer].attn, "attn_scale", None)
    if scale is None:  # TransformerBridge: derive it from the config as HookedTransformer does
        cfg = model.cfg
        scale = (getattr(cfg, "attn_scale", None) or cfg.d_head ** 0.5) if getattr(cfg, "use_attn_scale", True) else 1.0
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            scale *= layer + 1
    return float(scale)


def _closed_form_heads_ok(model: Any) -> str | None:
    cfg = model.cfg
    reasons = [(getattr(cfg, "use_qk_norm", False), "qk-norm"),
               (getattr(cfg, "attn_scores_soft_cap", -1.0) > 0, "soft-capped attention scores"),
               (getattr(cfg, "clip_qkv", None) is not None, "clipped q/k/v"),
               (getattr(cfg, "use_logn_attn", False), "log-n attention scaling")]
    return next((why for flag, why in reasons if flag), None)


def _closed_form_mlp_ok(model: Any) -> str | None:
    return "solu_ln activation" if getattr(model.cfg, "act_fn", None) == "solu_ln" else None


# --- the pass -----------------------------------------------------------------------------------

def collect_statistics(
    model: Any,
    tokens: Int[torch.Tensor, "batch pos"],
    channels: ChannelSet | None = None,
    *,
    names: Sequence[str] | None = None,
    attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
    batch_size: int = 16,
    method: Method = "closed_form",
    n_probes: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> Statistics:
    """Accumulate the statistics of every head and MLP channel in one streaming pass.

    Args:
        model: A HookedTransformer or TransformerBridge (compatibility mode).
        tokens: ``[batch, pos]`` token ids; processed ``batch_size`` rows at a time.
        channels: From :func:`~tl_modular.segment` (built if omitted).
        names: Only these heads and MLPs (all by default).
        attention_mask: ``[batch, pos]``, 1 for real tokens; padded positions are excluded and
            passed to the model.
        method: ``"closed_form"`` (exact; falls back to matrix-free per channel where no closed
            form exists) or ``"matrix_free"`` (randomized, ``n_probes`` probes per batch, seeded
            by ``seed`` and the batch's index).

    Under ``torch.distributed`` (a process group initialised, e.g. by ``torchrun``) each rank
    passes the same ``tokens``, takes its shard of the batches, and every rank returns the
    statistics of all of them (partial sums all-reduced in float64).

    >>> stats = collect_statistics(model, tokens)                   # doctest: +SKIP
    >>> stats.reads["L1.MLP"]["in"].jacobian.shape                  # doctest: +SKIP
    torch.Size([128, 128])
    """
    channels = channels or segment(model)
    tokens, attention_mask = check_tokens(tokens, attention_mask, model=model)
    if method not in ("closed_form", "matrix_free"):
        raise ValueError(f"method must be 'closed_form' or 'matrix_free', got {method!r}")
    acc = _Accumulator(model, channels, method, n_probes, seed, names)
    _dist.check_consistent("collect_statistics", model, tokens, attention_mask, names=names, batch_size=batch_size,
                           method=method, n_probes=n_probes, seed=seed)
    starts = _dist.batch_starts(tokens.shape[0], batch_size)
    bar = tqdm(starts, disable=not progress or not _dist.is_main(), desc="statistics", leave=False)
    with torch.no_grad():
        for start in bar:
            mask = None if attention_mask is None else attention_mask[start:start + batch_size].to(model.cfg.device)
            acc.add(tokens[start:start + batch_size].to(model.cfg.device), mask, index=start // batch_size)
    acc.all_reduce()
    return acc.finish()


class _Accumulator:
    """Streaming sums of one pass. ``jacobians=False`` keeps the first and second moments only
    (inputs, writes, input/output cross-covariances): what Fisher-based compression needs, which
    gets its read sensitivities from gradients instead (:mod:`tl_modular.compression.fisher`)."""

    def __init__(self, model: Any, channels: ChannelSet, method: Method, n_probes: int, seed: int,
                 names: Sequence[str] | None = None, jacobians: bool = True) -> None:
        self.model, self.channels, self.cfg, self.jacobians = model, channels, model.cfg, jacobians
        chosen = [channels[n] for n in names] if names is not None else channels.of_kind("head", "mlp")
        bad = [c.name for c in chosen if c.kind not in ("head", "mlp")]
        if bad:
            raise ValueError(f"statistics exist for heads and MLPs only, not {bad}")
        self.heads = [c for c in chosen if c.kind == "head"]
        self.mlps = [c for c in chosen if c.kind == "mlp"]
        self.timings = {"forward": 0.0, "inputs": 0.0, "heads": 0.0, "mlps": 0.0}
        head_reason = _closed_form_heads_ok(model)
        mlp_reason = _closed_form_mlp_ok(model)
        self.head_method = "matrix_free" if method == "matrix_free" or head_reason else "closed_form"
        self.mlp_method = "matrix_free" if method == "matrix_free" or mlp_reason else "closed_form"
        self.n_probes, self.seed = n_probes, seed
        self.gen = torch.Generator(device=self.cfg.device).manual_seed(seed)
        self.inputs: dict[str, _Sum] = {}
        self.src: dict[str, _Sum] = {}
        self.cross: dict[str, torch.Tensor] = {}
        self.port: dict[tuple[str, str], torch.Tensor] = {}
        self.mlp_m: dict[str, torch.Tensor] = {}       # sum of s sᵀ (closed form)
        self.mlp_write: dict[str, torch.Tensor] = {}   # sum of Jᵀ J (matrix free)
        self.n_tokens = 0
        self._rot: dict[int, torch.Tensor] = {}

    # names of the hooks one batch needs
    def hook_names(self) -> list[str]:
        names = set()
        for c in self.heads + self.mlps:
            names.add(c.input_hook)
        for l in {c.layer for c in self.heads}:
            names.add(act_name("z", l))
            if self.jacobians:
                names |= {act_name(k, l) for k in ("q", "k", "v", "pattern")}
                if self.cfg.positional_embedding_type == "rotary":
                    names |= {act_name("rot_q", l), act_name("rot_k", l)}
        for c in self.mlps:
            names.add(act_name("mlp_out", c.layer))
            if self.jacobians:
                names.add(act_name("pre", c.layer))
                if self.cfg.gated_mlp:
                    names.add(act_name("pre_linear", c.layer))
        return sorted(names)

    def _add(self, store: dict, key: Any, value: torch.Tensor) -> None:
        store[key] = value if key not in store else store[key] + value

    def add(self, batch: torch.Tensor, mask: torch.Tensor | None, index: int | None = None) -> None:
        """Add one batch; ``index`` (its global batch index) reseeds the random probes, so that the
        probes of a batch do not depend on which rank runs it."""
        if index is not None:
            self.gen.manual_seed(_dist.batch_seed(self.seed, index))
        names = set(self.hook_names())
        kwargs = {} if mask is None else {"attention_mask": mask}
        clock = time.perf_counter()
        _, cache = run_with_cache(self.model, batch, names_filter=lambda n: n in names, **kwargs)
        self._tick("forward", clock)
        self.consume(cache, batch, mask)

    def consume(self, cache: Any, batch: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Add one batch from its cached activations (``hook_names()``; any mapping of them)."""
        clock = time.perf_counter()
        w = position_weights(batch, mask)
        valid = w > 0
        self.n_tokens += int(valid.sum())
        for hook in {c.input_hook for c in self.heads + self.mlps}:
            self.inputs.setdefault(hook, _Sum()).add(cache[hook][valid])
        clock = self._tick("inputs", clock)
        for layer in sorted({c.layer for c in self.heads}):
            self._add_heads(layer, cache, w, mask)
        clock = self._tick("heads", clock)
        for c in self.mlps:
            self._add_mlp(c, cache, valid)
        self._tick("mlps", clock)

    def _tick(self, key: str, since: float) -> float:
        now = time.perf_counter()
        self.timings[key] += now - since
        return now

    # --- heads ----------------------------------------------------------------------------
    def _add_heads(self, layer: int, cache: Any, w: torch.Tensor, mask: torch.Tensor | None) -> None:
        attn = self.model.blocks[layer].attn
        heads = [c for c in self.heads if c.layer == layer]
        z = cache[act_name("z", layer)].to(torch.float64)                       # [b, n, h, d]
        valid = w > 0
        for c in heads:
            self.src.setdefault(c.name, _Sum()).add(z[:, :, c.head][valid])
        if not self.jacobians:
            return
        if self.head_method == "matrix_free":
            self._add_heads_matrix_free(layer, heads, cache, w, mask)
            return
        pattern = cache[act_name("pattern", layer)].to(torch.float64)           # [b, h, i, j]
        rotary = self.cfg.positional_embedding_type == "rotary"
        q = cache[act_name("rot_q" if rotary else "q", layer)].to(torch.float64)
        k = cache[act_name("rot_k" if rotary else "k", layer)].to(torch.float64)
        v = cache[act_name("v", layer)].to(torch.float64)
        scale = _attn_scale(self.model, layer)
        n = q.shape[1]
        rot = self._rotation(layer, attn, n) if rotary else None
        for c in heads:
            h, g = c.head, c.kv_head
            A = pattern[:, h]                                             # [b, i, j]
            w_o = c.weights["W_O"].detach().to(torch.float64)
            evals, evecs = torch.linalg.eigh(w_o @ w_o.T)
            chol = evecs * evals.clamp_min(0).sqrt()                      # chol @ chol.T = W_O W_Oᵀ
            vc = v[:, :, g] @ chol                                        # [b, j, d]
            kr, qr = k[:, :, g], q[:, :, h]
            # value port: J_{j->i} = A_ij W_O, over valid outputs i and inputs j
            A_io = A * w[:, :, None] * w[:, None, :]
            self._add(self.port, (c.name, "v"), (A_io ** 2).sum() * (w_o @ w_o.T))
            # query port: J_i = (1/scale) sum_j A_ij (k_j - kbar_i) ⊗ vc_j, in rotated coordinates
            kbar = A @ kr
            # key port: J_{j->i} = (1/scale) A_ij q_i ⊗ (vc_j - vcbar_i)
            vbar = A @ vc
            e = (vc ** 2).sum(-1)[:, None, :] - 2 * vbar @ vc.transpose(1, 2) + (vbar ** 2).sum(-1)[:, :, None]
            weight = (A_io ** 2) * e / scale ** 2                          # [b, i, j]
            if rot is None:
                self._add(self.port, (c.name, "q"), _query_moment(A, kr, vc, kbar, w) / scale ** 2)
                self._add(self.port, (c.name, "k"), torch.einsum("bi,bid,bie->de", weight.sum(2), qr, qr))
            else:
                # rotary: each query position has its own rotation, so keep the per-position grams
                y = torch.einsum("bij,bjd,bje->bide", A, kr, vc) - torch.einsum("bid,bie->bide", kbar, vbar)
                gram_q = torch.einsum("bide,bife->bidf", y, y) / scale ** 2   # [b, i, d, d]
                per_i = (gram_q * w[:, :, None, None]).sum(0)                 # valid queries only: [i, d, d]
                self._add(self.port, (c.name, "q"), torch.einsum("iab,ibc,idc->ad", rot, per_i, rot))
                per_j = torch.einsum("bij,bid,bie->jde", weight, qr, qr)
                self._add(self.port, (c.name, "k"), torch.einsum("jab,jbc,jdc->ad", rot, per_j, rot))

    def _rotation(self, layer: int, attn: Any, n: int) -> torch.Tensor:
        if layer not in self._rot or self._rot[layer].shape[0] < n:
            self._rot[layer] = _rotations(attn, n, self.cfg.d_head, self.cfg.device)
        return self._rot[layer][:n]

    def _add_heads_matrix_free(self, layer: int, heads: list[Channel], cache: Any, w: torch.Tensor,
                               mask: torch.Tensor | None) -> None:
        """Hutchinson estimate: random cotangents on every head's write, gradients at q, k, v."""
        attn = self.model.blocks[layer].attn
        leaves = {p: cache[act_name(p, layer)].detach().clone().requires_grad_(True) for p in "qkv"}
        z_out: dict[str, torch.Tensor] = {}

        def replace(p: str):
            return lambda act, hook: leaves[p]

        def keep_z(act: torch.Tensor, hook: Any) -> None:
            z_out["z"] = act

        y = cache[heads[0].input_hook]
        hooks = [(act_name(p, layer), replace(p)) for p in "qkv"] + [(act_name("z", layer), keep_z)]
        kwargs = {} if mask is None else {"attention_mask": mask}
        with torch.enable_grad(), hook_guard(self.model), self.model.hooks(fwd_hooks=hooks):
            attn(query_input=y, key_input=y, value_input=y, **kwargs)
            z = z_out["z"]                                                # [b, n, h, d]
            w_o = torch.stack([c.weights["W_O"].detach() for c in heads])  # [h', d, m]
            idx = [c.head for c in heads]
            writes = torch.einsum("bnhd,hdm->bnhm", z[:, :, idx], w_o.to(z))
            for _ in range(self.n_probes):
                u = torch.randint(0, 2, writes.shape, generator=self.gen, device=writes.device).to(writes) * 2 - 1
                u = u * w[:, :, None, None].to(u)
                grads = torch.autograd.grad((writes * u).sum(), [leaves[p] for p in "qkv"], retain_graph=True)
                for p, g in zip("qkv", grads, strict=True):
                    g = g.to(torch.float64) * w[:, :, None, None]  # inputs at valid positions only
                    for c in heads:
                        gh = g[:, :, c.head if p == "q" else c.kv_head]
                        self._add(self.port, (c.name, p), torch.einsum("bnd,bne->de", gh, gh) / self.n_probes)

    # --- MLPs -----------------------------------------------------------------------------
    def _add_mlp(self, c: Channel, cache: Any, valid: torch.Tensor) -> None:
        l = c.layer
        y = cache[c.input_hook][valid]
        out = cache[act_name("mlp_out", l)][valid]
        self.src.setdefault(c.name, _Sum()).add(out)
        yd, od = y.to(torch.float64), out.to(torch.float64)
        self._add(self.cross, c.name, yd.T @ od)
        if not self.jacobians:
            return
        mlp = self.model.blocks[l].mlp
        ln_w, ln_b = _norm_affine(c)
        if self.mlp_method == "closed_form":
            s = self._mlp_slopes(c, cache, valid, mlp)
            self._add(self.mlp_m, c.name, s.T @ s)
            return
        fn = lambda x: mlp((x * ln_w + ln_b)[:, None, :])[:, 0, :]  # noqa: E731 - per token, of y
        for _ in range(self.n_probes):
            u = torch.randint(0, 2, out.shape, generator=self.gen, device=out.device).to(out) * 2 - 1
            t = torch.randint(0, 2, y.shape, generator=self.gen, device=y.device).to(y) * 2 - 1
            with func_guard():
                _, pullback = torch.func.vjp(fn, y)
                (g,) = pullback(u)
                _, jz = torch.func.jvp(fn, (y,), (t,))
            g, jz = g.to(torch.float64), jz.to(torch.float64)
            self._add(self.port, (c.name, "in"), g.T @ g / self.n_probes)
            self._add(self.mlp_write, c.name, jz.T @ jz / self.n_probes)

    def _mlp_slopes(self, c: Channel, cache: Any, valid: torch.Tensor, mlp: Any) -> torch.Tensor:
        """Per-token slopes s with J = W_in' diag(s) W_out' (stacked for gated MLPs)."""
        pre = cache[act_name("pre", c.layer)][valid]
        ones = torch.ones_like(pre)
        with func_guard():
            act, slope = torch.func.jvp(_act_fn(self.model, mlp), (pre,), (ones,))
        if not self.cfg.gated_mlp:
            return slope.to(torch.float64)
        lin = cache[act_name("pre_linear", c.layer)][valid]
        return torch.cat([slope * lin, act], dim=-1).to(torch.float64)

    # --- results --------------------------------------------------------------------------
    def all_reduce(self) -> None:
        """Add up the partial sums of every rank (float64; a no-op without a process group). Every
        rank must call it, also one that saw no batch."""
        if not _dist.active():
            return
        flat: dict[tuple, Any] = {("n_tokens",): float(self.n_tokens)}
        for group, sums in (("inputs", self.inputs), ("src", self.src)):
            for key, acc in sums.items():
                flat[(group, key, "n")] = acc.n
                for part in ("s1", "s2"):
                    if getattr(acc, part) is not None:
                        flat[(group, key, part)] = getattr(acc, part)
        for group in ("cross", "port", "mlp_m", "mlp_write"):
            for key, value in getattr(self, group).items():
                flat[(group, key)] = value
        total = _dist.all_reduce_sum(flat)
        self.n_tokens = int(total.pop(("n_tokens",)))
        self.inputs, self.src = {}, {}
        for group in ("cross", "port", "mlp_m", "mlp_write"):
            setattr(self, group, {})
        for key, value in total.items():
            if key[0] in ("inputs", "src"):
                acc = getattr(self, key[0]).setdefault(key[1], _Sum())
                setattr(acc, key[2], value)
            else:
                getattr(self, key[0])[key[1]] = value

    def finish(self) -> Statistics:
        start = time.perf_counter()
        if self.n_tokens == 0:
            raise ValueError("no tokens left after excluding position 0 and padding; pass longer sequences")
        inputs = {h: InputStats(h, s.mean(), s.cov(), int(s.n)) for h, s in self.inputs.items()}
        reads: dict[str, dict[str, PortStats]] = {}
        writes: dict[str, WriteStats] = {}
        n = float(self.n_tokens)
        for c in self.heads:
            wts = c.weights
            reads[c.name] = {p: PortStats(c.input_hook, self.port[(c.name, p)] / n if self.jacobians else None,
                                          read_map(c, p)) for p in "qkv"}
            s = self.src[c.name]
            writes[c.name] = WriteStats(s.mean(), s.cov(), wts["W_O"].detach().to(torch.float64))
        for c in self.mlps:
            s = self.src[c.name]
            mu_y = self.inputs[c.input_hook].mean()
            cross = self.cross[c.name] / s.n - torch.outer(mu_y, s.mean())
            if not self.jacobians:
                read = write = None
            elif c.name in self.mlp_m:
                read, write = self._mlp_closed_form(c, self.mlp_m[c.name] / n)
            else:
                read, write = self.port[(c.name, "in")] / n, self.mlp_write[c.name] / n
            reads[c.name] = {"in": PortStats(c.input_hook, read)}
            writes[c.name] = WriteStats(s.mean(), s.cov(), None, write, cross)
        method = f"heads: {self.head_method}, mlps: {self.mlp_method}" if self.jacobians else "moments only"
        stats = Statistics(inputs, reads, writes, self.n_tokens, method, [c.name for c in self.heads + self.mlps],
                           self.timings)
        self.timings["finish"] = time.perf_counter() - start
        return stats

    def _mlp_closed_form(self, c: Channel, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w_out = c.weights["W_out"].detach().to(torch.float64)
        w_in = read_map(c, "in")
        if "W_gate" in c.weights:
            w_in = torch.cat([read_map(c, "gate"), w_in], dim=1)
            w_out = torch.cat([w_out, w_out], dim=0)
        read = w_in @ ((w_out @ w_out.T) * m) @ w_in.T      # E[J Jᵀ] = W_in (G ∘ M) W_inᵀ
        write = w_out.T @ ((w_in.T @ w_in) * m) @ w_out     # E[Jᵀ J] = W_outᵀ (H ∘ M) W_out
        return read, write


def statistics_hook_names(model: Any, channels: ChannelSet | None = None) -> Sequence[str]:
    """The hook points one statistics batch caches (useful to estimate memory)."""
    return _Accumulator(model, channels or segment(model), "closed_form", 1, 0).hook_names()
