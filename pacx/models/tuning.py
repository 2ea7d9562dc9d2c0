"""Which encoder parameters train in Stages 2 and 3, parameter counts, and LoRA merging (docs/method.md#stage-2).

``apply_tuning(encoder, strategy, ...)`` is the one place that decides trainability (:data:`TUNING_STRATEGIES`):

* ``linear_probe``: everything is frozen (Stage 3 linear probes and the segmentation backbone).
* ``finetune``: Stage 3's name for ``full``.
* ``lora`` (default): peft LoRA (rank, alpha, dropout and targets default to the paper's, ``pacx.constants``); the encoder
  LayerNorms chosen by ``trainable_norms`` train; everything else is frozen. The wrapped encoder is a peft
  ``PeftModel``, so its state-dict keys (``base_model.model.…qkv.base_layer.weight``,
  ``…lora_A.default.weight``, ``…lora_B.default.weight``) are those of the authors' Stage 2 files.
* ``last_n_blocks``: the last ``n`` transformer blocks and the final norm train.
* ``full``: everything trains (the fixed position embedding stays fixed).

``trainable_norms`` (LoRA only; :data:`TRAINABLE_NORMS`): ``all`` (the paper: every LayerNorm of the
encoder, the 2 per block and the final one), ``final`` (only the final LayerNorm ``norm``: what the authors'
LoRA run trained, since their name filter matched ``norm.`` but not ``norm1`` / ``norm2``) or ``none``. The
other strategies train whole blocks, norms included, and take only ``all``.

It logs trainable vs total parameters, counted by :func:`count_parameters` (the one count every module
logs). :func:`merge_lora_state` folds LoRA into plain weights as a
pure function on a state dict, ``W + (alpha / r) · B · A``, which is how exports and the authors'
checkpoints become plain encoders.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from pacx.constants import LORA_ALPHA, LORA_DROPOUT, LORA_R, LORA_TARGETS

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.(?P<adapter>[^.]+)\.weight$")


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
    from peft import LoraConfig, get_peft_model

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


def _linear_probe(encoder: nn.Module, r: int, alpha: int, dropout: float, targets: Sequence[str], n_blocks: int,
                  norms: str = "all") -> nn.Module:
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
        raise ValueError(f"trainable_norms {trainable_norms!r} applies to tuning 'lora'; {strategy!r} trains whole "
                         "blocks, their norms included (set trainable_norms: all)")
    model = TUNING_STRATEGIES[strategy](encoder, lora_r, lora_alpha, lora_dropout, lora_targets, last_n_blocks,
                                        trainable_norms)
    trainable, total = count_parameters(model)
    log.info("tuning %s (norms: %s): %s of %s encoder parameters trainable (%.2f %%)", strategy, trainable_norms,
             f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


def merge_lora_state(state: Mapping[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A peft-LoRA state dict (``base_model.model.`` prefix) -> plain weights, W + scaling · B · A.

    ``scaling`` is alpha / r. Keys of non-LoRA modules lose the peft prefix; ``base_layer`` disappears.
    """
    state = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _LORA_KEY.match(key)
        if match:
            lora.setdefault(match["module"], {})[match["which"]] = value
        else:
            out[key.replace(".base_layer.", ".")] = value
    for module, ab in lora.items():
        if set(ab) != {"A", "B"}:
            raise KeyError(f"LoRA module {module} lacks lora_{'B' if 'A' in ab else 'A'}")
        weight = f"{module}.weight"
        if weight not in out:
            raise KeyError(f"LoRA module {module} has no base_layer weight")
        delta = (ab["B"].double() @ ab["A"].double()) * scaling
        out[weight] = (out[weight].double() + delta).to(out[weight].dtype)
    return out
