"""pacx.data.resumable: per-epoch order, rank shares, the resume skip and per-sample seeds."""

from __future__ import annotations

import random
import traceback

import numpy as np
import torch
from torch.utils.data import Dataset

from pacx.data.resumable import (
    ResumableLoader,
    ResumableSampler,
    SeededBatchDataset,
    SeededDataset,
    derive_seed,
    derive_seeds,
    seed_all,
    train_loader,
)


class Noisy(Dataset):
    """Item i: (i, a draw from torch's global RNG): what a random augmentation sees."""

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i):
        return torch.tensor(i), torch.rand(())


def _indices(sampler):
    return [i for i, _ in sampler]


def test_derive_seed_is_stable_and_sensitive():
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    assert len({derive_seed(0, 0, e, i) for e in range(5) for i in range(50)}) == 250
    assert 0 <= derive_seed(2**40, 7) < 2**63


def test_vectorised_seeds_equal_derive_seed():
    rng = np.random.default_rng(0)
    last = np.concatenate([np.arange(50), rng.integers(0, 2**62, 200)])
    for parts in [(0, 0, 0), (5, 0, 3), (2**40, 0, 7), (1,)]:
        assert derive_seeds(*parts, last=last) == [derive_seed(*parts, int(i)) for i in last]
    assert derive_seeds(3, 0, 1, last=np.array([], dtype=np.int64)) == []


class NoisyBatches(Noisy):
    """:class:`Noisy` that also serves a whole batch, drawing each item from a generator seeded with its
    seed, as :class:`SeededDataset` seeds the global one before ``self[i]``."""

    def seeded_batch(self, indices, seeds):
        gen = torch.Generator()
        draws = [torch.rand((), generator=gen.manual_seed(s)) for s in seeds]
        return torch.tensor(indices), torch.stack(draws)


def test_batch_fetch_equals_the_per_item_path():
    """A dataset with ``seeded_batch`` gets whole batches (one call each, no per-item collation) that equal
    the per-item seeded path's, in every epoch, for a resumed epoch and for overfit_batches' plain keys."""
    per_item = train_loader(Noisy(), 6, None, seed=4, drop_last=False)
    batched = train_loader(NoisyBatches(), 6, None, seed=4, drop_last=False)
    assert isinstance(batched.dataset, SeededBatchDataset) and not isinstance(per_item.dataset,
                                                                               SeededBatchDataset)
    for epoch in range(3):
        per_item.sampler.set_epoch(epoch)
        batched.sampler.set_epoch(epoch)
        a, b = list(per_item), list(batched)
        assert len(a) == len(b) == 4
        for (ia, xa), (ib, xb) in zip(a, b):
            assert torch.equal(ia, ib) and torch.equal(xa, xb)
    keys = [3, 7, 11]  # Lightning's sequential sampler under overfit_batches
    ia, xa = torch.utils.data.default_collate([SeededDataset(Noisy(), 4)[k] for k in keys])
    ib, xb = SeededBatchDataset(NoisyBatches(), 4).__getitems__(keys)
    assert torch.equal(ia, ib) and torch.equal(xa, xb)


def test_epoch_order_rank_shares_and_per_sample_seeds():
    data = Noisy()
    one = ResumableSampler(data, 1, 0, seed=3)
    one.set_epoch(2)
    full = list(one)
    assert sorted(_indices(full)) == list(range(20))
    generator = torch.Generator().manual_seed(3 + 2)  # DistributedSampler's law: randperm seeded seed + epoch
    assert _indices(full) == torch.randperm(20, generator=generator).tolist()
    one.set_epoch(3)
    assert _indices(one) != _indices(full)
    shares = []
    for rank in range(2):
        s = ResumableSampler(data, 2, rank, seed=3)
        s.set_epoch(2)
        shares.append(list(s))
    assert shares[0] + shares[1] != full and sorted(shares[0] + shares[1]) == sorted(full)
    # same (index, seed) pairs whatever the world size
    assert shares[0] == full[0::2] and shares[1] == full[1::2]


def test_skip_starts_after_consumed_batches_and_keeps_the_length():
    data = Noisy()
    consumed = [0]
    s = ResumableSampler(data, 1, 0, seed=0, batch_size=4, consumed=lambda: consumed[0])
    whole = list(s)
    consumed[0] = 3
    assert list(s) == whole[12:] and len(s) == 20
    loader = ResumableLoader(SeededDataset(data), batch_size=4, sampler=s, drop_last=True)
    assert len(loader) == 5 and len(list(loader)) == 2


def test_seeded_dataset_gives_each_sample_its_own_draw_in_any_order():
    data = Noisy()
    s = ResumableSampler(data, 1, 0, seed=5)
    keys = list(s)
    wrapped = SeededDataset(data)
    forward = {int(i): float(x) for i, x in (wrapped[k] for k in keys)}
    torch.manual_seed(123)  # whatever the global state was
    backward = {int(i): float(x) for i, x in (wrapped[k] for k in reversed(keys))}
    assert forward == backward and len(set(forward.values())) == 20


def test_loader_iterator_starts_lazily():
    calls = []
    s = ResumableSampler(Noisy(), 1, 0, batch_size=5, consumed=lambda: calls.append(1) or 0)
    loader = train_loader(Noisy(), 5, None)
    it = iter(ResumableLoader(SeededDataset(Noisy()), batch_size=5, sampler=s))
    assert calls == []  # nothing fetched yet: the resumed position is read at the first batch
    next(it)
    assert calls == [1]
    assert isinstance(loader.sampler, ResumableSampler) and len(loader) == 4


def test_unaugmented_loader_serves_plain_indices():
    loader = train_loader(Noisy(), 5, None, augmented=False, drop_last=False)
    assert not isinstance(loader.dataset, SeededDataset) and not loader.sampler.seed_samples
    first = next(iter(loader))
    assert (first[0].shape == (5,)
            and sorted(i for i, _ in ResumableSampler(Noisy(), seed=0)) == list(range(20)))


def _draws():
    return torch.rand(3).tolist(), np.random.rand(2).tolist(), random.random()


def test_seed_all_seeds_like_manual_seed_without_queueing_device_seeds(monkeypatch):
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    expected = _draws()

    # torch.manual_seed on a build whose CUDA/XPU/MTIA is not initialised formats a stack trace per call
    # to queue the device seed (~0.8 ms at a training step's depth); seed_all, run every step, must not
    def no_stacks(*args, **kwargs):
        raise AssertionError("seed_all formatted a stack trace")

    monkeypatch.setattr(traceback, "format_stack", no_stacks)
    if not torch.cuda.is_initialized():
        seed_all(123)
        assert _draws() == expected
