"""Under DDP, what a stage logs per training epoch is the whole epoch's, not rank zero's share (real 2-process
gloo runs on the CPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from pacx.lit.common import StagedModule

ROWS = 16  # 8 per rank: 2 batches of 4 each, global batch 8


class _Squares(StagedModule):
    """One parameter, loss ``mean((w - x)^2)`` through :meth:`log_stage`; keeps each step's local loss and
    batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.steps: list[tuple[float, int]] = []

    def _shared_step(self, batch, stage: str, batch_idx: int) -> torch.Tensor:
        loss = (self.w - batch).pow(2).mean()
        self.log_stage(stage, {"loss": loss}, batch.shape[0])
        if stage == "train":
            self.steps.append((float(loss), int(batch.shape[0])))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # the losses stay those of w = 0


def _ddp_train_loss_worker() -> None:
    """One rank: a 1-epoch DDP fit of :class:`_Squares` on rows 0..15 (Lightning's sampler: 8 rows a rank);
    writes its steps and its logged epoch loss to PACX_TEST_OUT."""
    torch.set_num_threads(1)
    module = _Squares()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=os.environ["PACX_TEST_OUT"])
    trainer.fit(module, DataLoader(torch.arange(ROWS, dtype=torch.float32), batch_size=4))
    out = {"steps": module.steps, "epoch": float(trainer.callback_metrics["train/loss_epoch"])}
    (Path(os.environ["PACX_TEST_OUT"]) / f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


def test_ddp_train_epoch_loss_is_the_mean_over_every_rank(tmp_path):
    """``train/loss_epoch`` (metrics.csv, the report's loss curves) is the mean over the epoch's rows on all
    ranks, here mean(x^2) over 0..15 = 77.5, on every rank. Rank zero logged its own 8 rows' mean (101.125;
    rank one's 53.875)."""
    from tests.helpers import run_ranks

    run_ranks("tests.lit.test_ddp_logging:_ddp_train_loss_worker", timeout=300,
              env={"PACX_TEST_OUT": str(tmp_path)})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    steps = [s for r in ranks for s in r["steps"]]
    assert len(steps) == 4
    whole = sum(loss * n for loss, n in steps) / sum(n for _, n in steps)
    assert whole == pytest.approx(sum(i * i for i in range(ROWS)) / ROWS)
    assert ranks[0]["epoch"] == pytest.approx(whole, rel=1e-6)
    assert ranks[1]["epoch"] == pytest.approx(whole, rel=1e-6)


def _ddp_eval_loss_worker() -> None:
    """One rank: a DDP ``test`` of :class:`_Squares` on rows 0..8 through Stage 3's evaluation loader (each
    row once: rank 0 reads 5 rows, rank 1 reads 4), 2 per device; writes the logged test loss to
    PACX_TEST_OUT."""
    from pacx.data.common import eval_loader

    torch.set_num_threads(1)

    class Rows(pl.LightningDataModule):
        def test_dataloader(self):
            return eval_loader(torch.arange(9, dtype=torch.float32), 2, self.trainer)

    module = _Squares()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=os.environ["PACX_TEST_OUT"])
    trainer.test(module, datamodule=Rows(), verbose=False)
    out = {"loss": float(trainer.callback_metrics["test/loss"])}
    (Path(os.environ["PACX_TEST_OUT"]) / f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


def test_ddp_eval_loss_over_ranks_of_unequal_size_is_the_split_mean(tmp_path):
    """9 rows on 2 ranks (5 and 4 rows, each once): ``test/loss`` is the mean over the 9 rows, mean(x^2) over
    0..8 = 204 / 9. Lightning's mean-synchronisation of the integer row count truncated 9 / 2 to 4, so every
    such epoch mean came out 9/8 too large (204 / 8 = 25.5)."""
    from tests.helpers import run_ranks

    run_ranks("tests.lit.test_ddp_logging:_ddp_eval_loss_worker", timeout=300,
              env={"PACX_TEST_OUT": str(tmp_path)})
    for rank in range(2):
        logged = json.loads((tmp_path / f"rank{rank}.json").read_text())["loss"]
        assert logged == pytest.approx(sum(i * i for i in range(9)) / 9, rel=1e-6)
