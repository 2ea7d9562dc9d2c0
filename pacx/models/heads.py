"""Heads of Stage 2 and Stage 3 (docs/method.md#stage-2).

Stage 2: Dropout → Linear → LayerNorm projections into the shared space and regressions onto each teacher's
space, stored as ``proj.cxr``, ``proj.<teacher>``, ``reg.<teacher>`` (:func:`upgrade_head_keys` reads the
earlier ``proj_ecg`` layout); :class:`TeacherNorm` is Stage 2's fixed ``teacher_norm``. Stage 3 (and Stage 2's
``head_norm``): :class:`FeatureNorm`, the non-affine BatchNorm of MAE's linear-probe protocol.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TypeVar

import torch
from torch import nn

from pacx.dist import gather_with_grad, get_world_size

V = TypeVar("V")


class FeatureNorm(nn.BatchNorm1d):
    """Non-affine ``BatchNorm1d`` over features ``[B, D]`` (MAE linear probing). A training batch of one
    sample has no batch statistics (the last batch of an epoch can be that small), so it is standardised
    with the running statistics instead of raising.

    Under DDP the training statistics are the global batch's: the rows of every rank are gathered
    (differentiably, :func:`pacx.dist.gather_with_grad`), so W ranks of n rows normalise, update the running
    statistics and back-propagate as one process with W·n rows does. Per-device statistics (plain BatchNorm
    under DDP) would make the normalisation, and the trained head, depend on the number of devices."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, affine=False, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and get_world_size() > 1:
            full = gather_with_grad(x)  # [W·n, D]
            if full.shape[0] > 1:
                return self._normalise_global(x, full)
        if self.training and x.shape[0] == 1:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, training=False,
                                            eps=self.eps)
        return super().forward(x)

    def _normalise_global(self, x: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """``x`` standardised by the statistics of ``full`` (every rank's rows); the running statistics
        move as ``BatchNorm1d``'s would on ``full`` (unbiased variance, ``momentum``, or a cumulative mean
        when ``momentum`` is None)."""
        mean, var = full.mean(dim=0), full.var(dim=0, unbiased=False)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                step = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                n = full.shape[0]
                self.running_mean.lerp_(mean.detach(), step)
                self.running_var.lerp_(var.detach() * n / (n - 1), step)
        return (x - mean) / torch.sqrt(var + self.eps)


class TeacherNorm(nn.Module):
    """A fixed affine map of teacher embeddings, ``(x - mean) @ proj``: [B, D] -> [B, K] (buffers).

    Identity until :meth:`fit` sets it from the train split's teacher embeddings (Stage 2's ``teacher_norm``):
    ``center`` (``proj`` = I), ``standardize`` (``proj`` = diag(1/std)) or ``whiten`` (PCA whitening onto the
    ``K`` leading components: ``proj`` = eigenvectors / sqrt(eigenvalues)). The buffers travel with the
    checkpoint, so validation, resume and zero-shot retrieval use the same map.
    """

    def __init__(self, dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        out_dim = dim if out_dim is None else out_dim
        if not 0 < out_dim <= dim:
            raise ValueError(f"TeacherNorm keeps 1..{dim} components, got {out_dim}")
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("proj", torch.eye(dim)[:, :out_dim].clone())

    def fit(self, feats: torch.Tensor, mode: str) -> None:
        """Set the map from teacher embeddings ``feats`` [N, D] (float64 inside) by ``mode`` (``FITS``)."""
        x = torch.as_tensor(feats, dtype=torch.float64)
        mean = x.mean(dim=0)
        proj = TEACHER_NORM_FITS[mode](x - mean, self.proj.shape[1])
        self.mean.copy_(mean)
        self.proj.copy_(proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # autocast off: the output is also the regression target, which bf16-mixed would round to bf16
        with torch.autocast(device_type=x.device.type, enabled=False):
            return (x - self.mean.to(x.dtype)) @ self.proj.to(x.dtype)  # [B, K], in x's dtype


def _center(xc: torch.Tensor, k: int) -> torch.Tensor:
    return torch.eye(xc.shape[1], dtype=xc.dtype)[:, :k]


def _standardize(xc: torch.Tensor, k: int) -> torch.Tensor:
    return torch.diag(1.0 / xc.std(dim=0).clamp_min(1e-6))[:, :k]


def _whiten(xc: torch.Tensor, k: int) -> torch.Tensor:
    cov = xc.T @ xc / max(1, len(xc) - 1)  # [D, D]
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0)[:k], evecs.flip(1)[:, :k]
    return evecs / evals.clamp_min(1e-12).sqrt()  # [D, K]


# teacher_norm mode -> (centred train embeddings [N, D], K) -> projection [D, K]
TEACHER_NORM_FITS = {"center": _center, "standardize": _standardize, "whiten": _whiten}


class ProjectionHead(nn.Sequential):
    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.2) -> None:
        super().__init__(nn.Dropout(dropout), nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim))
        nn.init.trunc_normal_(self[1].weight, std=0.02)
        nn.init.zeros_(self[1].bias)


# Stage 2 checkpoints written before the heads were keyed by teacher (nn.ModuleDicts) held one attribute per
# head.
LEGACY_HEADS = {"proj_cxr": "proj.cxr", "proj_ecg": "proj.ecg", "proj_labs": "proj.labs",
                "reg_ecg": "reg.ecg", "reg_labs": "reg.labs"}
PER_TEACHER_PREFIXES = ("proj", "reg", "teacher_norms")  # <prefix>.<teacher>.* in a Stage 2 state dict


def upgrade_head_keys(state: Mapping[str, V], teachers: Collection[str] | None = None) -> dict[str, V]:
    """A Stage 2 state dict in the current head layout (a pure function; other keys pass unchanged).

    The earlier layout's ``proj_cxr.*``, ``proj_<t>.*`` and ``reg_<t>.*`` (``t`` in ecg, labs) become
    ``proj.cxr.*``, ``proj.<t>.*`` and ``reg.<t>.*`` (``teacher_norms.<t>.*`` kept its name). A run of that
    layout with ``ablate`` also stored the ablated teacher's heads and norm, which never trained: given the
    ``teachers`` the model distils from, such a checkpoint's heads and norms of any other teacher are dropped.
    A checkpoint already in the current layout is returned as it is (a wrong teacher set stays an error of
    the strict load).
    """
    out: dict[str, V] = {}
    legacy = False
    for key, value in state.items():
        head, dot, rest = key.partition(".")
        if dot and head in LEGACY_HEADS:
            key, legacy = f"{LEGACY_HEADS[head]}.{rest}", True
        out[key] = value
    if legacy and teachers is not None:
        keep = {"cxr", *teachers}
        out = {k: v for k, v in out.items()
               if not (k.split(".", 1)[0] in PER_TEACHER_PREFIXES and k.split(".", 2)[1] not in keep)}
    return out
