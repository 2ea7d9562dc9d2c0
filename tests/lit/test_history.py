"""Run history is kept: resumes append to metrics.csv with their attempt number, evaluation subcommands log
to their own folder, and run.json tells how a run ended (SIGTERM written by the run, kill -9 detected)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pandas as pd
import pytest
from pytorch_lightning.utilities.exceptions import SIGTERMException

from pacx.run_record import read_run_record
from Stage1_MAE import main
from tests.conftest import stage1_args

STEPS_PER_ATTEMPT = 2


def _args(run, release, max_steps, *extra):
    return stage1_args(run, release, "--trainer.max_steps", str(max_steps), "--trainer.log_every_n_steps",
                       "1", "--trainer.val_check_interval", "2", *extra)


def test_resuming_twice_keeps_every_row_with_its_attempt(tmp_path, chexpert_release, recwarn):
    run = tmp_path / "run"
    main(_args(run, chexpert_release, 2))
    main(_args(run, chexpert_release, 4, "--ckpt_path", "last"))
    main(_args(run, chexpert_release, 6, "--ckpt_path", "last"))
    # both resumes were mid-epoch: the loader says it resumes exactly, so Lightning does not warn otherwise
    assert not [w for w in recwarn if "not resumable" in str(w.message)]
    metrics = pd.read_csv(run / "metrics.csv")
    train = metrics[metrics["train/loss_step"].notna()]
    assert train["step"].tolist() == list(range(6))  # every optimizer step of every attempt, once
    assert train.groupby("attempt")["step"].apply(list).to_dict() == {1: [0, 1], 2: [2, 3], 3: [4, 5]}
    assert set(metrics["attempt"]) == {1, 2, 3}
    assert metrics["val/loss"].notna().sum() >= 3  # the validations of the earlier attempts survive
    record = json.loads((run / "run.json").read_text())
    assert record["attempt"] == 3 and record["status"] == "completed" and record["global_step"] == 6


def test_validate_into_a_run_directory_leaves_training_logs_alone(tmp_path, chexpert_release):
    run = tmp_path / "run"
    main(_args(run, chexpert_release, 2))
    before = {name: (run / name).read_bytes()
              for name in ("metrics.csv", "run.json", "config.yaml", "hparams.yaml")}
    grids = sorted(p.name for p in (run / "reconstructions").glob("*.png"))
    argv = _args(run, chexpert_release, 2, "--ckpt_path", "last")
    main(["validate", *argv[1:]])
    main(["validate", *argv[1:]])
    for name, content in before.items():
        assert (run / name).read_bytes() == content, name
    assert sorted(p.name for p in (run / "reconstructions").glob("*.png")) == grids
    own = pd.read_csv(run / "validate" / "metrics.csv")
    assert len(own) == 2 and own["val/loss"].notna().all()  # both validations, appended
    assert (run / "validate" / "config.yaml").is_file()


def test_stage3_test_into_a_run_directory_keeps_the_training_metrics(tmp_path, stage1_run):
    """``Stage3_eval.py test`` into a finished run: its own test/metrics.csv, the training log untouched."""
    from pacx.data.prepare import run_converter
    from pacx.testing.benchmarks import RELEASE_WRITERS
    from Stage3_eval import main as stage3
    from tests.lit.test_classify import stage3_args

    raw = RELEASE_WRITERS["tb"](tmp_path / "raw", 0)
    run_converter("tb", raw, tmp_path / "manifests")
    run = tmp_path / "run"
    args = stage3_args("tb", raw, tmp_path / "manifests", run, stage1_run, "--seed_everything", "3")
    stage3(args)
    training = (run / "metrics.csv").read_bytes()
    record = (run / "run.json").read_bytes()
    stage3(["test", *args[1:], "--ckpt_path", "last", "--seed_everything", "7"])
    assert (run / "metrics.csv").read_bytes() == training and (run / "run.json").read_bytes() == record
    trained = pd.read_csv(run / "metrics.csv")
    assert trained["val/auroc"].notna().any() and trained["test/auroc"].notna().any()  # fit + its own test
    tested = pd.read_csv(run / "test" / "metrics.csv")
    assert len(tested) == 1 and tested["test/auroc"].notna().all()
    rows = pd.read_csv(run / "results.csv")
    assert len(rows) == 2  # one row per test, as before
    assert rows["seed"].tolist() == [3, 3]  # the head's training seed, not the test process's 7


def test_sigterm_is_recorded_by_the_run(tmp_path, chexpert_release):
    run = tmp_path / "run"
    with pytest.raises(SIGTERMException):
        main(_args(run, chexpert_release, 6, "--trainer.callbacks+=tests.callbacks.SignalAtStep",
                   "--trainer.callbacks.step", "2"))
    assert json.loads((run / "run.json").read_text())["status"] == "killed: SIGTERM"


def test_kill_9_shows_as_killed(tmp_path, chexpert_release, repo):
    """run.json cannot be updated by a SIGKILLed process; reading it through pacx.run_record says killed."""
    run = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, str(repo / "Stage1_MAE.py"),
         *_args(run, chexpert_release, 6, "--trainer.callbacks+=tests.callbacks.KillAtStep",
                "--trainer.callbacks.step", "2")],
        cwd=repo, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    raw = json.loads((run / "run.json").read_text())
    assert raw["status"] == "running" and raw["host"] == socket.gethostname()
    record = read_run_record(run)
    assert record["status"] == "killed" and record["recorded_status"] == "running"
    shown = subprocess.run([sys.executable, "-m", "pacx.run_record", str(run)], cwd=repo, capture_output=True,
                           text=True, check=True).stdout
    assert "stage1_mae killed (attempt 1" in shown
    # a live process stays "running"
    (tmp_path / "live").mkdir()
    (tmp_path / "live" / "run.json").write_text(json.dumps({**raw, "pid": os.getpid()}))
    assert read_run_record(tmp_path / "live")["status"] == "running"
