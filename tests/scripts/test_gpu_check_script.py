"""scripts/gpu/issue17_check.sh is run once, on a borrowed GPU, with no chance to fix a typo: every benchmark
it calls must accept its arguments, and its steps' timeouts must fit the device's 10-minute command limit."""

from __future__ import annotations

import re
import shlex

from tests.helpers import REPO, load_script

SCRIPT = REPO / "scripts" / "gpu" / "issue17_check.sh"
LIMIT_S = 600  # one device command


def _steps() -> list[tuple[str, int, list[str]]]:
    """(name, timeout, argv after the interpreter) of every ``step`` line, continuation lines joined and the
    script's variables substituted."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    gpu = re.search(r"^GPU=\((.*)\)$", text, re.M).group(1)
    steps = []
    for line in text.splitlines():
        if not line.startswith("step "):
            continue
        line = line.replace('"${GPU[@]}"', gpu)
        for var, value in (("$OUT", "/out"), ("$RATES", "/out/rates.json"), ("$TMP", "/tmp/x")):
            line = line.replace(var, value)
        name, timeout = re.match(r"step (\S+) (\d+) ", line).groups()
        argv = [] if name == "env" else shlex.split(line)[3:]  # env: a multi-line python -c
        steps.append((name, int(timeout), argv))
    return steps


def test_every_step_parses_and_the_timeouts_fit_one_command():
    steps = _steps()
    assert [name for name, _, _ in steps] == ["env", "stage1", "fit", "stage2", "stage3", "data_w16"]
    text = SCRIPT.read_text()
    grace = [int(k) for k in re.findall(r"timeout -k (\d+) ", text)]
    estimate = int(re.search(r"timeout -k \d+ (\d+) \"\$PY\" scripts/reproduce_paper.py", text).group(1))
    worst = sum(t for _, t, _ in steps) + estimate + max(grace) * (len(steps) + 1)  # every step killed late
    assert worst <= LIMIT_S - 20  # 20 s for nvidia-smi and the summary
    for name, _, argv in steps:
        if name == "env":
            continue
        assert argv[0] == "$PY" and argv[1].startswith("scripts/"), argv
        script = load_script(argv[1].removeprefix("scripts/").removesuffix(".py"))
        parsed = script.parse_args(argv[2:])
        args = parsed[0] if isinstance(parsed, tuple) else parsed
        if name in ("stage1", "fit"):
            assert args.device == "cuda" and args.compile is True
        if name == "fit":
            assert (args.warmup, args.steps, str(args.rates)) == (30, 200, "/out/rates.json")
            assert parsed[1] == []  # nothing passed through to the CLI unasked
