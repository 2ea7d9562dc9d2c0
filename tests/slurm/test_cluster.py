"""The local cluster itself: two tasks on the one node, Slurm's environment in each."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slurm


def test_srun_two_tasks_see_slurm_environment(slurm_cluster):
    out = slurm_cluster.run(["srun", "-N1", "-n2", "bash", "-c",
                             "echo $SLURM_PROCID/$SLURM_NTASKS/$SLURM_JOB_ID"],
                            timeout=60).stdout.split()
    ranks = sorted(line.split("/")[0] for line in out)
    assert ranks == ["0", "1"]
    assert {line.split("/")[1] for line in out} == {"2"}
    assert len({line.split("/")[2] for line in out}) == 1  # one job
