"""pacx.run_record: whether a run's process is still alive."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pacx.run_record import process_alive


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads Linux /proc")
def test_process_alive_reads_the_state_after_a_name_holding_a_parenthesis(tmp_path):
    """/proc/<pid>/stat puts the name in parentheses and the state after it; a name such as "x) Z" must not
    be read as a zombie while it runs, and the real zombie (killed, not yet waited for) counts as gone."""
    exe = tmp_path / "x) Z"
    exe.symlink_to(sys.executable)
    proc = subprocess.Popen([str(exe), "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 10
        while "x) Z" not in Path(f"/proc/{proc.pid}/stat").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert Path(f"/proc/{proc.pid}/stat").read_text().startswith(f"{proc.pid} (x) Z) ")
        assert process_alive(proc.pid)
        proc.kill()
        while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z":
            time.sleep(0.05)
        assert not process_alive(proc.pid)
    finally:
        proc.kill()
        proc.wait()
