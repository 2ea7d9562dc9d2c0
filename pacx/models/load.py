"""A :class:`~pacx.models.vit.ViTEncoder` from any weights :mod:`pacx.weights.formats` reads (run directory,
checkpoint, export, third-party file), loaded strictly (:func:`pacx.weights.checkpoint.load_state_checked`).
"""

from __future__ import annotations

from pathlib import Path

from pacx.models.vit import ViTEncoder
from pacx.weights.checkpoint import load_state_checked
from pacx.weights.formats import EncoderWeights, read_encoder_weights
from pacx.weights.layout import ViTConfig, config_from_state_dict


def build_encoder(weights: EncoderWeights, cfg: ViTConfig | None = None) -> ViTEncoder:
    """A ``ViTEncoder`` for ``cfg`` (default: the file's own, else inferred from shapes), loaded strictly."""
    cfg = cfg or weights.cfg or config_from_state_dict(weights.state)
    encoder = ViTEncoder(cfg)
    load_state_checked(encoder, weights.state, source=f"{weights.source} ({weights.fmt})")
    return encoder


def load_encoder(path: str | Path, cfg: ViTConfig | None = None, which: str = "last",
                 allow_debug: bool | None = None) -> ViTEncoder:
    """Load any supported encoder in eval mode: ``model(x [B, 3, H, W]) -> [B, D]``, ``model.embed_dim``.

    ``cfg`` forces an architecture (an error lists mismatched keys if the file does not fit it);
    ``allow_debug`` lets the weights of a debug run through.
    """
    encoder = build_encoder(read_encoder_weights(path, which, allow_debug), cfg)
    return encoder.eval()
