"""The sbatch templates: valid bash, the documented header (one rank per GPU, USR1 warning, requeue), and the
Stage script each one runs; the allocation → trainer mapping."""

from __future__ import annotations

import re
import subprocess

import pytest

from pacx.lit.resilience import slurm_allocation, slurm_job_id, slurm_restart_count
from tests.helpers import REPO

TEMPLATES = {"stage1.sbatch": "Stage1_MAE.py", "stage2.sbatch": "Stage2_PACX.py",
             "stage3.sbatch": "Stage3_eval.py", "node.sbatch": "-m pacx.reproduce exec"}


def _directives(text: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, flags=re.M))


@pytest.mark.parametrize("name,runs", sorted(TEMPLATES.items()))
def test_template_header_and_command(name, runs):
    path = REPO / "scripts" / "slurm" / name
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    d = _directives(text)
    assert d["signal"] == "USR1@90" and "requeue" in d and d["open-mode"] == "append", d
    if "gpus-per-node" in d:  # one rank per GPU
        assert d["ntasks-per-node"] == d["gpus-per-node"]
    srun = [line for line in text.splitlines() if "srun " in line and not line.startswith("#")]
    assert len(srun) == 1 and "--kill-on-bad-exit=1" in srun[0]
    assert runs in "\n".join(text.splitlines()[text.splitlines().index(srun[0]):])
    for key in ("--nodes", "--gpus-per-node", "--cpus-per-task", "--time", "--signal", "--output"):
        # documented in the header
        assert f"#   {key}" in text or f"{key} " in text.split("#SBATCH")[0], (name, key)


def test_allocation_job_id_and_restart_count(monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_NNODES", "2")
    assert slurm_allocation() == (2, 8)
    monkeypatch.setenv("SLURM_NTASKS", "5")
    with pytest.raises(RuntimeError, match="does not divide"):
        slurm_allocation()
    monkeypatch.setenv("SLURM_JOB_ID", "812")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert slurm_job_id() == "812"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "800")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "12")
    assert slurm_job_id() == "800_12"  # scontrol requeue takes the array task, not the whole array
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert slurm_restart_count() == 0
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert slurm_restart_count() == 2
