"""Transcoders: an MLP's input mapped to its output through sparse features (sae-lens ``Transcoder``).

sae-lens 6.54 runs transcoders but has no trainer class for them, so this module adds one: a
subclass of sae-lens' ``StandardTrainingSAE`` whose training step encodes the MLP's input and
reconstructs its output, driven by sae-lens' own ``SAETrainer``. The result is an ordinary
``sae_lens.Transcoder`` (``cfg.metadata.hook_name`` the input hook, ``hook_name_out`` the output
hook) that saves and loads like any SAE.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int

from tl_modular._names import act_name, mlp_name
from tl_modular._tokens import check_tokens
from tl_modular.sae._attach import _width, iter_activations, save_atomic
from tl_modular.sae._train import SAETrainConfig, _Batches, _shuffled
from tl_modular.segmentation import segment

if TYPE_CHECKING:
    from sae_lens import SAE


def is_transcoder(sae: SAE) -> bool:
    return getattr(getattr(sae, "cfg", None), "d_out", None) is not None


def output_hook(sae: SAE) -> str:
    name = getattr(sae.cfg.metadata, "hook_name_out", None)
    if not name:
        raise ValueError("this transcoder does not say which hook it writes (cfg.metadata.hook_name_out)")
    return name


def _training_class() -> tuple[type, type]:
    """Built on first use so that importing tl_modular does not import sae-lens."""
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepOutput

    @dataclass
    class TranscoderTrainingConfig(StandardTrainingSAEConfig):
        d_out: int = 0

    class TrainingTranscoder(StandardTrainingSAE):
        """Reads ``sae_in = [x_in, y_out]``; encodes x_in, reconstructs y_out."""

        def initialize_weights(self) -> None:
            super().initialize_weights()
            w = torch.nn.init.kaiming_uniform_(torch.empty(self.cfg.d_sae, self.cfg.d_out))
            self.W_dec = torch.nn.Parameter(0.1 * w / w.norm(dim=1, keepdim=True))   # sae-lens' 0.1 init norm
            self.b_dec = torch.nn.Parameter(torch.zeros(self.cfg.d_out))

        def training_forward_pass(self, step_input: Any) -> Any:
            x, y = step_input.sae_in[:, : self.cfg.d_in], step_input.sae_in[:, self.cfg.d_in:]
            feature_acts, hidden_pre = self.encode_with_hidden_pre(x)
            out = feature_acts @ self.W_dec + self.b_dec
            mse = ((out - y) ** 2).sum(-1).mean()
            aux = self.calculate_aux_loss(step_input=step_input, feature_acts=feature_acts, hidden_pre=hidden_pre,
                                          sae_out=out)
            losses = {"mse_loss": mse, **aux}
            return TrainStepOutput(sae_in=y, sae_out=out, feature_acts=feature_acts, hidden_pre=hidden_pre,
                                   loss=sum(losses.values()), losses=losses)

    return TranscoderTrainingConfig, TrainingTranscoder


def train_transcoder(model: Any, tokens: Int[torch.Tensor, "batch pos"], layer: int,
                     config: SAETrainConfig | None = None, *, attention_mask: torch.Tensor | None = None,
                     output_path: str | os.PathLike | None = None, model_batch_size: int = 64) -> Any:
    """Train a transcoder for MLP ``layer``: its normalized input (``ln2.hook_normalized``, or
    ``hook_resid_mid`` without normalization) to its output (``hook_mlp_out``), with sae-lens'
    ``SAETrainer``. Inputs and outputs are scaled to unit mean norm per dimension for training and
    the scales folded back, so ``l1_coefficient`` does not depend on the model's scale.

    >>> tc = tlm.sae.train_transcoder(model, tokens, 0, attention_mask=mask)     # doctest: +SKIP
    >>> tlm.sae.unfold(model, comp, "L0.MLP", tc, tokens)                         # doctest: +SKIP
    """
    from sae_lens import Transcoder, TranscoderConfig

    tokens, attention_mask = check_tokens(tokens, attention_mask, model=model)
    cfg = config or SAETrainConfig()
    if cfg.architecture != "standard":
        raise ValueError("transcoders train with the standard (ReLU + L1) architecture")
    channel = segment(model)[mlp_name(layer)]
    hooks = (channel.input_hook, act_name("mlp_out", layer))
    d_in, d_out = (int(torch.tensor(_width(model, h)).prod()) for h in hooks)
    # scales from one batch of data: mean norm sqrt(d) on each side
    first = next(iter_activations(model, tokens[:model_batch_size], list(hooks),
                                  attention_mask=None if attention_mask is None else attention_mask[:model_batch_size]))
    s_in = d_in ** 0.5 / float(first[hooks[0]].norm(dim=1).mean())
    s_out = d_out ** 0.5 / float(first[hooks[1]].norm(dim=1).mean())
    cfg_cls, cls = _training_class()
    torch.manual_seed(cfg.seed)
    tsae = cls(cfg_cls(d_in=d_in, d_sae=cfg.d_sae or 8 * d_in, d_out=d_out, l1_coefficient=cfg.l1_coefficient,
                       apply_b_dec_to_input=False, normalize_activations="none"))
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    steps = cfg.n_tokens // cfg.batch_size
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.n_tokens, train_batch_size_samples=cfg.batch_size, lr=cfg.lr,
        lr_end=cfg.lr_end if cfg.lr_end is not None else cfg.lr / 10, lr_scheduler_name="cosineannealing",
        logger=LoggingConfig(log_to_wandb=False), dead_feature_window=max(1, min(1000, steps // 4)))
    pairs = _shuffled(model, tokens, list(hooks), attention_mask, cfg, model_batch_size,
                      rows=lambda acts: torch.cat([acts[hooks[0]] * s_in, acts[hooks[1]] * s_out], 1))
    data = _Batches(pairs, cfg.batch_size)
    trained = SAETrainer(cfg=trainer_cfg, sae=tsae, data_provider=data).fit()
    tc_cfg = TranscoderConfig(d_in=d_in, d_sae=tsae.cfg.d_sae, d_out=d_out, apply_b_dec_to_input=False)
    tc_cfg.metadata.hook_name = hooks[0]
    tc_cfg.metadata.hook_name_out = hooks[1]
    tc_cfg.metadata.model_name = getattr(model.cfg, "model_name", None)
    tc = Transcoder(tc_cfg)
    with torch.no_grad():  # fold the training scales: z = ReLU(x s_in W_enc + b_enc), y = (z W_dec + b_dec) / s_out
        tc.W_enc.copy_(trained.W_enc * s_in)
        tc.b_enc.copy_(trained.b_enc)
        tc.W_dec.copy_(trained.W_dec / s_out)
        tc.b_dec.copy_(trained.b_dec / s_out)
    if output_path is not None:
        save_atomic(tc, output_path)
    return tc
