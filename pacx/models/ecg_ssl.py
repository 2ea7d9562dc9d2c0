"""Self-supervised pretraining of an ECGFounder network: the demo's ECG teacher (docs/method.md#teachers).

:class:`ECGContrastive` trains ECGFounder at ``demo_small`` width by contrastive view prediction (SimCLR, Chen
et al. 2020; random time crops as in CLOCS, Kiyasseh et al. 2021) on preprocessed records ``[B, 12, 5000]``.
:func:`export_ecg_teacher` writes the backbone as an ECGFounder safetensors file that ``pacx.teachers`` uses
like the real one. Why this objective and these views: docs/design.md#demo-ecg-teacher.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pacx.debug import check_not_debug
from pacx.dist import gather_with_grad
from pacx.losses import symmetric_clip_loss
from pacx.models.ecgfounder import ECGFOUNDER_CONFIGS, ECGFounder, create_ecgfounder
from pacx.utils import portable_source
from pacx.weights.checkpoint import (
    CheckpointError,
    checkpoint_file,
    load_state_checked,
    safe_torch_load,
    save_safetensors,
    strip_prefix,
)

log = logging.getLogger(__name__)

STAGE_ECG_SSL = "ecg_ssl"  # stage stamp of the training checkpoints (``pacx.lit.ecg_ssl``)
BACKBONE_PREFIX = "model.backbone."  # the backbone's keys inside a Lightning checkpoint

__all__ = [
    "STAGE_ECG_SSL", "ECGAugmentConfig", "ECGContrastive", "ECGViewAugment", "ProjectionHead", "ViewInfoNCE",
    "export_ecg_teacher", "view_retrieval_top1",
]

# --------------------------------------------------------------------------------------------------
# Views


@dataclass(frozen=True)
class ECGAugmentConfig:
    """Random view of a preprocessed (z-scored) record; defaults are the demo values.

    ``crop_samples``: length of the random time crop (samples; 2048 = 4.1 s at 500 Hz, 3-10 beats at 45-140
        bpm);
    ``scale_range``: amplitude factor, log-uniform in [lo, hi] per record;
    ``noise_std``: white Gaussian noise (z units); ``wander_amp``: peak of a sinusoidal baseline drift,
    uniform in [0, wander_amp] per lead, at a frequency uniform in ``wander_hz`` per record (respiration);
    ``lead_mask_prob``: each lead is zeroed with this probability; ``fs``: sampling rate (Hz).
    """

    crop_samples: int = 2048
    scale_range: tuple[float, float] = (0.8, 1.25)
    noise_std: float = 0.05
    wander_amp: float = 0.2
    wander_hz: tuple[float, float] = (0.05, 0.5)
    lead_mask_prob: float = 0.1
    fs: float = 500.0

    def __post_init__(self) -> None:
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {self.scale_range}")
        if not 0.0 <= self.lead_mask_prob < 1.0:
            raise ValueError(f"lead_mask_prob must be in [0, 1), got {self.lead_mask_prob}")
        if self.crop_samples < 1 or self.noise_std < 0 or self.wander_amp < 0:
            raise ValueError(f"crop_samples must be >= 1 and noise_std, wander_amp >= 0: {self}")


def _uniform(shape: tuple[int, ...], lo: float, hi: float, generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    """U(lo, hi) draws; from ``generator`` (on its own device, then moved) or the global RNG on ``device``."""
    gen_device = generator.device if generator is not None else device
    return (lo + (hi - lo) * torch.rand(shape, generator=generator, device=gen_device)).to(device)


class ECGViewAugment(nn.Module):
    """``forward(x [B, L, T], generator=None) -> [B, L, crop_samples]``: one random view per record.

    Crop (a contiguous window, no resampling) → amplitude scale → baseline wander → noise → lead mask.
    Every draw is made for the whole batch at once; with a seeded ``generator`` the view is
    reproducible. Parameter-free.
    """

    def __init__(self, cfg: ECGAugmentConfig = ECGAugmentConfig()) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        c = self.cfg
        b, n_leads, t = x.shape
        if c.crop_samples > t:
            raise ValueError(f"crop_samples {c.crop_samples} is longer than the records ({t} samples)")
        dev = x.device
        start = (_uniform((b,), 0, 1, generator, dev)
                 * (t - c.crop_samples + 1)).long().clamp_(max=t - c.crop_samples)
        idx = start[:, None] + torch.arange(c.crop_samples, device=dev)  # [B, C]
        view = x.gather(-1, idx[:, None, :].expand(b, n_leads, c.crop_samples))  # [B, L, C]

        lo, hi = math.log(c.scale_range[0]), math.log(c.scale_range[1])
        view = view * _uniform((b, 1, 1), lo, hi, generator, dev).exp()  # [B, 1, 1] log-uniform gain
        time = torch.arange(c.crop_samples, device=dev, dtype=view.dtype) / c.fs  # [C] seconds
        freq = _uniform((b, 1, 1), *c.wander_hz, generator, dev)
        phase = _uniform((b, 1, 1), 0, 2 * math.pi, generator, dev)
        amp = _uniform((b, n_leads, 1), 0, c.wander_amp, generator, dev)  # [B, L, 1]
        view = view + amp * torch.sin(2 * math.pi * freq * time + phase)  # [B, L, C]
        gen_device = generator.device if generator is not None else dev
        noise = torch.randn(view.shape, generator=generator, device=gen_device, dtype=view.dtype).to(dev)
        view = view + c.noise_std * noise
        keep = (_uniform((b, n_leads, 1), 0, 1, generator, dev) >= c.lead_mask_prob).to(view.dtype)
        return view * keep  # [B, L, C]; a masked lead is flat zero


# --------------------------------------------------------------------------------------------------
# Head and loss


class ProjectionHead(nn.Module):
    """SimCLR's MLP head ``Linear → GELU → Linear``: [B, D] -> [B, out_dim]; used for the loss only."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ViewInfoNCE(nn.Module):
    """Symmetric InfoNCE between two views: row ``i`` of ``za`` [B, P] pairs with row ``i`` of ``zb``.

    ``loss`` = mean of the a→b and b→a cross-entropies of cosine similarities / ``temperature``, keys
    gathered across ranks (:func:`pacx.losses.symmetric_clip_loss`). Also returns ``pos_cos`` / ``neg_cos``,
    the mean cosine of matching / non-matching local pairs (no gradient).
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, za: torch.Tensor, zb: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast(device_type=za.device.type, enabled=False):
            za, zb = za.float(), zb.float()
            loss = symmetric_clip_loss(za, zb, 1.0 / self.temperature)
            with torch.no_grad():
                cos = F.normalize(za, dim=-1) @ F.normalize(zb, dim=-1).t()  # [B, B]
                eye = torch.eye(len(cos), dtype=torch.bool, device=cos.device)
                neg = cos[~eye].mean() if len(cos) > 1 else cos.new_zeros(())
        return {"loss": loss, "pos_cos": cos.diagonal().mean(), "neg_cos": neg}


@torch.no_grad()
def view_retrieval_top1(za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
    """Share of rows whose nearest other-view row (cosine) is their own pair, mean of both directions.

    Under DDP over the global batch, every rank's rows (the keys the InfoNCE scores against; a collective
    call), so the reading does not depend on the number of devices; the identity gather on one process."""
    za, zb = gather_with_grad(za), gather_with_grad(zb)  # [W·B, P]
    sim = F.normalize(za.float(), dim=-1) @ F.normalize(zb.float(), dim=-1).t()  # [W·B, W·B]
    target = torch.arange(len(sim), device=sim.device)
    return 0.5 * ((sim.argmax(1) == target).float().mean() + (sim.argmax(0) == target).float().mean())


# --------------------------------------------------------------------------------------------------
# Model


class ECGContrastive(nn.Module):
    """An ECGFounder backbone (``arch`` by name, no ``dense`` head) trained by view contrast.

    ``forward(x [B, 12, T]) -> [B, D]``: the standard ECGFounder feature (time mean of the last stage);
    ``forward_views(x, generator) -> (features [2B, D], za [B, P], zb [B, P])``: two views per record
    through backbone and head in one pass; ``forward_loss(x, generator) -> dict`` (``loss`` and terms).
    """

    def __init__(self, arch: str = "demo_small", augment: ECGAugmentConfig = ECGAugmentConfig(),
                 proj_hidden_dim: int = 256, proj_dim: int = 128, temperature: float = 0.1) -> None:
        super().__init__()
        self.arch = arch
        self.backbone: ECGFounder = create_ecgfounder(arch, head=False)
        for m in self.backbone.modules():  # built for the release's keys, never called (use_bn=False)
            if isinstance(m, nn.BatchNorm1d):
                m.requires_grad_(False)
        self.embed_dim = self.backbone.embed_dim
        self.augment = ECGViewAugment(augment)
        self.projector = ProjectionHead(self.embed_dim, proj_hidden_dim, proj_dim)
        self.criterion = ViewInfoNCE(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # [B, D]

    def forward_views(self, x: torch.Tensor, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        views = torch.cat([self.augment(x, generator), self.augment(x, generator)])  # [2B, L, C]
        features = self.backbone(views)  # [2B, D]
        za, zb = self.projector(features).chunk(2)  # [B, P] each
        return features, za, zb

    def forward_loss(self, x: torch.Tensor,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        features, za, zb = self.forward_views(x, generator)
        out = self.criterion(za, zb)
        out["view_top1"] = view_retrieval_top1(za, zb)
        out["feature_std"] = features.detach().float().std(dim=0).mean()  # collapse alarm
        return out

    def config_dict(self) -> dict:
        """What a checkpoint records to rebuild the backbone: the config name and its tensors' layout."""
        return {"ecgfounder_config": self.arch, "ecgfounder_arch": asdict(self.backbone.cfg)}


# --------------------------------------------------------------------------------------------------
# Export


def export_ecg_teacher(source: str | Path, out: str | Path, which: str = "last") -> Path:
    """Write the backbone of an ECG SSL run (directory) or checkpoint as ECGFounder safetensors at ``out``.

    The checkpoint is opened with ``weights_only=True`` and must carry the ``ecg_ssl`` stage stamp (a
    :class:`CheckpointError` naming the path otherwise). The tensors under ``model.backbone.`` (head and
    projector dropped) are checked strictly against the recorded ECGFounder config before anything is
    written, so ``load_ecgfounder(out, config=<that config>)`` loads the file strictly. The metadata
    holds ``format``, ``config``, ``stage``, ``source`` / ``source_sha256`` / ``source_run`` (no absolute
    path, :func:`pacx.utils.portable_source`) and ``global_step``. A debug run is refused
    (:mod:`pacx.debug`).
    """
    path = checkpoint_file(source, which)
    ckpt = safe_torch_load(path)
    meta = ckpt.get("pacx") if isinstance(ckpt, dict) else None
    stage = meta.get("stage") if isinstance(meta, dict) else None
    if isinstance(meta, dict):
        check_not_debug(meta.get("debug"), f"checkpoint {path}")
    if stage != STAGE_ECG_SSL:
        raise CheckpointError(f"{path} is not an ECG SSL ({STAGE_ECG_SSL!r}) training checkpoint (its stage "
                              f"is {stage!r}): export_ecg_teacher exports `python -m pacx.teachers` runs of "
                              "pacx.lit.ecg_ssl")
    config = meta.get("ecgfounder_config")
    if config not in ECGFOUNDER_CONFIGS:
        raise CheckpointError(f"{path}: unknown ECGFounder config {config!r} (known: "
                              f"{sorted(ECGFOUNDER_CONFIGS)})")
    state = strip_prefix(ckpt["state_dict"], BACKBONE_PREFIX)
    load_state_checked(create_ecgfounder(config, head=False), state, source=str(path))
    meta = {"format": "ecgfounder", "config": config, "stage": STAGE_ECG_SSL, **portable_source(path),
            "global_step": json.dumps(ckpt.get("global_step"))}
    out = save_safetensors(state, out, meta)
    log.info("wrote the %r ECG teacher of %s to %s (%d tensors)", config, path, out, len(state))
    return out
