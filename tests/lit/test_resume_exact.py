"""Interrupted runs resume exactly: a run stopped mid-epoch and resumed from its checkpoint ends with the same
global step and bit-identical weights as an uninterrupted run (same seed), including after ``kill -9``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from Stage1_MAE import main
from tests.callbacks import Interrupted
from tests.conftest import stage1_args

# 48 training images, global batch 8: 6 steps per epoch; 2 epochs = 12 steps.
STEPS = 12


def _state(run):
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt["global_step"], ckpt["state_dict"], ckpt["optimizer_states"][0]["state"]


def _assert_same(a, b):
    (step_a, weights_a, opt_a), (step_b, weights_b, opt_b) = a, b
    assert step_a == step_b == STEPS
    assert weights_a.keys() == weights_b.keys()
    for k in weights_a:
        assert torch.equal(weights_a[k], weights_b[k]), k
    for i in opt_a:  # Adam moments too
        assert torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"])


def _args(run, release, *extra):
    return stage1_args(run, release, "--trainer.max_epochs", "2", "--trainer.limit_val_batches", "1",
                       "--seed_everything", "7", *extra)


def test_checkpoint_every_n_steps_and_exact_mid_epoch_resume(tmp_path, chexpert_release):
    reference = tmp_path / "reference"
    main(_args(reference, chexpert_release))
    run = tmp_path / "stopped"
    # crashes at step 9; last.ckpt comes from the every-4-steps checkpoint at step 8 (epoch 1, 2 of 6 batches)
    with pytest.raises(Interrupted):
        main(_args(run, chexpert_release, "--checkpoint_every_n_steps", "4",
                   "--trainer.callbacks+=tests.callbacks.RaiseAtStep", "--trainer.callbacks.step", "9"))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 8 and ckpt["epoch"] == 1
    assert json.loads((run / "run.json").read_text())["status"] == "failed: Interrupted"
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 2
    main(_args(run, chexpert_release, "--checkpoint_every_n_steps", "4", "--ckpt_path", "last"))
    _assert_same(_state(run), _state(reference))


def test_kill_9_loses_at_most_the_steps_since_the_last_checkpoint(tmp_path, chexpert_release, repo):
    """A real SIGKILL at step 7 (data loader workers running): last.ckpt holds step 6 (every 3 steps); the
    resumed run finishes identical to an uninterrupted one."""
    common = ("--checkpoint_every_n_steps", "3", "--data.num_workers", "2")
    reference = tmp_path / "reference"
    main(_args(reference, chexpert_release, *common))
    run = tmp_path / "killed"
    killed = subprocess.run(
        [sys.executable, str(repo / "Stage1_MAE.py"),
         *_args(run, chexpert_release, *common, "--trainer.callbacks+=tests.callbacks.KillAtStep",
                "--trainer.callbacks.step", "7")],
        cwd=repo, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"})  # the test process's thread count: the same float sums
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert json.loads((run / "run.json").read_text())["status"] == "running"  # it never got to say otherwise
    main(_args(run, chexpert_release, *common, "--ckpt_path", "last"))
    _assert_same(_state(run), _state(reference))
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
