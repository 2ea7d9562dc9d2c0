"""Cross-device helpers for the contrastive loss (docs/method.md#stage-2: negatives gathered across devices).

Owns the one gather the losses use (:func:`gather_with_grad`) and the rank-offset targets that go with it.
Every helper is safe when ``torch.distributed`` is unavailable or not initialised: world size 1, rank 0, and
the gather is the identity. Why the gather's backward sums gradients over ranks:
docs/design.md#gather-gradients (``tests/test_losses.py`` checks it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group is initialised (any world size)."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather_batch_sizes(x: torch.Tensor) -> list[tuple[int, ...]]:
    """The shape of ``x`` on every rank (``[x.shape]`` when not distributed); a collective call.

    Raises ``ValueError`` on every rank (they all see the same gathered shapes, so none hangs) when the
    shapes differ: the gather needs the same local batch everywhere (``drop_last=True`` in training).
    """
    if get_world_size() == 1:
        return [tuple(x.shape)]
    local = torch.tensor([x.dim(), *x.shape], dtype=torch.long, device=x.device)
    # ranks could differ in ndim too: pad to a fixed length before gathering
    padded = torch.full((9,), -1, dtype=torch.long, device=x.device)
    if local.numel() > padded.numel():
        raise ValueError(f"gather_batch_sizes supports tensors of up to 8 dims, got {x.dim()}")
    padded[: local.numel()] = local
    out = [torch.empty_like(padded) for _ in range(get_world_size())]
    dist.all_gather(out, padded)
    shapes = [tuple(int(v) for v in t[1 : 1 + int(t[0])].tolist()) for t in out]
    if len(set(shapes)) != 1:
        raise ValueError(
            f"cross-rank gather needs the same local shape on every rank, got {shapes} (rank {get_rank()}). "
            "Use drop_last=True for training loaders and a per-device batch that divides the data."
        )
    return shapes


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums the gathered gradient over ranks and keeps the local slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # x: [n, ...] -> [W·n, ...]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.n_local = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # grad: [W·n, ...] -> [n, ...]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.n_local
        return grad[start : start + ctx.n_local]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x: [n, ...]`` from all ranks in rank order -> ``[W·n, ...]``, differentiably.

    The identity (the same tensor object) when not distributed or at world size 1. Checks first that
    every rank holds the same shape (:func:`gather_batch_sizes`).
    """
    if get_world_size() == 1:
        return x
    gather_batch_sizes(x)
    return _GatherWithGrad.apply(x)


def rank_offset_targets(n_local: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Targets of local row ``i`` among gathered keys: column ``rank·n_local + i``. ``[n_local]`` long."""
    return torch.arange(n_local, device=device) + get_rank() * n_local


class _AllReduceWithGrad(torch.autograd.Function):
    """Sum over ranks; backward sums the incoming gradient over ranks too (every rank's loss read the sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over all ranks, differentiably; the identity (the same tensor) at world size 1.

    For a batch statistic every rank computes from the same sums (e.g. a soft Dice over the global batch):
    each rank's loss then equals the full-batch loss, and summing the gradient over ranks in the backward
    makes DDP's average the full-batch gradient, as for :func:`gather_with_grad`."""
    if get_world_size() == 1:
        return x
    return _AllReduceWithGrad.apply(x)
