"""Stage jobs through the real local Slurm cluster: the sbatch templates, DDP over srun, USR1 requeue.

(a) ``scripts/slurm/stage2.sbatch`` with 2 tasks trains Stage 2 with 2-process gloo DDP and writes its
    checkpoint and run.json;
(b) a Stage 1 job signalled with USR1 mid-run saves, requeues itself, resumes and ends with the same
    global step and bit-identical weights as an uninterrupted job (same seed, same 2-task allocation).
"""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch

from tests.conftest import stage1_args
from tests.helpers import REPO, stage2_args

pytestmark = pytest.mark.slurm

CPU_TASKS = ["--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]


def _env() -> dict[str, str]:
    return {"PACX_PYTHON": sys.executable, "PACX_TRAINER": "configs/trainer/cpu.yaml",
            "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def _log(tmp_path, job_name: str) -> list[str]:
    return ["--job-name", job_name, "--output", str(tmp_path / f"{job_name}-%j.out")]


def _job_log(tmp_path, job_name: str, job_id: str) -> str:
    path = tmp_path / f"{job_name}-{job_id}.out"
    return path.read_text() if path.is_file() else "(no log)"


@pytest.fixture(scope="module")
def symile_root(tmp_path_factory):
    from pacx.testing.symile import write_symile_release

    return write_symile_release(tmp_path_factory.mktemp("symile") / "data_npy", n_train=32, n_val=16,
                                n_test_queries=10, cxr_size=40, write_teacher_features=True)


def test_stage2_sbatch_two_task_ddp(slurm_cluster, tmp_path, symile_root, stage1_run):
    run = tmp_path / "stage2"
    args = stage2_args(run, symile_root, stage1_run, "--trainer.max_epochs", "2",
                       "--trainer.limit_val_batches", "1")
    assert args[:3] == ["fit", "--config", str(REPO / "configs/demo/stage2_pacx.yaml")]
    job = slurm_cluster.sbatch([*CPU_TASKS, *_log(tmp_path, "stage2"), "scripts/slurm/stage2.sbatch",
                                *args[2:]],
                               cwd=REPO, env=_env())
    info = slurm_cluster.wait(job, timeout=600)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _job_log(tmp_path, "stage2", job)
    assert info["NumTasks"] == "2"
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and record["world_size"] == 2
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    # 32 training pairs, global batch 8 = 4 per rank: 4 steps per epoch, whatever the number of ranks
    assert ckpt["global_step"] == record["global_step"] == 2 * 32 // 8
    log = _job_log(tmp_path, "stage2", job)
    assert "2 task(s)" in log and "distributed_backend=gloo" in log


def _stage1_job(slurm_cluster, tmp_path, release, name: str, progress=None):
    run = tmp_path / name
    extra = ["--trainer.max_epochs", "2", "--trainer.limit_val_batches", "1", "--seed_everything", "11",
             "--data.num_workers", "1"]
    if progress is not None:  # reports each step and slows it (0.4 s) so the test can signal mid-run
        extra += ["--trainer.callbacks+=tests.callbacks.StepProgress", "--trainer.callbacks.path",
                  str(progress), "--trainer.callbacks.sleep", "0.4"]
    args = stage1_args(run, release, *extra)
    job = slurm_cluster.sbatch([*CPU_TASKS, *_log(tmp_path, name), "scripts/slurm/stage1.sbatch", *args[2:]],
                               cwd=REPO, env=_env())
    return run, job


def test_usr1_checkpoints_requeues_and_resumes_exactly(slurm_cluster, tmp_path, chexpert_release):
    progress = tmp_path / "progress.json"
    run, job = _stage1_job(slurm_cluster, tmp_path, chexpert_release, "signalled", progress)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = json.loads(progress.read_text()) if progress.is_file() else {"global_step": 0}
        if state["global_step"] >= 3:
            break
        assert slurm_cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), \
            _job_log(tmp_path, "signalled", job)
        time.sleep(0.2)
    else:
        pytest.fail(f"job {job} never reached step 3: {slurm_cluster.job(job)}")
    slurm_cluster.run(["scancel", "--signal=USR1", job])  # what --signal=USR1@90 sends before a time limit
    pending = slurm_cluster.release_requeued(job)  # requeued by the job itself; skip Slurm's 120 s hold-off
    assert pending["Reason"] == "BeginTime" and pending["Restarts"] == "1", pending
    info = slurm_cluster.wait(job, timeout=600)
    log = _job_log(tmp_path, "signalled", job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["Restarts"] == "1", info  # requeued once
    assert "restart 0:" in log and "restart 1:" in log and "requeueing job" in log
    assert "requeued SLURM job (restart 1): resuming from last.ckpt" in log
    assert json.loads(progress.read_text())["restart"] == 1

    reference_run, reference_job = _stage1_job(slurm_cluster, tmp_path, chexpert_release, "reference")
    ref_info = slurm_cluster.wait(reference_job, timeout=600)
    assert ref_info["JobState"] == "COMPLETED" and ref_info["Restarts"] == "0"
    a = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(reference_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 2 * 48 // 8
    for k, v in b["state_dict"].items():  # same ops in the same order on the same data: bit-identical
        assert torch.equal(a["state_dict"][k], v), k
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and record["world_size"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best-001-12.ckpt", "last.ckpt"]
