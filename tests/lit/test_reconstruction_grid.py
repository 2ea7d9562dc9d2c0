"""ReconstructionGrid's schedule: every ``every_n_epochs`` epochs, plus the run's last epoch."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from pacx.lit.callbacks import ReconstructionGrid


def _saved_epochs(max_epochs: int, max_steps: int, epochs: int, steps_per_epoch: int = 5) -> list[int]:
    grid = ReconstructionGrid(every_n_epochs=4)
    grid._images = torch.zeros(1, 3, 8, 8)
    saved = []
    grid.save = lambda trainer, pl_module, epoch, out_dir: saved.append(epoch)
    for epoch in range(epochs):
        trainer = SimpleNamespace(current_epoch=epoch, max_epochs=max_epochs, max_steps=max_steps,
                                  global_step=(epoch + 1) * steps_per_epoch, sanity_checking=False,
                                  log_dir="unused", default_root_dir="unused")
        grid.on_validation_epoch_end(trainer, None)
    return saved


def test_every_n_epochs_and_the_last_epoch():
    assert _saved_epochs(max_epochs=10, max_steps=-1, epochs=10) == [0, 4, 8, 9]


def test_training_by_steps_is_not_a_grid_every_epoch():
    """``max_steps`` with ``max_epochs: -1`` (Lightning's value when only max_steps is set): still every 4th
    epoch, and the epoch that reaches max_steps is the last one."""
    assert _saved_epochs(max_epochs=-1, max_steps=50, epochs=10) == [0, 4, 8, 9]
