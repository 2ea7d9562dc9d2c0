"""Training data that resumes exactly: the same batches, augmentations and random masks after a restart.

Makes the data side a pure function of ``(seed, epoch, position)``: :class:`ResumableSampler`,
:class:`SeededDataset` and :func:`seed_step`, assembled by :func:`train_loader` (with
:class:`ResumableLoader`) for a data module's ``train_dataloader``. How they fit together, and with
Lightning's debug flags: docs/design.md#resilience.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from non-negative integers by chained SplitMix64 (nearby inputs, unrelated seeds;
    about 1 µs, it runs once per training sample)."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ _splitmix64(int(p) & _MASK64))
    return h >> 1


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    """:func:`_splitmix64` elementwise on uint64 (numpy's array arithmetic wraps modulo 2**64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def derive_seeds(*parts: int, last: np.ndarray) -> list[int]:
    """``[derive_seed(*parts, i) for i in last]`` for non-negative integers ``last``, in one vectorised pass
    (a sampler's per-sample seeds)."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ _splitmix64(int(p) & _MASK64))
    x = np.asarray(last, dtype=np.int64).astype(np.uint64)
    return (_splitmix64_array(np.uint64(h) ^ _splitmix64_array(x)) >> np.uint64(1)).tolist()


def seed_all(seed: int) -> None:
    """Seed torch (CPU; CUDA once initialised; MPS), numpy's legacy global RNG and ``random``: per step.
    Not ``torch.manual_seed``, which costs ~0.8 ms here (docs/performance.md#per-step-seeding)."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
    if torch.backends.mps.is_available():
        torch.mps.manual_seed(seed)
    np.random.seed(seed % (1 << 32))
    random.seed(seed)


def seed_sample(seed: int) -> None:
    """Seed what a data transform draws from, cheaply (about 7 µs: per sample): torch's CPU generator and
    numpy's legacy global RNG."""
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % (1 << 32))


GLOBAL_SEED_ENV = "PL_GLOBAL_SEED"  # where Lightning's seed_everything exports the run's seed


def run_seed(default: int = 0) -> int:
    """The run's seed: ``seed_everything`` exports it as ``PL_GLOBAL_SEED``."""
    value = os.environ.get(GLOBAL_SEED_ENV)
    return int(value) if value not in (None, "") else default


def seed_step(seed: int, epoch: int, batch_idx: int, rank: int) -> None:
    seed_all(derive_seed(seed, 1, epoch, batch_idx, rank))


class SeededDataset(Dataset):
    """Takes ``(index, sample_seed)`` keys from :class:`ResumableSampler`; seeds, then reads
    ``dataset[index]``.

    A plain integer key (the sequential sampler Lightning installs for ``overfit_batches``) is seeded from
    ``(seed, index)``, so an overfit run still augments each of its fixed samples reproducibly."""

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def key(self, key) -> tuple[int, int]:
        """``(index, sample seed)`` of a sampler key."""
        if isinstance(key, tuple):
            return key
        return int(key), derive_seed(self.seed, 2, int(key))

    def __getitem__(self, key):
        index, seed = self.key(key)
        seed_sample(seed)
        return self.dataset[index]


class SeededBatchDataset(SeededDataset):
    """A :class:`SeededDataset` over a dataset that serves a whole batch in one call.

    ``dataset.seeded_batch(indices, seeds)`` returns the collated batch whose sample ``k`` is what
    ``dataset[indices[k]]`` returns after :func:`seed_sample` ``(seeds[k])``: the same draws, without a
    Python call, a global re-seeding and a collation per sample (a cached-feature probe's train split,
    :class:`pacx.data.feature_cache.FlipFeatureDataset`). The DataLoader calls ``__getitems__`` with the
    batch's keys; :func:`train_loader` pairs it with the pass-through :func:`collated`.
    """

    def __getitems__(self, keys: list) -> object:
        indices, seeds = zip(*(self.key(k) for k in keys))
        return self.dataset.seeded_batch(list(indices), list(seeds))


def collated(batch):
    """The ``collate_fn`` of a dataset whose ``__getitems__`` already returns the batch."""
    return batch


class ResumableSampler(DistributedSampler):
    """Per-epoch shuffle from ``seed + epoch``, this rank's share, minus the batches the epoch already
    consumed.

    Yields ``(index, sample_seed)`` (plain indices with ``seed_samples=False``). ``__len__`` stays the full
    share, so the loader reports the epoch's full batch count while a resumed epoch yields only the batches
    it has left (Lightning counts the consumed ones from the checkpoint).

    Args:
        dataset: the (unwrapped) dataset; only its length is used.
        num_replicas / rank: the world size and this process's global rank.
        shuffle / seed / drop_last: as ``DistributedSampler`` (``drop_last`` here = drop the tail that does
            not divide by the world size; the loader's own ``drop_last`` drops an incomplete batch).
        batch_size: this rank's batch.
        seed_samples: yield ``(index, sample seed)`` pairs for :class:`SeededDataset`; False: plain indices.
        consumed: called when an epoch's iteration starts; returns how many batches of this epoch were
            already trained on (0 for a fresh epoch, the checkpoint's count for a resumed one).
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, batch_size: int = 1, seed_samples: bool = True,
                 consumed: Callable[[], int] | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.batch_size, self.seed_samples, self.consumed = batch_size, seed_samples, consumed

    def __iter__(self):
        indices = list(super().__iter__())
        done = self.consumed() if self.consumed is not None else 0
        if done:
            log.info("resuming epoch %d after %d batches (%d of this rank's %d samples)", self.epoch, done,
                     done * self.batch_size, len(indices))
        indices = indices[done * self.batch_size:]
        if not self.seed_samples:
            return iter(indices)
        return iter(zip(indices, derive_seeds(self.seed, 0, self.epoch, last=np.asarray(indices))))


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose iterator starts at the first ``next()``, not at ``iter()``.

    Lightning creates the train iterator before it restores the checkpoint's loop counters (and before it
    sets the sampler's epoch); starting workers then would fix the order of the resumed epoch too early.
    Deferring the start lets :class:`ResumableSampler` see the restored epoch and position.
    """

    def __iter__(self):
        yield from super().__iter__()

    # Lightning's resumability protocol. The position is not loader state: the sampler derives it from the
    # fit loop's progress counters, which the checkpoint restores. Declaring it silences Lightning's
    # "dataloader is not resumable" warning, which is wrong for this loader.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def consumed_batches(trainer) -> int:
    """Batches of the current epoch already trained on: 0 at an epoch's start, the restored count when a run
    resumes mid-epoch from a checkpoint (Lightning's progress tracking, restored before the first batch)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


def train_loader(dataset: Dataset, batch_size: int, trainer=None, shuffle: bool = True,
                 drop_last: bool = True,
                 seed: int | None = None, augmented: bool = True, **loader_kwargs) -> DataLoader:
    """A training loader that resumes exactly (see the module docstring); ``batch_size`` per device.
    ``augmented=False`` (a dataset that draws nothing, e.g. cached features) skips the per-sample seeding; a
    dataset with ``seeded_batch`` draws each batch in one call (:class:`SeededBatchDataset`).

    ``drop_last`` drops, under DDP, also the tail of fewer rows than ranks instead of padding it with copies
    of the epoch's first rows: each step then trains on the rows of the one-process step, each once
    (padded, 11 rows at a global batch of 4 on 2 ranks took 3 steps, one row twice, against 2). Without
    ``drop_last`` the padding stays: every rank needs as many batches."""
    world = trainer.world_size if trainer is not None else 1
    rank = trainer.global_rank if trainer is not None else 0
    fit_loop = getattr(trainer, "fit_loop", None)
    seed = run_seed() if seed is None else seed
    sampler = ResumableSampler(dataset, world, rank, shuffle=shuffle, seed=seed, drop_last=drop_last,
                               batch_size=batch_size, seed_samples=augmented,
                               consumed=(lambda: consumed_batches(trainer)) if fit_loop is not None else None)
    if not augmented:
        wrapped = dataset
    elif hasattr(dataset, "seeded_batch"):  # draws a whole batch at once (SeededBatchDataset)
        wrapped = SeededBatchDataset(dataset, seed)
        loader_kwargs = {**loader_kwargs, "collate_fn": collated}
    else:
        wrapped = SeededDataset(dataset, seed)
    return ResumableLoader(wrapped, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                           **loader_kwargs)
