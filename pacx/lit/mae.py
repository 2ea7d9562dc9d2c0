"""Stage 1 LightningModule: MAE pretraining (docs/method.md#stage-1, docs/datasets.md#chexpert).

Wires :class:`~pacx.models.mae.MaskedAutoencoderViT` to the shared AdamW + per-step warmup/cosine schedule
(:meth:`pacx.lit.common.StagedModule.configure_optimizers`, decay / no-decay groups). The configured
``mask_ratio`` really reaches the model, unlike the reference (docs/design.md#stage-1); validation masks
are fixed per row (:meth:`MAEModule._eval_noise`), so ``val/loss`` is comparable across epochs and device
counts.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

from pacx.constants import MAE_MASK_RATIO, STAGE_MAE
from pacx.lit.common import StagedModule
from pacx.models.flops import mae_train_flops
from pacx.models.mae import create_mae, decoder_config_dict, is_decoder_key, patchify, unpatchify
from pacx.weights.checkpoint import load_state_checked
from pacx.weights.formats import read_mae_state

log = logging.getLogger(__name__)


class MAEModule(StagedModule):
    """Masked autoencoder pretraining.

    Args:
        arch: named MAE variant (``pacx.models.mae.MAE_ARCHS``), e.g. ``mae_vit_base_patch16``.
        img_size / patch_size: input resolution and patch (``None`` = the variant's patch).
        mask_ratio: fraction of patches removed (default: the paper's, :data:`pacx.constants.MAE_MASK_RATIO`).
        norm_pix_loss: regress per-patch normalised pixels.
        lr / base_lr: absolute lr, or base lr scaled by global batch / 256 (give exactly one).
        weight_decay, betas: AdamW settings (no decay on biases, norms and tokens).
        warmup_epochs: linear warmup length; cosine to 0 afterwards.
        lr_interval: ``step`` (the lr follows the curve per optimizer step) or ``epoch`` (held within each
            epoch, as the authors' scheduler stepped; ``configs/stage1/mae_vitb_chexpert_epoch_lr.yaml``).
        init_from: optional weights to start from (MAE release, a Stage 1 run/checkpoint, an encoder).
        compile: run the training step's model call (masking, encoder, decoder, loss) through
            ``torch.compile``: one graph without breaks (``tests/models/test_mae_compile.py``), the same loss
            and gradients up to floating-point rounding. The parameters stay those of ``model``, so
            checkpoints and exports are unchanged. Validation, reconstructions and ``encode`` stay eager.
        compile_options: keyword arguments for ``torch.compile``, e.g. ``{mode: max-autotune-no-cudagraphs}``.
        fused_adamw: ``AdamW(fused=True)``; ``None`` (default) fuses when every parameter is on a CUDA device
            (:meth:`pacx.lit.common.StagedModule.configure_optimizers`).
    """

    stage = STAGE_MAE
    monitor = ("val/loss", "min")

    def __init__(
        self,
        arch: str = "mae_vit_base_patch16",
        img_size: int = 224,
        patch_size: int | None = None,
        mask_ratio: float = MAE_MASK_RATIO,
        norm_pix_loss: bool = False,
        lr: float | None = 1.5e-4,
        base_lr: float | None = None,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_epochs: float = 10,
        init_from: str | None = None,
        lr_interval: Literal["step", "epoch"] = "step",
        compile: bool = False,
        compile_options: dict | None = None,
        fused_adamw: bool | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}: the loss is the mean over the "
                             "masked patches, so training needs at least one masked and one visible patch")
        self.save_hyperparameters()
        self.model = create_mae(arch, img_size, patch_size, norm_pix_loss=norm_pix_loss,
                                mask_ratio=mask_ratio)
        if init_from:
            self._init_weights(init_from)

    def _init_weights(self, path: str) -> None:
        state, fmt = read_mae_state(path)
        # an encoder-only file leaves the whole decoder random; a file with part of a decoder is an error
        has_decoder = any(is_decoder_key(k) for k in state)
        missing_decoder = [] if has_decoder else sorted(
            k for k in self.model.state_dict() if is_decoder_key(k))
        load_state_checked(self.model, state, f"{path} ({fmt})", expected_missing=missing_decoder)
        log.info("initialised MAE from %s (%s)%s", path, fmt, "; decoder random" if missing_decoder else "")

    def pacx_metadata(self) -> dict:
        return {"vit_config": self.model.cfg.to_dict(), "decoder": decoder_config_dict(self.model),
                "mask_ratio": self.hparams.mask_ratio}

    def train_flops_per_image(self) -> int:
        """Analytic matmul FLOPs of one training image, forward and backward (:mod:`pacx.models.flops`);
        read by :class:`pacx.perf.fit.StepThroughput` for MFU."""
        return mae_train_flops(self.model.cfg, self.model.dec, self.hparams.mask_ratio, 1)

    def train_model(self) -> nn.Module:
        """What the training step calls: ``model``, or with ``compile`` its ``torch.compile`` wrapper, built
        on first use and kept outside the module tree (no ``_orig_mod.`` keys in the state dict)."""
        if not self.hparams.get("compile"):
            return self.model
        compiled = self.__dict__.get("_compiled_model")
        if compiled is None:
            options = dict(self.hparams.get("compile_options") or {})
            compiled = torch.compile(self.model, **options)
            object.__setattr__(self, "_compiled_model", compiled)
            log.info("Stage 1 training step compiled with torch.compile(%s)",
                     ", ".join(f"{k}={v!r}" for k, v in options.items()))
        return compiled

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.model.encode(imgs)

    def _shared_step(self, batch, stage: str, batch_idx: int) -> torch.Tensor:
        imgs = batch[0]
        noise = None
        model = self.model
        if stage == "train":
            model = self.train_model()
            # random_masking's own draw, made eagerly: in a compiled graph inductor draws other masks
            noise = torch.rand(imgs.shape[0], self.model.cfg.num_patches, device=imgs.device)
        else:
            noise = self._eval_noise(stage, imgs.shape[0], batch_idx).to(imgs.device)
        loss, _, _ = model(imgs, mask_ratio=self.hparams.mask_ratio, noise=noise)
        self.log_stage(stage, {"loss": loss}, imgs.shape[0])
        return loss

    def _eval_noise(self, stage: str, rows: int, batch_idx: int) -> torch.Tensor:
        """The masking noise of an evaluation batch: fixed per row, so ``val/loss`` is comparable across
        epochs and the same on any number of devices.

        The rows of global batch ``b`` draw ``rand(global batch, patches)`` from a generator seeded with
        ``b``; under DDP the evaluation loader (:class:`pacx.data.common.ShardSampler`) gives rank ``r`` the
        rows ``r, r + W, ...`` of each global batch, and the rank takes those rows of the draw. On one
        device this is the draw of the batch itself."""
        trainer = self._trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        loader = None
        if trainer is not None:
            loader = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
        per_device = getattr(loader, "batch_size", None) or rows
        gen = torch.Generator().manual_seed(batch_idx)
        noise = torch.rand(per_device * world, self.model.cfg.num_patches, generator=gen)
        return noise[rank::world][:rows]

    def on_train_start(self) -> None:
        for logger in self.loggers:
            logger.log_hyperparams({"effective_lr": self.effective_lr})

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input, reconstruction with visible patches pasted back), both [B, C, H, W]."""
        m = self.model
        gen = torch.Generator().manual_seed(seed)
        noise = torch.rand(imgs.shape[0], m.cfg.num_patches, generator=gen).to(imgs.device)
        _, pred, mask = m(imgs, mask_ratio=self.hparams.mask_ratio, noise=noise)
        if m.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
            target = patchify(imgs, m.cfg.patch_size)
            pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
        p, c = m.cfg.patch_size, m.cfg.in_chans
        mask_img = unpatchify(mask[..., None].expand(-1, -1, p * p * c), p, c)  # 1 = removed
        recon = unpatchify(pred, p, c)
        return imgs * (1 - mask_img), imgs * (1 - mask_img) + recon * mask_img
