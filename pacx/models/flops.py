"""Analytic matmul FLOPs of the MAE, the numerator of model FLOP utilisation (MFU).

Torch alone, so that the Stage 1 module can report its FLOPs per image (:meth:`pacx.lit.mae.MAEModule.
train_flops_per_image`) to the fit-path throughput meter (:class:`pacx.perf.fit.StepThroughput`) as well as to
``scripts/benchmark_train.py``. What is counted and how it was checked against PyTorch's FLOP counter:
docs/design.md#throughput.
"""

from __future__ import annotations

from pacx.models.mae import DecoderConfig
from pacx.models.vit import ViTConfig


def _block_flops(n: int, d: int, f: int) -> int:
    """Matmul FLOPs of one pre-norm transformer block on ``n`` tokens of width ``d``, MLP width ``f``."""
    linear = 2 * n * (3 * d * d + d * d + 2 * d * f)  # qkv, out-projection, fc1, fc2
    attention = 2 * 2 * n * n * d  # QKᵀ and AV over all heads
    return linear + attention


def mae_forward_flops(cfg: ViTConfig, dec: DecoderConfig, mask_ratio: float) -> dict[str, int]:
    """Per-sample forward matmul FLOPs of the MAE, by stage, plus ``total``."""
    num_patches = cfg.num_patches
    kept = int(num_patches * (1 - mask_ratio))  # same expression as random_masking
    n_enc, n_dec = 1 + kept, 1 + num_patches
    d, dd = cfg.embed_dim, dec.decoder_embed_dim
    pixels = cfg.patch_size**2 * cfg.in_chans
    parts = {
        "patch_embed": 2 * kept * pixels * d,  # only the kept patches are embedded
        "encoder": cfg.depth * _block_flops(n_enc, d, int(d * cfg.mlp_ratio)),
        "decoder_embed": 2 * n_enc * d * dd,
        "decoder": dec.decoder_depth * _block_flops(n_dec, dd, int(dd * cfg.mlp_ratio)),
        "decoder_pred": 2 * n_dec * dd * pixels,
    }
    parts["total"] = sum(parts.values())
    return parts


def mae_train_flops(cfg: ViTConfig, dec: DecoderConfig, mask_ratio: float, batch_size: int) -> int:
    """Analytic FLOPs of one training step: 3 × forward (backward ≈ 2 × forward) × batch."""
    return 3 * mae_forward_flops(cfg, dec, mask_ratio)["total"] * batch_size
