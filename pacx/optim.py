"""Optimizer groups, the LR/batch scaling rule and the per-step warmup + cosine schedule, each in one place.

* :func:`param_groups` — weight decay on ≥ 2-D weights only; biases, norms and tokens get none.
* :func:`resolve_lr` — an absolute ``lr`` or ``base_lr × global_batch / 256`` (the MAE rule).
* :func:`warmup_cosine` — linear warmup then cosine to ``min_lr_ratio``, evaluated per optimizer step, or
  held for each epoch (``interval="epoch"``: the authors' schedulers step once per epoch).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)

NO_DECAY_NAMES = ("cls_token", "pos_embed", "mask_token", "decoder_pos_embed")


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two groups over the *trainable* parameters: decayed (≥ 2-D weights) and not decayed."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(".bias") or name.split(".")[-1] in NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def resolve_lr(lr: float | None, base_lr: float | None, global_batch: int) -> float:
    """Effective learning rate: absolute ``lr``, or ``base_lr * global_batch / 256`` (exactly one given)."""
    if (lr is None) == (base_lr is None):
        raise ValueError(f"give exactly one of lr (absolute) and base_lr (scaled); got lr={lr}, "
                         f"base_lr={base_lr}")
    if lr is not None:
        return float(lr)
    effective = float(base_lr) * global_batch / 256
    log.info("lr = base_lr %.3g x global batch %d / 256 = %.4g", base_lr, global_batch, effective)
    return effective


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """LR multiplier at optimizer ``step``: (step+1)/warmup during warmup, then cosine to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


LR_INTERVALS = ("step", "epoch")


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0,
    interval: str = "step", steps_per_epoch: int = 1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step.

    ``interval="step"``: :func:`warmup_cosine` of the step. ``interval="epoch"``: the same curve over epochs,
    held constant within each epoch (epoch ``e`` gets ``warmup_cosine(e, warmup_epochs, epochs)``), which is
    what a scheduler stepped at epoch ends gives; stepping it per optimizer step keeps mid-epoch resume exact.
    """
    if interval not in LR_INTERVALS:
        raise ValueError(f"lr interval must be one of {LR_INTERVALS}, got {interval!r}")
    if interval == "epoch":
        if warmup_steps % steps_per_epoch:
            raise ValueError(f"lr_interval epoch needs a whole number of warmup epochs: {warmup_steps} "
                             f"warmup steps at {steps_per_epoch} steps per epoch")
        warmup_epochs, epochs = warmup_steps // steps_per_epoch, math.ceil(total_steps / steps_per_epoch)

        def factor(step: int) -> float:
            return warmup_cosine(step // steps_per_epoch, warmup_epochs, epochs, min_lr_ratio)
    else:
        def factor(step: int) -> float:
            return warmup_cosine(step, warmup_steps, total_steps, min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def schedule_lengths(total_steps: int, steps_per_epoch: int, warmup_epochs: float) -> tuple[int, int]:
    """(warmup steps, total steps): warmup given in epochs, total = the trainer's optimizer-step budget."""
    return int(round(warmup_epochs * steps_per_epoch)), int(total_steps)
