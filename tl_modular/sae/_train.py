"""Training SAEs with sae-lens' trainer on a model's activations, offline and in memory."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Int

from tl_modular._names import hook_kind
from tl_modular._tokens import check_tokens
from tl_modular.sae._attach import _width, iter_activations, save_atomic

if TYPE_CHECKING:
    from sae_lens import SAE

Architecture = Literal["standard", "topk", "jumprelu"]


@dataclass(kw_only=True)
class SAETrainConfig:
    """How to train one SAE (sae-lens' ``SAETrainer``; no wandb).

    Attributes:
        d_sae: Number of features (default: 8 × d_in).
        architecture: ``"standard"`` (ReLU + L1), ``"topk"`` or ``"jumprelu"``.
        l1_coefficient: Sparsity weight for ``standard`` (activations are normalized to
            unit mean norm during training, so it does not depend on the hook's scale).
        k: Active features per token for ``topk``.
        n_tokens: Training tokens in all (activations are reused over epochs of the data).
        batch_size: Tokens per optimizer step.
        lr, lr_end: Adam learning rate, annealed (cosine) to ``lr_end``.
        buffer_tokens: Activations held and shuffled at a time (bounds memory).
        seed: Seeds the SAE's initialization and the shuffling.
    """

    d_sae: int | None = None
    architecture: Architecture = "standard"
    l1_coefficient: float = 1.0
    k: int = 16
    n_tokens: int = 1_000_000
    batch_size: int = 1024
    lr: float = 1e-3
    lr_end: float | None = None
    buffer_tokens: int = 65_536
    seed: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ("standard", "topk", "jumprelu"):
            raise ValueError(f"architecture must be 'standard', 'topk' or 'jumprelu', got {self.architecture!r}")
        for name in ("n_tokens", "batch_size", "buffer_tokens", "k"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_tokens < self.batch_size:
            raise ValueError(f"n_tokens ({self.n_tokens}) must be at least one batch ({self.batch_size})")
        if self.d_sae is not None and self.d_sae <= 0:
            raise ValueError(f"d_sae must be positive, got {self.d_sae}")


def _training_sae(d_in: int, cfg: SAETrainConfig, metadata: dict[str, Any]) -> Any:
    import sae_lens

    common = {"d_in": d_in, "d_sae": cfg.d_sae or 8 * d_in, "normalize_activations": "expected_average_only_in"}
    if cfg.architecture == "standard":
        sae_cfg = sae_lens.StandardTrainingSAEConfig(**common, l1_coefficient=cfg.l1_coefficient)
        cls = sae_lens.StandardTrainingSAE
    elif cfg.architecture == "topk":
        sae_cfg = sae_lens.TopKTrainingSAEConfig(**common, k=cfg.k)
        cls = sae_lens.TopKTrainingSAE
    else:
        sae_cfg = sae_lens.JumpReLUTrainingSAEConfig(**common, l0_coefficient=cfg.l1_coefficient)
        cls = sae_lens.JumpReLUTrainingSAE
    for key, value in metadata.items():
        sae_cfg.metadata[key] = value
    torch.manual_seed(cfg.seed)
    return cls(sae_cfg)


def train_on_activations(batches: Iterator[torch.Tensor], d_in: int, config: SAETrainConfig | None = None, *,
                         metadata: dict[str, Any] | None = None, output_path: str | os.PathLike | None = None,
                         ) -> SAE:
    """Train an SAE on an iterator of ``[batch_size, d_in]`` activation batches.

    Returns an inference ``sae_lens.SAE`` (activation scaling folded in). With ``output_path``
    it is also written there (atomically) for ``SAE.load_from_disk``.
    """
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    cfg = config or SAETrainConfig()
    tsae = _training_sae(d_in, cfg, metadata or {})
    steps = cfg.n_tokens // cfg.batch_size
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.n_tokens, train_batch_size_samples=cfg.batch_size, lr=cfg.lr,
        lr_end=cfg.lr_end if cfg.lr_end is not None else cfg.lr / 10, lr_scheduler_name="cosineannealing",
        logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=min(20, max(1, steps)),
        dead_feature_window=max(1, min(1000, steps // 4)))
    trainer = SAETrainer(cfg=trainer_cfg, sae=tsae, data_provider=_Batches(batches, cfg.batch_size))
    trained = trainer.fit()
    sae = _inference(trained)
    if output_path is not None:
        save_atomic(sae, output_path)
    return sae


class _Batches:
    """An iterator of exactly ``batch_size`` rows from batches of any size."""

    def __init__(self, source: Iterator[torch.Tensor], batch_size: int):
        self.source, self.batch_size, self.rest = source, batch_size, None

    def __iter__(self) -> _Batches:
        return self

    def __next__(self) -> torch.Tensor:
        parts, n = ([] if self.rest is None else [self.rest]), (0 if self.rest is None else self.rest.shape[0])
        while n < self.batch_size:
            x = next(self.source).detach().float()
            parts.append(x)
            n += x.shape[0]
        x = torch.cat(parts)
        self.rest = x[self.batch_size:] if x.shape[0] > self.batch_size else None
        return x[: self.batch_size]


def _inference(trained: Any) -> SAE:
    """The trained SAE as its inference class (what ``SAE.load_from_disk`` gives)."""
    from sae_lens import SAE

    with tempfile.TemporaryDirectory(prefix="tlm-sae-") as tmp:
        trained.save_inference_model(tmp)
        return SAE.load_from_disk(tmp)


def _shuffled(model: Any, tokens: torch.Tensor, hooks: list[str], attention_mask: torch.Tensor | None,
              cfg: SAETrainConfig, batch_size: int, rows: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None
              = None) -> Iterator[torch.Tensor]:
    """Endless activation rows (``rows(acts)``, default the first hook's): epochs over the data,
    shuffled within a bounded buffer of ``cfg.buffer_tokens``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = rows or (lambda acts: acts[hooks[0]])
    while True:
        order = torch.randperm(tokens.shape[0], generator=gen)
        mask = None if attention_mask is None else attention_mask[order]
        buffer: list[torch.Tensor] = []
        held = 0
        for acts in iter_activations(model, tokens[order], hooks, attention_mask=mask, batch_size=batch_size):
            buffer.append(rows(acts).cpu())
            held += buffer[-1].shape[0]
            if held >= cfg.buffer_tokens:
                x = torch.cat(buffer)
                yield x[torch.randperm(x.shape[0], generator=gen)]
                buffer, held = [], 0
        if buffer:
            x = torch.cat(buffer)
            yield x[torch.randperm(x.shape[0], generator=gen)]


def train_sae(model: Any, tokens: Int[torch.Tensor, "batch pos"], hook: str, config: SAETrainConfig | None = None, *,
              attention_mask: torch.Tensor | None = None, output_path: str | os.PathLike | None = None,
              model_batch_size: int = 64) -> SAE:
    """Train an SAE on ``model``'s activations at ``hook`` over in-memory ``tokens``.

    Uses sae-lens' ``SAETrainer`` with a streaming, shuffled activation buffer (position 0 and
    padding excluded); nothing is logged to wandb or written unless ``output_path`` is given.
    The SAE's ``cfg.metadata`` records the hook and the model, so :func:`load` and
    :func:`check_fits` work on it.

    >>> tokens, mask = tlm.toy.mixed_tokens(n_per_task=512)
    >>> sae = tlm.sae.train_sae(model, tokens, "blocks.0.hook_resid_pre", attention_mask=mask,
    ...                         config=tlm.sae.SAETrainConfig(d_sae=512, n_tokens=200_000))  # doctest: +SKIP
    """
    tokens, attention_mask = check_tokens(tokens, attention_mask, model=model)
    cfg = config or SAETrainConfig()
    d_in = 1
    for s in _width(model, hook):
        d_in *= s
    metadata = {"hook_name": hook, "model_name": getattr(model.cfg, "model_name", None),
                "hook_head_index": None, "prepend_bos": True, "context_size": int(tokens.shape[1])}
    if hook_kind(hook) == "z":
        metadata["reshape_activations"] = "hook_z"
    batches = _shuffled(model, tokens, [hook], attention_mask, cfg, model_batch_size)
    return train_on_activations(batches, d_in, cfg, metadata=metadata, output_path=output_path)
