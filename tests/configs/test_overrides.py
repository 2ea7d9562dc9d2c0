"""Override configs (ablations, the authors' profile, per-benchmark Stage 3 files) state only what differs
from the base they stack on: no value is restated."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
# override glob -> the base it is stacked after
STACKS = {
    "configs/stage1/mae_vitb_chexpert_*.yaml": "configs/stage1/mae_vitb_chexpert.yaml",
    "configs/stage2/pacx_vitb_symile_*.yaml": "configs/stage2/pacx_vitb_symile.yaml",
    "configs/stage2/ablate_*.yaml": "configs/stage2/pacx_vitb_symile.yaml",
    "configs/stage3/lp/*.yaml": "configs/stage3/linear_probe.yaml",
    "configs/stage3/seg/*.yaml": "configs/stage3/segmentation.yaml",
    "configs/demo/stage3_tb.yaml": "configs/demo/stage3_linear_probe.yaml",
    "configs/demo/stage3_chexchonet.yaml": "configs/demo/stage3_linear_probe.yaml",
}
PAIRS = sorted((str(p.relative_to(REPO)), base)
               for pattern, base in STACKS.items() for p in REPO.glob(pattern))


def flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_every_stack_has_overrides():
    assert {base for _, base in PAIRS} == set(STACKS.values())


@pytest.mark.parametrize(("override", "base"), PAIRS)
def test_override_does_not_restate_its_base(override, base):
    over, under = (flat(yaml.safe_load((REPO / c).read_text()) or {}) for c in (override, base))
    restated = {k: v for k, v in over.items() if k in under and under[k] == v}
    assert not restated, f"{override} restates {restated} of {base}"
