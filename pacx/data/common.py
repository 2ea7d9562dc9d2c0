"""What every pacx DataModule shares: the global batch and its per-device share."""

from __future__ import annotations


def per_device_batch_size(global_batch: int, trainer) -> int:
    """Configs give the **global** batch; each device loads ``global / world_size`` (must divide)."""
    world = trainer.world_size if trainer is not None else 1
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} does not divide by world size {world}")
    return global_batch // world
