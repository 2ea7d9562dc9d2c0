"""Progress bars (pacx.progress): off without a terminal, with PACX_PROGRESS=0 or --no-progress, else on.

A terminal is a pseudo-terminal on the child's stderr; the CLIs' outputs are the same with and without bars.
"""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

import pacx.progress
from pacx.progress import ENV_VAR, progress, progress_enabled, set_progress
from pacx.testing.seg_benchmarks import write_qata_release

BAR = "%|"  # tqdm's "desc: 100%|██████████| 2/2 [...]"
LOOP = "from pacx.progress import progress\nfor _ in progress(range(20), desc='loop'): pass\n"


class FakeTerminal:
    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


@pytest.fixture
def switched_on(monkeypatch):
    """The process-wide switch on and the environment clear (an earlier
    in-process --no-progress may have run)."""
    monkeypatch.setattr(pacx.progress, "_switched_on", True)
    monkeypatch.delenv(ENV_VAR, raising=False)


def on_terminal(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``argv`` with stderr on a pseudo-terminal; (exit code, what reached the terminal)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=slave, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    os.close(slave)
    chunks = []
    while True:  # drain while it runs (a full pty would block the child); EIO once it has exited
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=120), b"".join(chunks).decode(errors="replace")


def test_off_when_stderr_is_not_a_terminal(switched_on):
    assert not sys.stderr.isatty()  # pytest captures it
    assert not progress_enabled() and progress(range(3)).disable
    assert list(progress(range(3))) == [0, 1, 2]  # a disabled bar still passes the items through


def test_switch_and_environment(switched_on, monkeypatch):
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    assert progress_enabled() and not progress(range(3)).disable
    assert progress(range(3), enabled=False).disable  # a call site's own switch
    monkeypatch.setenv(ENV_VAR, "0")
    assert not progress_enabled()
    monkeypatch.setenv(ENV_VAR, "1")
    set_progress(False)
    assert not progress_enabled()
    set_progress(True)
    assert progress_enabled()


@pytest.mark.parametrize("env, shown", [({}, True), ({ENV_VAR: "0"}, False)])
def test_bar_on_a_pseudo_terminal(env, shown):
    code, text = on_terminal([sys.executable, "-c", LOOP], {ENV_VAR: "1", **env})
    assert code == 0
    assert ("loop: 100%|" in text and "20/20" in text and "it/s" in text) == shown, text


def test_converter_cli_no_progress_same_outputs(tmp_path, repo):
    raw, out = write_qata_release(tmp_path / "raw", 0), tmp_path / "out"
    texts, outputs = {}, {}
    for name, extra in (("bars", []), ("quiet", ["--no-progress"])):  # one --out: prepare.json names it
        code, texts[name] = on_terminal([sys.executable, str(repo / "scripts/prepare.py"), "qata",
                                         "--raw", str(raw), "--out", str(out), *extra], {ENV_VAR: "1"})
        assert code == 0, texts[name]
        outputs[name] = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "qata: 100%|" in texts["bars"] and BAR not in texts["quiet"], texts
    assert "prepare.json" in outputs["bars"] and outputs["bars"] == outputs["quiet"]


def test_demo_no_progress_switches_bars_off(tmp_path, switched_on, monkeypatch):
    from pacx.demo import main
    from pacx.reproduce.execute import stage_argv

    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    point = {"argv": ["fit", "--config", "c.yaml"], "run_dir": str(tmp_path / "run")}
    assert "--trainer.enable_progress_bar" not in stage_argv(point)  # on a terminal the config decides
    assert main(["--out", str(tmp_path), "--only", "no-such-node", "--no-progress"]) == 2  # an unknown node
    assert not progress_enabled()
    args = stage_argv(point)
    assert args[args.index("--trainer.enable_progress_bar") + 1] == "false"
