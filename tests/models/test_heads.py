"""pacx/models/heads.py: the translation of Stage 2 state dicts of the earlier head layout, and FeatureNorm's
global-batch statistics under DDP."""

import os
from pathlib import Path

import torch
from torch import nn

from pacx.models.heads import LEGACY_HEADS, FeatureNorm, upgrade_head_keys
from tests.helpers import gloo_rank, run_ranks

CURRENT = ["cxr_encoder.norm.weight", "proj.cxr.1.weight", "proj.ecg.1.weight", "proj.labs.2.bias",
           "reg.ecg.1.weight", "reg.labs.1.bias", "teacher_norms.ecg.mean", "teacher_norms.labs.proj",
           "loss_fn.logit_scale"]
EARLIER = ["cxr_encoder.norm.weight", "proj_cxr.1.weight", "proj_ecg.1.weight", "proj_labs.2.bias",
           "reg_ecg.1.weight", "reg_labs.1.bias", "teacher_norms.ecg.mean", "teacher_norms.labs.proj",
           "loss_fn.logit_scale"]


def test_earlier_keys_are_renamed_and_values_kept():
    state = {k: i for i, k in enumerate(EARLIER)}
    out = upgrade_head_keys(state)
    assert list(out) == CURRENT and list(out.values()) == list(range(len(EARLIER)))
    assert set(LEGACY_HEADS) == {k.split(".")[0] for k in EARLIER if k.startswith(("proj_", "reg_"))}


def test_current_layout_passes_unchanged_whatever_the_teachers():
    state = {k: 0 for k in CURRENT}
    assert upgrade_head_keys(state) == state
    # a wrong teacher set stays an error of the strict load
    assert upgrade_head_keys(state, ["labs"]) == state


def test_an_earlier_ablation_loses_the_ablated_teachers_heads_and_norm():
    out = upgrade_head_keys({k: 0 for k in EARLIER}, ["labs"])
    assert list(out) == [k for k in CURRENT if ".ecg." not in k]


def _batches() -> list[torch.Tensor]:
    """Two training batches of 8 rows, 5 features, with per-feature offsets and scales."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 5, generator=g, dtype=torch.float64) * torch.arange(1.0, 6.0, dtype=torch.float64)
            + 3.0 for _ in range(2)]


def _feature_norm_steps(chunk: int | None = None, world: int = 1) -> dict[str, torch.Tensor]:
    """Two training steps of a FeatureNorm (loss: a fixed weighting of its output rows), on the whole batches
    or on chunk ``chunk`` of ``world``; then the eval output of the whole second batch."""
    norm = FeatureNorm(5).double().train()
    out: dict[str, torch.Tensor] = {}
    for step, batch in enumerate(_batches()):
        x = (batch if chunk is None else batch.chunk(world)[chunk]).clone().requires_grad_(True)
        y = norm(x)
        weights = torch.linspace(-1.0, 2.0, 8 * 5, dtype=torch.float64).reshape(8, 5)
        w = weights if chunk is None else weights.chunk(world)[chunk]
        (y * w).pow(2).sum().backward()
        out[f"y{step}"], out[f"grad{step}"] = y.detach(), x.grad
    out["running_mean"], out["running_var"] = norm.running_mean.clone(), norm.running_var.clone()
    out["eval"] = norm.eval()(_batches()[1]).detach()
    return out


def _feature_norm_worker() -> None:
    """One rank of the 2-process test below (torchrun-style env; PACX_TEST_OUT)."""
    with gloo_rank() as (rank, world):
        torch.save(_feature_norm_steps(rank, world), Path(os.environ["PACX_TEST_OUT"]) / f"rank{rank}.pt")


def test_feature_norm_under_ddp_normalises_by_the_global_batch(tmp_path):
    """Two real gloo processes with 4 rows each = one process with the 8 rows: outputs, input gradients (of
    the summed loss), running statistics and the eval output, against torch's BatchNorm1d on one process."""
    run_ranks("tests.models.test_heads:_feature_norm_worker", 2, env={"PACX_TEST_OUT": str(tmp_path)})
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    whole = _feature_norm_steps()
    reference = nn.BatchNorm1d(5, affine=False, eps=1e-6).double().train()
    for batch in _batches():
        expected = reference(batch)
    torch.testing.assert_close(whole["y1"], expected.detach())
    for key in ("y0", "grad0", "y1", "grad1"):
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]), whole[key], msg=key)
    for r in ranks:
        for key in ("running_mean", "running_var", "eval"):
            torch.testing.assert_close(r[key], whole[key], msg=key)
    torch.testing.assert_close(whole["running_var"], reference.running_var)
    # per-device statistics would differ: the two halves of a batch have other means
    assert not torch.allclose(_batches()[0][:4].mean(0), _batches()[0].mean(0), atol=0.1)
