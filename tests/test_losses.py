"""Stage 2 loss (pacx/losses.py) and the cross-rank gather (pacx/dist.py): values against explicit
computations at world size 1, and a real 2-process gloo DDP run against one process on the full batch."""

from __future__ import annotations

import math
import os
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pacx.dist import gather_batch_sizes, gather_with_grad, get_rank, get_world_size, rank_offset_targets
from pacx.losses import DistillationLoss, cosine_regression, info_nce, symmetric_clip_loss
from tests.helpers import gloo_rank, run_ranks

REPO = Path(__file__).resolve().parents[1]
ALL_KEYS = {"loss", "clip_ecg", "clip_labs", "reg_ecg", "reg_labs", "logit_scale"}


def _explicit_ce(logits: torch.Tensor, targets: torch.Tensor, eps: float) -> torch.Tensor:
    """Label-smoothed CE written out: per row (1−ε)·NLL + ε·mean_j(−log p_j), log-sum-exp by hand."""
    rows = []
    for i in range(logits.shape[0]):
        row = logits[i]
        m = max(float(v) for v in row)
        lse = m + math.log(sum(math.exp(float(v) - m) for v in row))
        neg_logp = [lse - float(v) for v in row]
        rows.append((1 - eps) * neg_logp[int(targets[i])] + eps * sum(neg_logp) / len(neg_logp))
    return torch.tensor(sum(rows) / len(rows), dtype=torch.float64)


def _call(loss: DistillationLoss, x: dict[str, torch.Tensor],
          teachers=("ecg", "labs")) -> dict[str, torch.Tensor]:
    """The loss on the flat inputs of :func:`_inputs`, as the per-teacher dicts it takes."""
    return loss(x["cxr_shared"],
                {t: x[f"{t}_shared"] for t in teachers}, {t: x[f"cxr_to_{t}"] for t in teachers},
                {t: x[f"{t}_target"] for t in teachers})


def _pairs(loss: DistillationLoss, cxr, ecg_shared, labs_shared, cxr_to_ecg, cxr_to_labs, ecg_target,
           labs_target):
    return loss(cxr, {"ecg": ecg_shared, "labs": labs_shared}, {"ecg": cxr_to_ecg, "labs": cxr_to_labs},
                {"ecg": ecg_target, "labs": labs_target})


def _inputs(n: int = 6, seed: int = 0, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"cxr_shared": 8, "ecg_shared": 8, "labs_shared": 8, "cxr_to_ecg": 12, "cxr_to_labs": 5,
              "ecg_target": 12, "labs_target": 5}
    return {k: torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_(requires_grad)
            for k, d in shapes.items()}


# ---------------------------------------------------------------------------------------------- world size 1


def test_dist_helpers_are_identity_when_not_distributed():
    assert not dist.is_initialized()
    assert get_world_size() == 1 and get_rank() == 0
    x = torch.randn(5, 3)
    assert gather_with_grad(x) is x
    assert gather_batch_sizes(x) == [(5, 3)]
    assert torch.equal(rank_offset_targets(5), torch.arange(5))


@pytest.mark.parametrize("eps", [0.0, 0.02, 0.3])
def test_info_nce_matches_explicit_computation(eps):
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(5, 7, generator=g, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(9, 7, generator=g, dtype=torch.float64), dim=-1)
    targets = torch.tensor([3, 0, 8, 3, 5])
    scale = 4.3
    logits = torch.tensor([[scale * sum(float(q[i, d] * k[j, d]) for d in range(7)) for j in range(9)]
                           for i in range(5)], dtype=torch.float64)
    torch.testing.assert_close(info_nce(q, k, scale, eps, targets), _explicit_ce(logits, targets, eps))
    # default targets: the diagonal
    torch.testing.assert_close(info_nce(q, k, scale, eps), _explicit_ce(logits, torch.arange(5), eps))


def test_symmetric_clip_is_mean_of_both_directions_on_normalised_inputs():
    x = _inputs()
    a, b = x["cxr_shared"], x["ecg_shared"]
    an, bn = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    t = torch.arange(a.shape[0])
    expected = 0.5 * (_explicit_ce(7.0 * an @ bn.T, t, 0.02) + _explicit_ce(7.0 * bn @ an.T, t, 0.02))
    torch.testing.assert_close(symmetric_clip_loss(a, b, 7.0, 0.02), expected)
    torch.testing.assert_close(symmetric_clip_loss(3 * a, 0.5 * b, 7.0, 0.02), expected)  # scale invariant


def test_clip_term_is_log_n_for_unrelated_embeddings():
    g = torch.Generator().manual_seed(2)
    n = 64
    a, b = torch.randn(n, 4096, generator=g), torch.randn(n, 4096, generator=g)
    loss = DistillationLoss()  # scale 1/0.07 ≈ 14.3: logits ~ N(0, 0.22²), so CE ≈ log n + 0.02
    out = _pairs(loss, a, b, b, a, a, b, b)
    assert abs(out["clip_ecg"].item() - math.log(n)) < 0.1


def test_clip_term_reaches_the_label_smoothing_floor_for_identical_embeddings():
    loss = DistillationLoss(label_smoothing=0.02)
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(1000.0))  # used scale: 100
    eps, s = 0.02, 100.0

    # orthonormal embeddings: logits are 100 on the diagonal and 0 elsewhere, so per row
    # −log p_ii = log(1 + (n−1)e^−100) and −log p_ij = 100 + log(1 + (n−1)e^−100): the floor is ε·100·(n−1)/n
    n = 8
    e = torch.eye(n, 16, dtype=torch.float64)
    floor = eps * s * (n - 1) / n + math.log1p((n - 1) * math.exp(-s))
    out = _pairs(loss, e, e, e, e, e, e, e)
    assert out["logit_scale"].item() == pytest.approx(100.0)
    torch.testing.assert_close(out["clip_ecg"], torch.tensor(floor, dtype=torch.float64))
    assert out["clip_ecg"].item() == pytest.approx(1.75, abs=1e-9)

    # random identical embeddings, from the Gram matrix G: CE_i = lse_j(s·G_ij)
    # − (1−ε)·s·G_ii − ε·s·mean_j G_ij
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(n, 16, generator=g, dtype=torch.float64), dim=-1)
    gram = x @ x.T
    exact = (torch.logsumexp(s * gram, dim=1) - (1 - eps) * s * gram.diagonal()
             - eps * s * gram.mean(dim=1)).mean()
    torch.testing.assert_close(_pairs(loss, x, x, x, x, x, x, x)["clip_labs"], exact)


def test_logit_scale_init_and_clamp():
    loss = DistillationLoss(temperature=0.07)
    assert loss.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    x = _inputs()
    assert _call(loss, x)["logit_scale"].item() == pytest.approx(1 / 0.07)

    for log_value, used in ((math.log(1000.0), 100.0), (math.log(0.5), 1.0)):
        with torch.no_grad():
            loss.logit_scale.fill_(log_value)
        out = _call(loss, x)
        assert out["logit_scale"].item() == pytest.approx(used) and not out["logit_scale"].requires_grad
        expected = symmetric_clip_loss(x["cxr_shared"], x["ecg_shared"], used, 0.02)
        torch.testing.assert_close(out["clip_ecg"], expected)
        loss.zero_grad()
        out["loss"].backward()
        assert loss.logit_scale.grad.item() == 0.0  # the clamp is on the used value: no push past a bound

    with torch.no_grad():
        loss.logit_scale.fill_(math.log(10.0))
    loss.zero_grad()
    _call(loss, x)["loss"].backward()
    assert loss.logit_scale.grad.item() != 0.0


def test_loss_combines_terms_with_weights():
    x = _inputs()
    out = _call(DistillationLoss(clip_weight=0.5, regression_weight=1.0), x)
    assert set(out) == ALL_KEYS
    expected = 0.5 * (out["clip_ecg"] + out["clip_labs"]) / 2 + 1.0 * (out["reg_ecg"] + out["reg_labs"]) / 2
    torch.testing.assert_close(out["loss"], expected)
    out = _call(DistillationLoss(clip_weight=2.0, regression_weight=0.25), x)
    torch.testing.assert_close(
        out["loss"],
        2.0 * (out["clip_ecg"] + out["clip_labs"]) / 2 + 0.25 * (out["reg_ecg"] + out["reg_labs"]) / 2
    )
    torch.testing.assert_close(out["reg_ecg"], cosine_regression(x["cxr_to_ecg"], x["ecg_target"]))


@pytest.mark.parametrize("dropped, kept", [("ecg", "labs"), ("labs", "ecg")])
def test_one_teacher_gives_its_terms_keys_and_gradients_only(dropped, kept):
    x = _inputs(requires_grad=True)
    loss = DistillationLoss()
    out = _call(loss, x, teachers=(kept,))
    assert set(out) == {"loss", f"clip_{kept}", f"reg_{kept}", "logit_scale"}
    torch.testing.assert_close(out["loss"], 0.5 * out[f"clip_{kept}"] + 1.0 * out[f"reg_{kept}"])
    out["loss"].backward()
    for name in (f"{dropped}_shared", f"cxr_to_{dropped}", f"{dropped}_target", f"{kept}_target"):
        assert x[name].grad is None, name  # the other teacher's inputs are not given; teachers are detached
    for name in ("cxr_shared", f"{kept}_shared", f"cxr_to_{kept}"):
        assert x[name].grad is not None and x[name].grad.abs().sum() > 0, name


def test_any_teacher_names_and_their_order():
    """Teachers are the dict keys: a third one adds its terms; the order of the
    keys does not change the loss."""
    x = _inputs()
    g = torch.Generator().manual_seed(7)
    extra = {"vitals_shared": torch.randn(6, 8, generator=g, dtype=torch.float64),
             "cxr_to_vitals": torch.randn(6, 3, generator=g, dtype=torch.float64)}
    extra["vitals_target"] = torch.randn(6, 3, generator=g, dtype=torch.float64)
    x3 = {**x, **extra}
    out = _call(DistillationLoss(), x3, ("ecg", "labs", "vitals"))
    assert set(out) == ALL_KEYS | {"clip_vitals", "reg_vitals"}
    clip = (out["clip_ecg"] + out["clip_labs"] + out["clip_vitals"]) / 3
    reg = (out["reg_ecg"] + out["reg_labs"] + out["reg_vitals"]) / 3
    torch.testing.assert_close(out["loss"], 0.5 * clip + reg)
    torch.testing.assert_close(_call(DistillationLoss(), x3, ("vitals", "labs", "ecg"))["loss"], out["loss"])


def test_defaults_are_the_papers():
    """docs/method.md#stage-2: 0.5 · CLIP + 1.0 · regression, temperature 0.07, label smoothing 0.02."""
    loss = DistillationLoss()
    assert (loss.clip_weight, loss.regression_weight, loss.label_smoothing) == (0.5, 1.0, 0.02)
    assert loss.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert loss.scale().item() == pytest.approx(1 / 0.07)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(temperature=0.0)
    for eps in (1.0, -0.01):  # ε = 1 would be a constant loss
        with pytest.raises(ValueError, match="label_smoothing"):
            DistillationLoss(label_smoothing=eps)
    x = _inputs()
    with pytest.raises(ValueError, match="the same teachers"):
        DistillationLoss()(x["cxr_shared"], {"ecg": x["ecg_shared"]}, {"labs": x["cxr_to_labs"]},
                           {"ecg": x["ecg_target"]})
    with pytest.raises(ValueError, match="at least one"):
        DistillationLoss()(x["cxr_shared"], {}, {}, {})


def test_cosine_regression_is_one_minus_cosine_with_detached_target():
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    p, t = pred.detach(), target.detach()
    cos = [float(p[i] @ t[i] / (p[i].norm() * t[i].norm())) for i in range(4)]
    value = cosine_regression(pred, target)
    assert value.item() == pytest.approx(sum(1 - c for c in cos) / 4)
    value.backward()
    assert target.grad is None and pred.grad is not None
    assert cosine_regression(p, 3 * p).item() == pytest.approx(0.0, abs=1e-12)
    assert cosine_regression(p, -p).item() == pytest.approx(2.0)


def test_half_precision_and_autocast_compute_in_float32():
    x = {k: v.float() for k, v in _inputs().items()}
    ref = _call(DistillationLoss(), x)
    half = {k: v.bfloat16() for k, v in x.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _call(DistillationLoss(), half)
    assert out["loss"].dtype == torch.float32
    # same rounded inputs, fp32 math
    exact = _call(DistillationLoss(), {k: v.float() for k, v in half.items()})
    torch.testing.assert_close(out["loss"], exact["loss"])
    torch.testing.assert_close(out["loss"], ref["loss"], atol=0.05, rtol=0.0)


# ---------------------------------------------------------------------------------------------- real DDP

BATCH, WORLD = 16, 2


class _TinyPacx(nn.Module):
    """A stand-in for encoder + heads: linear maps from fixed inputs to the loss inputs, plus the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(12, 16)
        self.cxr_proj, self.ecg_proj, self.labs_proj = nn.Linear(16, 8), nn.Linear(10, 8), nn.Linear(6, 8)
        self.reg_ecg, self.reg_labs = nn.Linear(16, 10), nn.Linear(16, 6)
        self.criterion = DistillationLoss()

    def forward(self, cxr: torch.Tensor, ecg: torch.Tensor, labs: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.encoder(cxr))
        return _pairs(self.criterion, self.cxr_proj(h), self.ecg_proj(ecg), self.labs_proj(labs),
                      self.reg_ecg(h), self.reg_labs(h), ecg, labs)


class _VitPacx(nn.Module):
    """The real Stage 2 model: PaCXModule's LoRA-wrapped ViT encoder and heads, with its loss."""

    def __init__(self) -> None:
        super().__init__()
        from pacx.lit.pacx import PaCXModule

        self.module = PaCXModule(encoder_arch="vit_test", img_size=32, shared_dim=8,
                                 teacher_dims={"ecg": 10, "labs": 6}, lora_dropout=0.0, head_dropout=0.0)
        # LoRA B starts at 0: give the adapters a real gradient path
        for n, p in self.module.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p, std=0.05)

    def forward(self, cxr: torch.Tensor, ecg: torch.Tensor, labs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.module.loss_terms({"cxr": cxr, "teachers": {"ecg": ecg, "labs": labs}})[1]


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return (_VitPacx() if os.environ.get("PACX_TEST_MODEL") == "vit" else _TinyPacx()).double()


def _tiny_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    cxr_shape = (3, 32, 32) if os.environ.get("PACX_TEST_MODEL") == "vit" else (12,)
    return tuple(torch.randn(BATCH, *shape, generator=g, dtype=torch.float64)
                 for shape in (cxr_shape, (10,), (6,)))


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _torch_nn_gather(x: torch.Tensor) -> torch.Tensor:
    """PyTorch's differentiable all_gather (its backward reduce-scatters, i.e. sums over ranks)."""
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), dim=0)


def _local_slice_gather(x: torch.Tensor) -> torch.Tensor:
    """The common shortcut: gather without grad and put the live local tensor back in its slot."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


def _ddp_worker() -> None:
    """One rank (torchrun-style env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; PACX_TEST_OUT)."""
    with gloo_rank() as (rank, world):
        cxr, ecg, labs = (t.chunk(world)[rank] for t in _tiny_batch())
        result: dict[str, object] = {}

        model = _tiny_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        out = ddp(cxr, ecg, labs)
        out["loss"].backward()
        result["terms"] = {k: v.detach() for k, v in out.items()}
        result["ddp"] = _grads(model)

        # other gathers, parameter gradients averaged by hand exactly as DDP does
        others = (("torch_nn", _torch_nn_gather), ("local_slice", _local_slice_gather))
        for name, gather in () if os.environ.get("PACX_TEST_MODEL") == "vit" else others:
            model = _tiny_model()
            with mock.patch("pacx.losses.gather_with_grad", gather):
                model(cxr, ecg, labs)["loss"].backward()
            grads = _grads(model)
            for g in grads.values():
                dist.all_reduce(g)
                g /= world
            result[name] = grads

        try:  # unequal local batches: every rank raises (none hangs)
            gather_with_grad(torch.zeros(4 + rank, 3))
            result["unequal_error"] = None
        except ValueError as err:
            result["unequal_error"] = str(err)
        torch.save(result, Path(os.environ["PACX_TEST_OUT"]) / f"rank{rank}.pt")


def _run_ranks(out_dir: Path, timeout: float = 120.0, model: str = "tiny") -> list[dict]:
    run_ranks("tests.test_losses:_ddp_worker", WORLD, timeout,
              {"PACX_TEST_OUT": str(out_dir), "PACX_TEST_MODEL": model})
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_ddp_two_processes_match_one_process_on_the_full_batch(tmp_path):
    """Mean over ranks of each loss term = the full-batch term; DDP's averaged gradients = full-batch ones."""
    ranks = _run_ranks(tmp_path)

    model = _tiny_model()
    ref = model(*_tiny_batch())
    ref["loss"].backward()
    ref_grads = _grads(model)

    for key in ALL_KEYS:
        mean = torch.stack([r["terms"][key] for r in ranks]).mean()
        torch.testing.assert_close(mean, ref[key].detach(), atol=1e-10, rtol=1e-10, msg=key)
    assert "criterion.logit_scale" in ref_grads and ref_grads["criterion.logit_scale"].abs() > 0
    for r in ranks:
        for variant in ("ddp", "torch_nn"):
            for name, g in ref_grads.items():
                torch.testing.assert_close(r[variant][name], g, atol=1e-10, rtol=1e-8,
                                           msg=f"{variant} {name}")
        assert "same local shape" in r["unequal_error"]

    # the shortcut that keeps only the local slice's own gradient misses the cross-rank terms
    worst = max((ranks[0]["local_slice"][n] - g).abs().max().item() for n, g in ref_grads.items())
    assert worst > 1e-3


def test_ddp_real_stage2_model_matches_one_process(tmp_path, monkeypatch):
    """The same with PaCXModule's LoRA ViT encoder and heads: equal loss and encoder gradients (1e-5)."""
    ranks = _run_ranks(tmp_path, model="vit")
    monkeypatch.setenv("PACX_TEST_MODEL", "vit")
    model = _tiny_model()
    ref = model(*_tiny_batch())
    ref["loss"].backward()
    ref_grads = {n: g for n, g in _grads_or_none(model).items() if g is not None}
    encoder = [n for n in ref_grads if ".cxr_encoder." in f".{n}" and "lora_" in n]
    assert encoder and any(ref_grads[n].abs().max() > 0 for n in encoder)
    mean = torch.stack([r["terms"]["loss"] for r in ranks]).mean()
    torch.testing.assert_close(mean, ref["loss"].detach(), atol=1e-5, rtol=0)
    for r in ranks:
        for name, g in ref_grads.items():
            torch.testing.assert_close(r["ddp"][name], g, atol=1e-5, rtol=0, msg=name)


def _grads_or_none(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: None if p.grad is None else p.grad.detach().clone() for name, p in model.named_parameters()}


def test_the_documented_seven_tensor_call_and_ablate():
    """The interface scripts and users call: ``DistillationLoss(clip_weight, regression_weight, temperature,
    label_smoothing, ablate)`` and ``forward(cxr_shared, ecg_shared, labs_shared, cxr_to_ecg, cxr_to_labs,
    ecg_target, labs_target)`` (positional or by name), equal to the per-teacher dict form; ``ablate`` drops
    one teacher's terms (its tensors may be None)."""
    x = _inputs()
    flat = [x[k] for k in ("cxr_shared", "ecg_shared", "labs_shared", "cxr_to_ecg", "cxr_to_labs",
                           "ecg_target", "labs_target")]
    ref = _call(DistillationLoss(), x)
    for out in (DistillationLoss(0.5, 1.0, 0.07, 0.02, None)(*flat), DistillationLoss()(**x)):
        assert set(out) == ALL_KEYS
        for k in ALL_KEYS:
            torch.testing.assert_close(out[k], ref[k], msg=k)
    for dropped, kept in (("ecg", "labs"), ("labs", "ecg")):
        loss = DistillationLoss(ablate=dropped)
        given = {**x, f"{dropped}_shared": None, f"cxr_to_{dropped}": None, f"{dropped}_target": None}
        out = loss(**given)
        assert set(out) == {"loss", f"clip_{kept}", f"reg_{kept}", "logit_scale"}
        torch.testing.assert_close(out["loss"], _call(DistillationLoss(), x, (kept,))["loss"])
        torch.testing.assert_close(loss(*flat)["loss"], out["loss"])  # given but ablated: ignored
    with pytest.raises(ValueError, match="ablate"):
        DistillationLoss(ablate="vitals")
