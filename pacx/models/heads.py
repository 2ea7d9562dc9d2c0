"""Heads.

Stage 2 (SPEC.md "Stage 2"): Dropout → Linear → LayerNorm, trunc-normal(0.02) init. Projections map the
CXR feature (768) and the teacher embeddings (ECG 1024, labs 256) into the shared 256-d space of the
contrastive term; regression heads map the CXR feature onto the teachers' own embedding spaces. All are
discarded after training.

Stage 3: :class:`FeatureNorm`, the non-affine BatchNorm MAE's linear-probe protocol puts before the head.
"""

from __future__ import annotations

import torch
from torch import nn


class FeatureNorm(nn.BatchNorm1d):
    """Non-affine ``BatchNorm1d`` over features ``[B, D]`` (MAE linear probing). A training batch of one
    sample has no batch statistics (the last batch of an epoch can be that small), so it is standardised
    with the running statistics instead of raising."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, affine=False, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, training=False, eps=self.eps)
        return super().forward(x)


class ProjectionHead(nn.Sequential):
    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.2) -> None:
        super().__init__(nn.Dropout(dropout), nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim))
        nn.init.trunc_normal_(self[1].weight, std=0.02)
        nn.init.zeros_(self[1].bias)
