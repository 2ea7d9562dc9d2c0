"""Segmentation decoder over frozen ViT patch tokens (docs/datasets.md#stage-3-settings).

A Conv 3×3 (D → ``width``, padding 1) + ReLU, then ``log2(p)`` ConvTranspose (k 2, s 2) stages that each
double the resolution and halve the channels, the last mapping to one logit channel at the input resolution
(``[B, 1, H, W]``); ReLU after every stage but the last. Patch 16: 256 → 128 → 64 → 32 → 1 (four stages,
as docs/datasets.md#stage-3-settings); patch 8: 256 → 128 → 64 → 1 (three stages).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def tokens_to_map(tokens: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Patch tokens ``[B, L, D]`` (no CLS) -> feature map ``[B, D, g, g]`` (row-major patch order)."""
    b, n, d = tokens.shape
    if n != grid_size * grid_size:
        raise ValueError(f"{n} patch tokens do not form a {grid_size}x{grid_size} grid")
    return tokens.transpose(1, 2).reshape(b, d, grid_size, grid_size)


class SegDecoder(nn.Module):
    """Conv 3×3 + ReLU, then ``log2(patch_size)`` ×2 ConvTranspose stages to one logit channel.

    Args:
        embed_dim: channels of the token map (the backbone's ``embed_dim``; 768 for ViT-B).
        patch_size: the backbone's patch size, a power of two >= 2; sets the number of ×2 stages.
        width: channels after the 3×3 conv (256 in docs/datasets.md#stage-3-settings); halved by every
            ConvTranspose stage.
    """

    def __init__(self, embed_dim: int, patch_size: int, width: int = 256) -> None:
        super().__init__()
        stages = int(round(math.log2(patch_size))) if patch_size > 0 else 0
        if patch_size < 2 or 2**stages != patch_size:
            raise ValueError(f"patch size {patch_size} is not a power of two >= 2")
        if width >> (stages - 1) < 1:
            raise ValueError(f"width {width} cannot be halved {stages - 1} times")
        layers: list[nn.Module] = [nn.Conv2d(embed_dim, width, kernel_size=3, padding=1),
                                   nn.ReLU(inplace=True)]
        channels = width
        for i in range(stages):
            last = i == stages - 1
            out = 1 if last else channels // 2
            layers.append(nn.ConvTranspose2d(channels, out, kernel_size=2, stride=2))
            if not last:
                layers.append(nn.ReLU(inplace=True))
            channels = out
        self.layers = nn.Sequential(*layers)
        self.patch_size = patch_size

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.layers(feature_map)  # [B, D, g, g] -> [B, 1, g·p, g·p]
