"""``last.ckpt`` follows the run, not the monitored metric.

Lightning 2.6's ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` at an epoch
end only when that epoch's monitored value entered the top k: a run whose validation
loss rises keeps the ``last.ckpt`` of its best epoch, and a resume would silently
repeat epochs. :class:`pacx.lit.resilience.LastCheckpoint` writes it every epoch.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from pacx.lit.resilience import LastCheckpoint


class RisingValLoss(pl.LightningModule):
    """Validation loss = 1 + epoch: the first epoch is the best, every later one worse."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - batch[0].mean()) ** 2

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", torch.tensor(1.0 + self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, callbacks, max_epochs=3, **trainer_kwargs):
    data = DataLoader(TensorDataset(torch.randn(8, 1)), batch_size=2)  # 4 steps per epoch
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, **trainer_kwargs)
    trainer.fit(RisingValLoss(), data, data)
    return trainer


def _step(path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


def _best(tmp_path):
    return ModelCheckpoint(dirpath=tmp_path, filename="best-{step}", monitor="val/loss", mode="min",
                           save_top_k=1, save_last=False)


def test_last_checkpoint_is_written_every_epoch_whatever_the_monitor(tmp_path):
    _fit(tmp_path, [_best(tmp_path), LastCheckpoint(tmp_path)])
    assert _step(tmp_path / "last.ckpt") == 12  # the end of the run
    # epoch 0 stays best
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-step=4.ckpt", "last.ckpt"]


def test_lightning_save_last_alone_would_keep_the_best_epoch(tmp_path):
    """Pins why LastCheckpoint exists: if Lightning fixes this, the test tells us to drop the workaround."""
    _fit(tmp_path, [ModelCheckpoint(dirpath=tmp_path, monitor="val/loss", mode="min", save_top_k=1,
                                    save_last=True)])
    assert _step(tmp_path / "last.ckpt") == 4


@pytest.mark.parametrize("check_val_every_n_epoch", [1, 2])
def test_last_checkpoint_every_epoch_and_every_n_steps(tmp_path, check_val_every_n_epoch):
    seen = {}

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            last = tmp_path / "last.ckpt"
            seen[trainer.global_step] = _step(last) if last.is_file() else None

    # saves every 3 steps (3, 6, 9) and at every epoch end (4, 8, 12), with or without a validation that epoch
    _fit(tmp_path, [Record(), LastCheckpoint(tmp_path, every_n_train_steps=3)],
         check_val_every_n_epoch=check_val_every_n_epoch)
    assert seen == {0: None, 1: None, 2: None, 3: 3, 4: 4, 5: 4, 6: 6, 7: 6, 8: 8, 9: 9, 10: 9, 11: 9}
    assert _step(tmp_path / "last.ckpt") == 12


def test_atomic_checkpoint_reaches_the_disk_before_its_name(tmp_path, monkeypatch):
    """The temporary file is fsynced before the rename and the folder after it, so a power loss right after
    a save cannot leave an empty ``last.ckpt``; the checkpoint reads back equal."""
    import os

    from pacx.lit import resilience
    from pacx.lit.resilience import AtomicCheckpointIO

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(src), os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(resilience.os, "fsync", fsync)
    monkeypatch.setattr(resilience.os, "replace", replace)
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(3.0)}, "epoch": 2}, path)
    assert events == [("fsync", "file"), ("replace", ".last.ckpt.tmp", "last.ckpt"), ("fsync", "dir")]
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 2 and torch.equal(loaded["state_dict"]["w"], torch.arange(3.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


@pytest.mark.bad_input
def test_failed_checkpoint_save_keeps_the_previous_one(tmp_path):
    """A checkpoint that cannot be written (an unpicklable entry) → the error propagates; the previous
    ``last.ckpt`` stays as it was and no temporary file is left."""
    from pacx.lit.resilience import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - pickle's error type varies with the object
        io.save_checkpoint({"epoch": 2, "hook": lambda: None}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
