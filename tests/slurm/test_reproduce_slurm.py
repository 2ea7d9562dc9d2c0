"""scripts/reproduce_paper.py plans/demo.yaml --profile smoke through the real local Slurm cluster (issue 7,
test (c)): every node with points is an sbatch job chained with afterok, grids are job arrays, the table is
rendered with finite metrics for every backbone, Stage 2 ran as 2-task DDP, and a re-run submits nothing."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.slurm.cluster import FINAL_STATES

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 900  # seconds for the whole graph (about 3 minutes on 2 idle CPUs)


def job_states(cluster, job_id: str) -> dict[str, str]:
    """``{job id or <array id>_<task>: JobState}`` of a job or of every task of an array."""
    out = cluster.run(["scontrol", "show", "job", "-o", job_id], check=False).stdout
    states = {}
    for line in out.splitlines():
        rec = dict(re.findall(r"(\w+)=(\S*)", line))
        if "JobId" in rec:
            task = rec.get("ArrayTaskId")
            states[f"{rec['ArrayJobId']}_{task}" if task else rec["JobId"]] = rec["JobState"]
    return states


def wait_all(cluster, job_ids: list[str], timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        states = {k: v for j in job_ids for k, v in job_states(cluster, j).items()}
        # a pending array's record ("12_0-11") is not final
        if states and set(states.values()) <= FINAL_STATES:
            return states
        if time.monotonic() > deadline:
            cluster.run(["scancel", *job_ids], check=False)
            raise TimeoutError(f"jobs not finished after {timeout} s: {states}")
        time.sleep(2)


def log_tails(out: Path, chars: int = 3000) -> str:
    return "\n".join(f"==== {p.name}\n{p.read_text()[-chars:]}" for p in sorted((out / "logs").glob("*.out")))


def reproduce(out: Path, summary: Path, env: dict) -> dict:
    cmd = [sys.executable, "scripts/reproduce_paper.py", "plans/demo.yaml", "--profile", "smoke", "--out",
           str(out), "--json", str(summary), "--set", "wandb=disabled"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(summary.read_text())


def test_demo_plan_runs_end_to_end_through_slurm(slurm_cluster, tmp_path):
    out = tmp_path / "demo"
    env = {**slurm_cluster.env, "PACX_PYTHON": sys.executable, "WANDB_MODE": "disabled"}
    start = time.monotonic()
    first = reproduce(out, tmp_path / "submit.json", env)
    nodes = first["nodes"]
    empty = {"seg", "seg_pacx"}  # the smoke profile has no segmentation task: nodes without points
    assert all(n["status"] == ("done" if name in empty else "submitted") for name, n in nodes.items()), nodes
    assert len(first["job_ids"]) == len(nodes) - 2 == 19
    assert nodes["stage3"]["pending"] == list(range(4))  # one array: 1 task x 2 backbones x 2 seeds
    assert nodes["stage3_pacx"]["pending"] == [0, 1]  # 1 upstream seed x 2 probe seeds

    states = wait_all(slurm_cluster, first["job_ids"], TIMEOUT)
    elapsed = time.monotonic() - start
    print(f"\nSlurm jobs ({elapsed:.0f} s): " + ", ".join(f"{n}={nodes[n]['job_id']}" for n in nodes))
    print("states: " + json.dumps(states))
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{log_tails(out)}"
    array_tasks = {k for k in states if k.startswith(f"{nodes['stage3']['job_id']}_")}
    # 14 single jobs; array tasks: manifests 1, stage2 1, export_pacx 1, stage3 4, stage3_pacx 2
    assert len(array_tasks) == 4 and len(states) == 14 + 1 + 1 + 1 + 4 + 2

    table = json.loads((out / "table.json").read_text())
    assert set(table) == {"chexchonet"}
    for task, row in table.items():
        assert set(row) == {"random", "mae", "pacx"}, task
        for kind, cell in row.items():
            assert (math.isfinite(cell["mean"]) and math.isfinite(cell["std"])
                    and cell["n"] == 2), (task, kind, cell)
    assert "PaCX-MAE" in (out / "table.md").read_text()
    results = pd.read_csv(out / "stage3" / "results.csv")
    assert len(results) == 6 and results["run_dir"].nunique() == 6  # every array task appended its row
    stage2 = json.loads((out / "stage2_pacx_s0" / "run.json").read_text())
    assert stage2["status"] == "completed" and stage2["world_size"] == 2

    again = reproduce(out, tmp_path / "again.json", env)
    assert again["job_ids"] == [] and {n["status"] for n in again["nodes"].values()} == {"done"}
    assert slurm_cluster.run(["squeue", "-h"]).stdout.strip() == ""
