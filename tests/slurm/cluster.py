"""A real single-node Slurm cluster for the tests: munged + slurmctld + slurmd started from a generated
``slurm.conf`` in a temporary directory, stopped by their pids.

Needs Debian's ``slurm-wlm`` and ``munge`` (``make slurm-deps``; ``.ci/run`` runs it through ``make test``)
and root (slurmd starts job steps as the submitting user). :func:`unavailable` says why a cluster cannot
start here, and the tests skip with exactly that reason.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.helpers import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}


def _which(name: str) -> str | None:
    candidates = (f"/usr/sbin/{name}", f"/sbin/{name}")
    return shutil.which(name) or next((p for p in candidates if os.path.exists(p)), None)


def unavailable() -> str | None:
    """Why a local Slurm cluster cannot start on this machine, or None."""
    missing = [n for n in DAEMONS + CLIENTS if _which(n) is None]
    if missing:
        return (f"Slurm/munge not installed (missing {', '.join(missing)}); run `make slurm-deps` "
                "(apt, as root)")
    if os.geteuid() != 0:
        return "slurmd must run as root to start job steps; these tests need a root sandbox"
    return None


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 - 1024
    return 4096


class LocalSlurm:
    """One node named after this host, ``CPUs=cpus``, ``proctrack/linuxproc`` and ``task/none``."""

    def __init__(self, root: Path, cpus: int = 2) -> None:
        self.root = Path(root)
        self.cpus = cpus
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.pids: dict[str, int] = {}

    @property
    def env(self) -> dict[str, str]:
        """The environment of a Slurm client: this cluster's config, Lightning's SLURM detection off for
        the submitting process itself."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def write_conf(self) -> None:
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.conf.write_text("\n".join([
            "ClusterName=pacxtest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={r}/munge/munge.sock",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=2,bf_interval=2",
            "ReturnToService=2",
            "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
            "SlurmdParameters=config_overrides", "MinJobAge=3600", "KillWait=10",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_mem_mb()} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def start(self, timeout: float = 30.0) -> None:
        r = self.root
        self.write_conf()
        subprocess.run([_which("munged"), "--force", f"--socket={r}/munge/munge.sock",
                        f"--key-file={r}/munge/munge.key", f"--log-file={r}/log/munged.log",
                        f"--pid-file={r}/munge/munged.pid", f"--seed-file={r}/munge/munged.seed"], check=True)
        self.pids["munged"] = int((r / "munge" / "munged.pid").read_text())
        subprocess.run([_which("slurmctld"), "-f", str(self.conf)], check=True, env=self.env)
        subprocess.run([_which("slurmd"), "-f", str(self.conf), "-N", self.node], check=True, env=self.env)
        for name in ("slurmctld", "slurmd"):
            self.pids[name] = self._pid(r / f"{name}.pid", timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run(["sinfo", "-h", "-o", "%t"], check=False).stdout.strip()
            if out == "idle":
                return
            time.sleep(0.3)
        raise RuntimeError(f"the local Slurm node did not come up (sinfo: {out!r}); logs in {r / 'log'}")

    @staticmethod
    def _pid(path: Path, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.is_file() and path.read_text().strip():
                return int(path.read_text())
            time.sleep(0.1)
        raise RuntimeError(f"no pid file {path}")

    def stop(self) -> None:
        for name in reversed(DAEMONS):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)

    # ---- client helpers --------------------------------------------------------------------------

    def run(self, argv: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=kwargs.pop("env", self.env), capture_output=True, text=True,
                              check=check, **kwargs)

    def sbatch(self, argv: list[str], cwd: str | Path | None = None, env: dict | None = None) -> str:
        """Submit; returns the job id."""
        out = self.run(["sbatch", "--parsable", *argv], cwd=cwd, env={**self.env, **(env or {})})
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, RestartCnt, ExitCode, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id], check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float, poll: float = 1.0) -> dict[str, str]:
        """Wait until the job reaches a final state (cancelled on timeout); returns its last record."""
        try:
            return self.wait_state(job_id, FINAL_STATES, timeout, poll)
        except TimeoutError:
            self.run(["scancel", job_id], check=False)
            raise

    def release_requeued(self, job_id: str, timeout: float = 60.0) -> dict[str, str]:
        """Slurm holds a requeued batch job back for 120 s (``Reason=BeginTime``) before it is
        eligible again; once it is pending, make it eligible now
        (``scontrol update StartTime=now``). Returns the pending record."""
        info = self.wait_state(job_id, {"PENDING"}, timeout)
        self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
        return info

    def wait_state(self, job_id: str, states: set[str], timeout: float, poll: float = 0.5) -> dict[str, str]:
        """Poll ``scontrol show job`` until the job's state is one of ``states``; returns that record."""
        deadline = time.monotonic() + timeout
        info = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} never reached {states}: {info}")
