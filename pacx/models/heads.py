"""Stage 2 heads (SPEC.md "Stage 2"): Dropout → Linear → LayerNorm, trunc-normal(0.02) init.

Projections map the CXR feature (768) and the teacher embeddings (ECG 1024, labs 256) into the shared
256-d space of the contrastive term; regression heads map the CXR feature onto the teachers' own
embedding spaces. All are discarded after training.
"""

from __future__ import annotations

from torch import nn


class ProjectionHead(nn.Sequential):
    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.2) -> None:
        super().__init__(nn.Dropout(dropout), nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim))
        nn.init.trunc_normal_(self[1].weight, std=0.02)
        nn.init.zeros_(self[1].bias)
