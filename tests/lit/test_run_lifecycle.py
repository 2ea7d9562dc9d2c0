"""The run lifecycle of the Stage CLIs (pacx.cli, RunRecord): how a run's end is recorded, which checkpoint a
resume starts from, and that a run directory is never silently taken over by another run's checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch

from pacx.run_record import FIT_LOCK, RunLockedError
from Stage1_MAE import main
from tests.conftest import stage1_args


def _args(run, release, max_steps, *extra):
    return stage1_args(run, release, "--trainer.max_steps", str(max_steps), "--trainer.limit_val_batches",
                       "1", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1", *extra)


def _files(run) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def _step(ckpt) -> int:
    return torch.load(ckpt, weights_only=True)["global_step"]


def test_ctrl_c_is_recorded_as_interrupted(tmp_path, chexpert_release, repo):
    """A real SIGINT (Ctrl-C) in a training process: Lightning shuts down gracefully and exits 1, and run.json
    says ``interrupted`` (docs/design.md#run-record), not ``failed: KeyboardInterrupt``."""
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(repo / "Stage1_MAE.py"),
         *_args(run, chexpert_release, 6, "--trainer.callbacks+=tests.callbacks.SignalAtStep",
                "--trainer.callbacks.step", "3", "--trainer.callbacks.signum", str(int(signal.SIGINT)))],
        cwd=repo, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
        # as a process in a terminal's foreground gets Ctrl-C: a test run started in the background by a
        # non-interactive shell has SIGINT ignored, which its children inherit (and never see the signal)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Detected KeyboardInterrupt" in done.stdout + done.stderr
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "interrupted"
    assert record["global_step"] == 3


@pytest.mark.bad_input
def test_another_runs_checkpoint_into_a_run_with_checkpoints_is_refused(tmp_path, chexpert_release):
    """fit --ckpt_path <another run's checkpoint> into a run directory that already holds checkpoints →
    FileExistsError naming both; nothing in the run directory changes."""
    a, b = tmp_path / "a", tmp_path / "b"
    main(_args(a, chexpert_release, 2))
    main(_args(b, chexpert_release, 4))
    before = _files(b)
    other = a / "checkpoints" / "last.ckpt"
    with pytest.raises(FileExistsError, match=rf"{b / 'checkpoints'}.*{other}"):
        main(_args(b, chexpert_release, 6, "--ckpt_path", str(other)))
    assert _files(b) == before
    assert _step(b / "checkpoints" / "last.ckpt") == 4
    # the run's own checkpoints still resume it; another run's checkpoint still starts a new directory
    main(_args(b, chexpert_release, 6, "--ckpt_path", str(b / "checkpoints" / "last.ckpt")))
    assert _step(b / "checkpoints" / "last.ckpt") == 6
    main(_args(tmp_path / "c", chexpert_release, 3, "--ckpt_path", str(other)))
    assert _step(tmp_path / "c" / "checkpoints" / "last.ckpt") == 3


@pytest.mark.bad_input
def test_a_second_fit_of_a_run_in_training_is_refused(tmp_path, chexpert_release, repo):
    """fit of a run directory another live process is training → RunLockedError naming that process; once
    it dies (kill -9: the kernel drops its lock), the same fit runs."""
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pacx.run_record import fit_lock\n"
         f"with fit_lock({str(run)!r}):\n    print('held', flush=True); sys.stdin.read()"],
        cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = rf"{run} is being trained by another fit \(pid {holder.pid} on"
        with pytest.raises(RunLockedError, match=refused):
            main(_args(run, chexpert_release, 2))
        assert not (run / "checkpoints").exists() and not (run / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()
    main(_args(run, chexpert_release, 2))
    assert _step(run / "checkpoints" / "last.ckpt") == 2
    assert (run / FIT_LOCK).read_text() == ""  # an ended fit names no holder


def test_a_requeued_job_resumes_from_its_own_last_checkpoint(tmp_path, chexpert_release, monkeypatch):
    """A job started as ``fit --ckpt_path <run A's checkpoint>`` into run B, then requeued by SLURM
    (``SLURM_RESTART_COUNT`` > 0, the same command line): it resumes from B's own last.ckpt, not from A's
    checkpoint again (which would throw away B's steps and overwrite its checkpoints)."""
    a, b = tmp_path / "a", tmp_path / "b"
    main(_args(a, chexpert_release, 2))
    command = _args(b, chexpert_release, 6, "--ckpt_path", str(a / "checkpoints" / "last.ckpt"))
    main([*command, "--trainer.max_steps", "4"])  # the first job, stopped at step 4
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    main(command)
    assert _step(b / "checkpoints" / "last.ckpt") == 6
    metrics = pd.read_csv(b / "metrics.csv")
    train = metrics[metrics["train/loss_step"].notna()]
    assert train.groupby("attempt")["step"].apply(list).to_dict() == {1: [2, 3], 2: [4, 5]}


def test_model_arguments_replaced_by_the_checkpoints_are_reported(tmp_path, chexpert_release):
    """On resume, Lightning's CLI takes the model's hyperparameters from the checkpoint: a model argument
    given on the command line that differs is not used. That is warned about, naming the argument and both
    values, and the saved config.yaml holds what ran."""
    run = tmp_path / "run"
    main(_args(run, chexpert_release, 2, "--model.mask_ratio", "0.75"))
    with pytest.warns(UserWarning, match=r"model\.mask_ratio: given 0\.6, checkpoint 0\.75") as caught:
        main(_args(run, chexpert_release, 4, "--model.mask_ratio", "0.6", "--ckpt_path", "last"))
    (message,) = [str(w.message) for w in caught if "mask_ratio" in str(w.message)]
    assert "lr" not in message and "arch" not in message  # only what differs
    assert "mask_ratio: 0.75" in (run / "config.yaml").read_text()
    assert _step(run / "checkpoints" / "last.ckpt") == 4


def test_a_resume_with_another_seed_or_batch_size_is_reported(tmp_path, chexpert_release, recwarn):
    """A resume is exact only with the seed and data arguments the run started with: changing them is warned
    about, naming each change (where the data is placed, e.g. data.num_workers, may change silently)."""
    run = tmp_path / "run"
    main(_args(run, chexpert_release, 2, "--seed_everything", "7"))
    main(_args(run, chexpert_release, 3, "--seed_everything", "7", "--data.num_workers", "1", "--ckpt_path",
               "last"))
    assert not [w for w in recwarn if "started with" in str(w.message)]
    with pytest.warns(UserWarning, match="started with") as caught:
        main(_args(run, chexpert_release, 4, "--data.batch_size", "4", "--ckpt_path", "last"))
    (message,) = [str(w.message) for w in caught if "started with" in str(w.message)]
    assert "data.batch_size: 8 -> 4" in message and "seed_everything: 7 -> 0" in message
    assert "num_workers" not in message and "max_steps" not in message
    assert "batch_size: 4" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("logger", ["true", "false"])
def test_validate_keeps_the_fit_config_with_or_without_a_logger(tmp_path, chexpert_release, logger):
    """``validate`` saves its resolved config under ``<run>/validate/``, never over the fit's
    ``<run>/config.yaml`` (which a resume compares against). With ``--trainer.logger false`` it was written to
    the trainer's log_dir, the run directory itself."""
    run = tmp_path / "run"
    main(_args(run, chexpert_release, 1))
    fit_config = (run / "config.yaml").read_text()
    args = _args(run, chexpert_release, 1, "--trainer.logger", logger, "--ckpt_path", "last")
    main(["validate", *args[1:]])
    assert (run / "config.yaml").read_text() == fit_config
    assert f"ckpt_path: {run / 'checkpoints' / 'last.ckpt'}" in (run / "validate" / "config.yaml").read_text()
