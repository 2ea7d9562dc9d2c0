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


class _Rows(Dataset):
    """Item i: (i, a draw from torch's global RNG); ``PACX_TEST_ROWS`` rows (default 11)."""

    def __len__(self) -> int:
        import os

        return int(os.environ.get("PACX_TEST_ROWS", "11"))

    def __getitem__(self, i):
        return torch.tensor(i), torch.rand(())


def _fit_rows(devices: int, global_batch: int, out=None) -> tuple[list[list[int]], int]:
    """One epoch of a one-parameter Lightning module on :class:`_Rows` through ``train_loader`` (global batch
    ``global_batch``, seed 3): (the rows of this process's batches, in order; the optimizer steps)."""
    import pytorch_lightning as pl

    from pacx.data.common import per_device_batch_size

    class Rows(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.rows: list[list[int]] = []

        def train_dataloader(self):
            return train_loader(_Rows(), per_device_batch_size(global_batch, self.trainer), self.trainer,
                                seed=3)

        def training_step(self, batch, batch_idx):
            self.rows.append(batch[0].tolist())
            return (self.w - batch[1]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Rows()
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=out)
    trainer.fit(module)
    return module.rows, trainer.global_step


def _ddp_fit_rows_worker() -> None:
    """One rank of a 2-process CPU (gloo) DDP fit of :func:`_fit_rows`; writes ``rank<r>.json`` to
    PACX_TEST_OUT."""
    import json
    import os
    from pathlib import Path

    torch.set_num_threads(1)
    rows, steps = _fit_rows(2, 4, os.environ["PACX_TEST_OUT"])
    out = Path(os.environ["PACX_TEST_OUT"]) / f"rank{os.environ['RANK']}.json"
    out.write_text(json.dumps({"rows": rows, "steps": steps}))


def test_ddp_epoch_takes_the_one_process_steps_without_repeating_rows(tmp_path):
    """11 rows, global batch 4 (drop_last), 2 real gloo processes: the epoch is the one-process epoch, 2 steps
    on the same rows, each row once. DistributedSampler's padding (a copy of one row to even the ranks out)
    gave 3 steps, one row trained twice."""
    import json

    from tests.helpers import run_ranks

    run_ranks("tests.data.test_resumable:_ddp_fit_rows_worker", timeout=300,
              env={"PACX_TEST_OUT": str(tmp_path)})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    one_rows, one_steps = _fit_rows(1, 4, tmp_path / "one")
    assert one_steps == 2 and [len(b) for b in one_rows] == [4, 4]
    assert [r["steps"] for r in ranks] == [one_steps, one_steps]
    ddp_steps = [sorted(a + b) for a, b in zip(ranks[0]["rows"], ranks[1]["rows"])]
    assert ddp_steps == [sorted(b) for b in one_rows]
    seen = [i for r in ranks for b in r["rows"] for i in b]
    assert len(seen) == len(set(seen)) == 8
