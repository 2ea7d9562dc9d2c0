"""What every pacx DataModule shares: the global batch and its per-device share, and evaluation loaders that
split a split over devices without repeating rows."""

from __future__ import annotations

from torch.utils.data import DataLoader, Dataset, DistributedSampler


def per_device_batch_size(global_batch: int, trainer) -> int:
    """Configs give the **global** batch; each device loads ``global / world_size`` (must divide)."""
    world = trainer.world_size if trainer is not None else 1
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} does not divide by world size {world}")
    return global_batch // world


class ShardSampler(DistributedSampler):
    """Evaluation rows over ``num_replicas`` ranks, each row exactly once: rank r reads rows r, r + W, r + 2W,
    ... in order (the ranks' counts differ by at most one).

    Lightning's default ``DistributedSampler`` evens the ranks out by repeating the first rows, which
    whole-split metrics (AUROC, Dice) would then count twice. Lightning keeps a loader's own
    ``DistributedSampler`` (this subclass) as it is. Only for loops without per-step collectives: a rank may
    run one batch fewer.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


def eval_loader(dataset: Dataset, batch_size: int, trainer=None, **loader_kwargs) -> DataLoader:
    """An in-order evaluation loader of ``batch_size`` per device that keeps every row; under DDP a
    :class:`ShardSampler` gives each row to one rank, once."""
    world = trainer.world_size if trainer is not None else 1
    if 1 < world and len(dataset) < world:  # a rank without a batch would wait forever at the epoch end
        raise ValueError(f"an evaluation split of {len(dataset)} rows cannot be spread over {world} devices "
                         "(each needs at least one row): evaluate on fewer devices")
    sampler = ShardSampler(dataset, world, trainer.global_rank) if world > 1 else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler, drop_last=False,
                      **loader_kwargs)
