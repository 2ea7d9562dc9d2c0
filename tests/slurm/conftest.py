"""The ``slurm_cluster`` fixture: one real local Slurm cluster for the session (see ``cluster.py``)."""

from __future__ import annotations

import pytest

from tests.slurm.cluster import LocalSlurm, unavailable


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()
