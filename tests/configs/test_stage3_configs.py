"""The Stage 3 configs: a base per mode (``configs/stage3/linear_probe.yaml``, ``segmentation.yaml``, the
demo's ``configs/demo/stage3_linear_probe.yaml``) plus one short override per benchmark, stacked with a second
``--config``. Each stack, resolved by the real Stage 3 CLI, equals what the one-file-per-benchmark configs
resolved to before the split (``stage3_resolved.json``); ``test_overrides.py`` checks that no override
restates a value of its base."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
EXPECTED = json.loads((Path(__file__).with_name("stage3_resolved.json")).read_text())


def resolve(configs: list[str], *extra: str) -> dict:
    """``Stage3_eval.py fit --config ... --print_config`` of ``configs`` (relative to the repository root)."""
    from Stage3_eval import main

    args = ["fit", *(a for c in configs for a in ("--config", str(REPO / c))),
            "--data.root", "ROOT", "--data.manifest_dir", "MAN", *extra, "--print_config"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code in (None, 0)
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize("stack", sorted(EXPECTED))
def test_stack_resolves_to_the_pre_split_values(stack):
    got = resolve(stack.split())
    for key, expected in EXPECTED[stack].items():
        assert got[key] == expected, (stack, key)


def test_every_override_is_covered():
    stacks = {c for stack in EXPECTED for c in stack.split()}
    overrides = {str(p.relative_to(REPO)) for d in ("configs/stage3/lp", "configs/stage3/seg")
                 for p in (REPO / d).glob("*.yaml")}
    assert overrides and overrides <= stacks
