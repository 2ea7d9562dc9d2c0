"""Which encoder parameters train in Stages 2 and 3, and their counts (docs/method.md#stage-2).

:func:`apply_tuning` is the one place that decides trainability (:data:`TUNING_STRATEGIES`, and with LoRA the
LayerNorms of :data:`TRAINABLE_NORMS`) and logs trainable vs total parameters (:func:`count_parameters`).
Folding LoRA back into plain weights is :func:`pacx.weights.layout.merge_lora_state`. The strategies in
detail: docs/design.md#tuning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from peft import LoraConfig, get_peft_model
from torch import nn

from pacx.constants import LORA_ALPHA, LORA_DROPOUT, LORA_R, LORA_TARGETS

log = logging.getLogger(__name__)


def _all_norms(encoder: nn.Module) -> list[nn.Module]:
    return [m for m in encoder.modules() if isinstance(m, nn.LayerNorm)]


# trainable_norms -> the encoder's LayerNorms that train with LoRA (the encoder before peft wraps it)
TRAINABLE_NORMS: dict[str, Callable[[nn.Module], list[nn.Module]]] = {
    "all": _all_norms,
    "final": lambda encoder: [encoder.norm],
    "none": lambda encoder: [],
}


def _lora(encoder: nn.Module, r: int, alpha: int, dropout: float, targets: Sequence[str], n_blocks: int,
          norms: str = "all") -> nn.Module:
    trained = TRAINABLE_NORMS[norms](encoder)
    model = get_peft_model(encoder, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                               target_modules=list(targets), bias="none"))
    for module in trained:
        for p in module.parameters():
            p.requires_grad_(True)
    return model


def _last_n_blocks(encoder: nn.Module, r: int, alpha: int, dropout: float, targets: Sequence[str],
                   n_blocks: int, norms: str = "all") -> nn.Module:
    depth = len(encoder.blocks)
    if not 0 < n_blocks <= depth:
        raise ValueError(f"last_n_blocks needs 0 < n <= {depth}, got {n_blocks}")
    for p in encoder.parameters():
        p.requires_grad_(False)
    for module in [*encoder.blocks[depth - n_blocks:], encoder.norm]:
        for p in module.parameters():
            p.requires_grad_(True)
    return encoder


def _full(encoder: nn.Module, r: int, alpha: int, dropout: float, targets: Sequence[str], n_blocks: int,
          norms: str = "all") -> nn.Module:
    for name, p in encoder.named_parameters():
        p.requires_grad_(name != "pos_embed")
    return encoder


def _linear_probe(encoder: nn.Module, r: int, alpha: int, dropout: float, targets: Sequence[str],
                  n_blocks: int, norms: str = "all") -> nn.Module:
    return encoder.requires_grad_(False)


TUNING_STRATEGIES: dict[str, Callable[..., nn.Module]] = {
    "linear_probe": _linear_probe,
    "finetune": _full,
    "lora": _lora,
    "last_n_blocks": _last_n_blocks,
    "full": _full,
}


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) number of parameter elements of ``module``."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def apply_tuning(
    encoder: nn.Module, strategy: str = "lora", lora_r: int = LORA_R, lora_alpha: int = LORA_ALPHA,
    lora_dropout: float = LORA_DROPOUT, lora_targets: Sequence[str] = LORA_TARGETS, last_n_blocks: int = 4,
    trainable_norms: str = "all",
) -> nn.Module:
    """Set trainability by ``strategy`` (and, for LoRA, ``trainable_norms``); returns the (possibly
    peft-wrapped) encoder and logs the counts."""
    if strategy not in TUNING_STRATEGIES:
        raise KeyError(f"unknown tuning strategy {strategy!r}; known: {sorted(TUNING_STRATEGIES)}")
    if trainable_norms not in TRAINABLE_NORMS:
        raise KeyError(f"unknown trainable_norms {trainable_norms!r}; known: {sorted(TRAINABLE_NORMS)}")
    if strategy != "lora" and trainable_norms != "all":
        raise ValueError(f"trainable_norms {trainable_norms!r} applies to tuning 'lora'; {strategy!r} trains "
                         "whole blocks, their norms included (set trainable_norms: all)")
    model = TUNING_STRATEGIES[strategy](encoder, lora_r, lora_alpha, lora_dropout, lora_targets,
                                        last_n_blocks, trainable_norms)
    trainable, total = count_parameters(model)
    log.info("tuning %s (norms: %s): %s of %s encoder parameters trainable (%.2f %%)", strategy,
             trainable_norms, f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model
