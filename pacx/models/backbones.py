"""Stage 3 backbones by kind (docs/method.md#stage-3): a registry, no if/elif on kinds.

Every kind yields a :class:`~pacx.models.vit.ViTEncoder`, ``forward(x [B, 3, H, W]) -> [B, D]`` (the CLS token
after the final LayerNorm; ``pool: avg``: the patch-token mean). ``random`` builds the named ``arch``;
``weights`` / ``mae`` / ``pacx`` / ``imagenet`` load, strictly, any file ``pacx.load_encoder`` accepts, and
differ only in the recorded name (``arch`` forces an architecture). Bad paths and mismatches name the path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from pacx.models.load import build_encoder
from pacx.models.vit import ViTEncoder, vit_config
from pacx.weights.checkpoint import CheckpointError
from pacx.weights.formats import read_encoder_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneConfig:
    kind: str = "mae"
    weights: str | None = None  # file or run directory (every kind but ``random``)
    arch: str | None = None  # named ViT (``pacx.models.vit.VIT_ARCHS``); required for ``random``
    img_size: int = 224
    # the feature: "cls" token (the paper) or "avg" of the patch tokens (pacx.models.vit.POOLS)
    pool: str = "cls"

    def __post_init__(self) -> None:
        # ``--model.backbone.weights null`` reaches a dataclass nested in a subclass-mode model as the
        # string "None" (jsonargparse); both spellings mean "unset".
        for name in ("weights", "arch"):
            if getattr(self, name) in ("None", "null", ""):
                object.__setattr__(self, name, None)

    def to_dict(self) -> dict:
        """Plain types only, so checkpoints that record it still open with ``weights_only=True``."""
        return asdict(self)


def as_backbone_config(value: BackboneConfig | Mapping) -> BackboneConfig:
    """A :class:`BackboneConfig` from itself or from its dict (as stored in a checkpoint's
    hyperparameters)."""
    if isinstance(value, BackboneConfig):
        return value
    unknown = set(value) - set(BackboneConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"backbone: unknown keys {sorted(unknown)}; expected "
                         f"{sorted(BackboneConfig.__dataclass_fields__)}")
    return BackboneConfig(**value)


def _random(cfg: BackboneConfig) -> ViTEncoder:
    if cfg.arch is None:
        raise ValueError("backbone kind 'random' needs an arch (e.g. vit_base_patch16)")
    if cfg.weights:
        raise ValueError(f"backbone kind 'random' takes no weights, got {cfg.weights}")
    return ViTEncoder(vit_config(cfg.arch, cfg.img_size))


def _from_weights(cfg: BackboneConfig) -> ViTEncoder:
    if not cfg.weights:
        raise ValueError(f"backbone kind {cfg.kind!r} needs weights (a file or run directory)")
    path = Path(cfg.weights)
    if not path.exists():
        raise FileNotFoundError(f"backbone {cfg.kind!r}: weights not found: {path}")
    weights = read_encoder_weights(path)
    arch_cfg = vit_config(cfg.arch, cfg.img_size) if cfg.arch else None
    try:
        encoder = build_encoder(weights, arch_cfg)
    except (CheckpointError, KeyError, ValueError) as err:
        raise CheckpointError(f"backbone {cfg.kind!r}: {path} does not fit the requested encoder: "
                              f"{err}") from err
    if encoder.cfg.img_size != cfg.img_size:
        raise ValueError(f"backbone {cfg.kind!r}: {path} is an encoder for {encoder.cfg.img_size} px images, "
                         f"but img_size is {cfg.img_size}")
    log.info("backbone %s from %s (%s, stage %s)", cfg.kind, weights.source, weights.fmt, weights.stage)
    return encoder


BACKBONES: dict[str, Callable[[BackboneConfig], ViTEncoder]] = {
    "random": _random,
    "weights": _from_weights,
    "mae": _from_weights,
    "pacx": _from_weights,
    "imagenet": _from_weights,
}


def build_backbone(cfg: BackboneConfig) -> ViTEncoder:
    if cfg.kind not in BACKBONES:
        raise KeyError(f"unknown backbone kind {cfg.kind!r}; known: {sorted(BACKBONES)}")
    return BACKBONES[cfg.kind](cfg).set_pool(cfg.pool)
