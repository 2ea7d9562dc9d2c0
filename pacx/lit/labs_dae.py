"""Labs DAE LightningModule (docs/method.md#teachers), trained by ``python -m pacx.teachers``.

Trains :class:`~pacx.models.labs_dae.LabsDAE` with masked corruption and the MSE over observed entries. Logs
per split ``loss`` / ``denoise_mse``, ``clean_mse``, ``impute_mse`` and ``latent_std``
(docs/design.md#labs-teacher); validation noise is seeded by batch index, so ``val/loss`` is comparable across
epochs.
"""

from __future__ import annotations

import torch

from pacx.lit.common import TeacherModule
from pacx.models.labs_dae import LabsDAE, LabsDAEConfig, corrupt, labs_dae_config_dict, masked_mse

STAGE_LABS_DAE = "labs_dae"


class LabsDAEModule(TeacherModule):
    """Args: widths of the DAE; ``drop_prob`` of the corruption; AdamW ``lr``, ``weight_decay`` (on every
    parameter, as the reference), ``betas``;
    ``warmup_steps`` of linear warmup, then cosine to 0 per optimizer step."""

    stage = STAGE_LABS_DAE
    eval_step_collectives = False  # a per-row reconstruction loss: evaluation reads each row once under DDP
    monitor = ("val/loss", "min")

    def __init__(
        self,
        n_labs: int = 50,
        hidden_dim: int = 512,
        latent_dim: int = 256,
        drop_prob: float = 0.15,
        lr: float = 3e-4,
        weight_decay: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 200,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = LabsDAE(LabsDAEConfig(n_labs, hidden_dim, latent_dim))

    def param_groups(self) -> list[dict]:
        """One group, every trainable parameter decayed, biases and the LayerNorm included: the reference
        optimizer is ``AdamW(self.parameters(), weight_decay=...)``, not the shared decay / no-decay split."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": self.hparams.weight_decay}]

    def pacx_metadata(self) -> dict:
        return {"labs_dae_config": labs_dae_config_dict(self.model)}

    def forward(self, percentiles: torch.Tensor, missingness: torch.Tensor) -> torch.Tensor:
        return self.model.encode(percentiles, missingness)

    def _shared_step(self, batch, stage: str, batch_idx: int) -> torch.Tensor:
        values, observed = batch[0].float(), batch[1].float()
        gen = None if stage == "train" else torch.Generator().manual_seed(batch_idx)
        x, m, hidden = corrupt(values, observed, self.hparams.drop_prob, gen)
        recon, z = self.model(x, m)
        loss = masked_mse(recon, values, observed > 0.5)
        with torch.no_grad():
            # uncorrupted raw input, mean placeholders kept: what extraction encodes (and the reference's
            # clean reconstruction)
            clean, _ = self.model(values, observed)
            terms = {
                "loss": loss,
                "denoise_mse": loss.detach(),
                "clean_mse": masked_mse(clean, values, observed > 0.5),
                "impute_mse": masked_mse(recon, values, hidden),
                "latent_std": z.float().std(dim=0).mean(),
            }
        self.log_stage(stage, terms, values.shape[0])
        return loss
