"""The demo ECG teacher: view augmentation, the InfoNCE objective, a
``python -m pacx.teachers`` fit with resume, the ECGFounder export (strict load,
same features, refusal of other stages) and feature extraction with it."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pacx.lit.ecg_ssl import ECGSSLModule
from pacx.models.ecg_ssl import (
    ECGAugmentConfig,
    ECGContrastive,
    ECGViewAugment,
    ViewInfoNCE,
    export_ecg_teacher,
    view_retrieval_top1,
)
from pacx.models.ecgfounder import create_ecgfounder, load_ecgfounder, preprocess_ecg
from pacx.teacher_cli import main
from pacx.weights.checkpoint import CheckpointError, load_safetensors
from tests.helpers import gloo_rank, load_script

CROP = 1024  # short views keep the CLI runs fast
N_TRAIN, N_VAL, BATCH = 24, 8, 8
QUIET = dict(scale_range=(1.0, 1.0), noise_std=0.0, wander_amp=0.0, lead_mask_prob=0.0)  # crop only


@pytest.fixture(scope="module")
def symile_root(tmp_path_factory):
    from pacx.testing.symile import write_symile_release

    return write_symile_release(tmp_path_factory.mktemp("symile") / "data_npy", n_train=N_TRAIN, n_val=N_VAL,
                                n_test_queries=4, n_candidates=2, cxr_size=32)


def _args(repo, run, root, *extra):
    return ["fit", "--config", str(repo / "configs/demo/ecg_teacher.yaml"), "--data.root", str(root),
            "--trainer.default_root_dir", str(run), "--model.init_args.crop_samples", str(CROP),
            "--data.batch_size", str(BATCH), "--data.num_workers", "0", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--wandb", "disabled", *extra]


@pytest.fixture(scope="module")
def ssl_run(tmp_path_factory, repo, symile_root):
    """A 2-epoch fit (3 steps each), then resumed from last.ckpt for a third epoch."""
    run = tmp_path_factory.mktemp("runs") / "ecg_ssl"
    main(_args(repo, run, symile_root, "--trainer.max_epochs", "2"))
    first = json.loads((run / "run.json").read_text())
    main(_args(repo, run, symile_root, "--trainer.max_epochs", "3", "--ckpt_path", "last"))
    return run, first


def _records(root, split="val", n=N_VAL) -> torch.Tensor:
    raw = np.load(root / split / f"ecg_{split}.npy")[:n]
    return torch.from_numpy(preprocess_ecg(raw))  # [n, 12, 5000], the teacher's input


# ---- views and objective -----------------------------------------------------------------------------


def test_views_keep_shape_are_stochastic_and_seeded():
    x = torch.randn(4, 12, 5000, generator=torch.Generator().manual_seed(0))
    aug = ECGViewAugment(ECGAugmentConfig(crop_samples=CROP))
    a, b = (aug(x, torch.Generator().manual_seed(7)) for _ in range(2))
    assert a.shape == (4, 12, CROP) and torch.equal(a, b)
    assert not torch.allclose(a, aug(x, torch.Generator().manual_seed(8)))
    assert not torch.allclose(aug(x), aug(x))  # the global RNG in training
    with pytest.raises(ValueError, match="longer than the records"):
        aug(x[..., : CROP - 1])


def test_a_view_without_nuisance_is_a_window_of_its_own_record():
    t = torch.arange(5000.0)
    x = t + 10_000 * torch.arange(12.0)[:, None] + 1e6 * torch.arange(16.0)[:, None, None]  # [16, 12, 5000]
    view = ECGViewAugment(ECGAugmentConfig(crop_samples=CROP, **QUIET))(x, torch.Generator().manual_seed(0))
    starts = (view[:, 0, 0] - 1e6 * torch.arange(16.0)).long()
    for i, s in enumerate(starts.tolist()):
        assert 0 <= s <= 5000 - CROP and torch.equal(view[i], x[i, :, s : s + CROP])
    assert len(set(starts.tolist())) > 1  # each record gets its own crop


def test_lead_masking_zeroes_whole_leads_at_its_rate():
    cfg = ECGAugmentConfig(crop_samples=CROP, **{**QUIET, "lead_mask_prob": 0.5})
    view = ECGViewAugment(cfg)(torch.ones(64, 12, 5000), torch.Generator().manual_seed(0))
    per_lead = view.amax(-1)  # [64, 12]: 1 kept, 0 masked
    assert torch.equal(view, per_lead[..., None].expand_as(view))
    assert 0.4 < (per_lead == 0).float().mean() < 0.6


def test_infonce_equals_a_manual_loop():
    g = torch.Generator().manual_seed(0)
    za, zb, tau = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g,
                                                                                   dtype=torch.float64), 0.2
    a, b = za / za.norm(dim=1, keepdim=True), zb / zb.norm(dim=1, keepdim=True)
    terms = []
    for q, k in ((a, b), (b, a)):
        for i in range(6):
            logits = [float(q[i] @ k[j]) / tau for j in range(6)]
            terms.append(-logits[i] + np.log(np.sum(np.exp(logits))))
    out = ViewInfoNCE(tau)(za, zb)
    assert out["loss"].item() == pytest.approx(np.mean(terms), rel=1e-6)
    assert out["pos_cos"].item() == pytest.approx(float((a * b).sum(1).mean()), rel=1e-6)
    hits = [int((b @ a[i]).argmax() == i) for i in range(6)] + [int((a @ b[i]).argmax() == i)
                                                                for i in range(6)]
    assert view_retrieval_top1(za, zb).item() == pytest.approx(np.mean(hits))
    assert view_retrieval_top1(za, za).item() == 1.0


def test_backbone_keeps_ecgfounder_keys_and_feature_and_freezes_unused_norms(symile_root):
    model = ECGContrastive("demo_small", ECGAugmentConfig(crop_samples=CROP)).eval()
    reference = create_ecgfounder("demo_small", head=False)
    assert list(model.backbone.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(model.backbone.state_dict())
    x = _records(symile_root, n=2)
    with torch.no_grad():
        assert torch.equal(model(x), reference.eval()(x)) and model(x).shape == (2, 128)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(".bn" in n or "first_bn" in n for n in frozen)


def test_the_objective_learns_a_fixed_batch(symile_root):
    torch.manual_seed(0)
    model = ECGContrastive("demo_small", ECGAugmentConfig(crop_samples=512))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    x, losses = _records(symile_root, n=8), []
    for _ in range(12):
        out = model.forward_loss(x, torch.Generator().manual_seed(0))  # the same views every step
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.7 * losses[0], losses


# ---- pacx.teachers fit, resume, export ---------------------------------------------------------------------


def test_fit_logs_metrics_writes_run_files_and_resumes(ssl_run):
    run, first = ssl_run
    steps_per_epoch = N_TRAIN // BATCH
    assert first["stage"] == "ecg_ssl" and first["status"] == "completed"
    assert first["global_step"] == 2 * steps_per_epoch
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["global_step"] == 3 * steps_per_epoch
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["pacx"]["stage"] == "ecg_ssl" and ckpt["pacx"]["ecgfounder_config"] == "demo_small"
    assert ckpt["hyper_parameters"]["crop_samples"] == CROP
    header = (run / "metrics.csv").read_text().splitlines()[0]
    for name in ("train/loss_step", "train/view_top1_step", "train/lr", "val/loss", "val/view_top1",
                 "val/pos_cos", "val/neg_cos", "val/feature_std"):
        assert name in header, name


def test_export_loads_strictly_and_gives_the_trained_features(ssl_run, symile_root, tmp_path):
    run, _ = ssl_run
    out = export_ecg_teacher(run, tmp_path / "ecg_teacher.safetensors")
    tensors, meta = load_safetensors(out)
    assert meta["config"] == "demo_small" and meta["stage"] == "ecg_ssl"
    assert list(tensors) == sorted(create_ecgfounder("demo_small", head=False).state_dict())
    module = ECGSSLModule(crop_samples=CROP).eval()
    module.load_state_dict(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
    teacher = load_ecgfounder(out, config="demo_small")
    x = _records(symile_root)
    with torch.no_grad():
        assert torch.equal(teacher(x), module(x))
        assert not torch.equal(teacher(x), create_ecgfounder("demo_small", head=False).eval()(x))


def test_export_refuses_other_checkpoints_naming_the_path(stage1_run, tmp_path):
    ckpt = stage1_run / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt)) + ".*'stage1_mae'"):
        export_ecg_teacher(ckpt, tmp_path / "x.safetensors")
    bare = tmp_path / "bare.pth"
    torch.save({"state_dict": create_ecgfounder("demo_small").state_dict()}, bare)
    with pytest.raises(CheckpointError, match=re.escape(str(bare))):
        export_ecg_teacher(bare, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_exported_teacher_extracts_features_through_the_script(ssl_run, symile_root, tmp_path):
    run, _ = ssl_run
    weights = tmp_path / "ecg_teacher.safetensors"
    assert load_script("export_ecg_teacher").main([str(run), str(weights)]) == 0
    root = shutil.copytree(symile_root, tmp_path / "data_npy")
    load_script("extract_teacher_features").main([
        "--data-root", str(root), "--ecgfounder", str(weights), "--ecgfounder-config", "demo_small",
        "--splits", "train", "val", "--batch-size", "5", "--no-progress"])
    teacher = load_ecgfounder(weights, config="demo_small")
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        feats = np.load(root / split / "ecg_features.npy")
        assert feats.shape == (n, 128) and feats.dtype == np.float32
        with torch.no_grad():
            expected = teacher(_records(root, split, n)).numpy()
        np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-5)
        assert F.cosine_similarity(torch.from_numpy(feats)[:1], torch.from_numpy(feats)).min() < 0.9999


def test_cached_preprocessing_equals_the_batch_preprocessing_and_filters_each_row_once(symile_root,
                                                                                       monkeypatch):
    """``cache_preprocessed``: a batch mixing cached and new rows gives exactly the per-batch preprocessing,
    each stored row of a split is filtered once, and splits with the same row numbers are kept apart."""
    import pacx.lit.ecg_ssl as lit

    raw = {s: torch.from_numpy(np.load(symile_root / s / f"ecg_{s}.npy")[:6]) for s in ("train", "val")}
    plain, cached = ECGSSLModule(crop_samples=CROP), ECGSSLModule(crop_samples=CROP, cache_preprocessed=True)
    filtered = []

    def counting(x):
        filtered.append(len(x))
        return preprocess_ecg(x)

    monkeypatch.setattr(lit, "preprocess_ecg", counting)
    for split, order in (("train", [0, 1, 2]), ("train", [2, 3, 0, 4]), ("val", [0, 1]), ("train", [4, 1])):
        rows = torch.tensor(order)
        got = cached.cached_preprocess(raw[split][rows], rows, split)
        assert torch.equal(got, plain.preprocess(raw[split][rows])), (split, order)
    # (cached, plain) per batch: the cache filters 3 rows, then rows 3 and 4 only, then val 0 and 1, then none
    assert filtered == [3, 3, 2, 4, 2, 2, 2]
    assert sorted(cached.preprocessed["train"]) == [0, 1, 2, 3, 4]
    assert sorted(cached.preprocessed["val"]) == [0, 1]


def _view_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """8 paired projections [8, 5], the same in every process (float64)."""
    g = torch.Generator().manual_seed(4)
    za = torch.randn(8, 5, generator=g, dtype=torch.float64)
    return za, za + 1.5 * torch.randn(8, 5, generator=g, dtype=torch.float64)


def _ddp_view_infonce_worker() -> None:
    """One rank of 2 (gloo, torchrun-style env; PACX_TEST_OUT): ViewInfoNCE and view_retrieval_top1 on this
    rank's half of :func:`_view_pairs`; saves the readings."""
    import os
    from pathlib import Path

    with gloo_rank() as (rank, world):
        za, zb = (z.chunk(world)[rank] for z in _view_pairs())
        out = {"loss": float(ViewInfoNCE(0.2)(za, zb)["loss"]),
               "view_top1": float(view_retrieval_top1(za, zb))}
        (Path(os.environ["PACX_TEST_OUT"]) / f"rank{rank}.json").write_text(json.dumps(out))


def test_view_top1_under_ddp_is_read_on_the_global_batch(tmp_path):
    """The InfoNCE scores each view against the other views of every rank; ``view_top1`` must be the retrieval
    over that same global batch: 8 records on 2 processes read the full batch's value, 0.375, on both ranks
    (not 4 records' each, 0.625 and 0.625, whose chance level is 1/4 instead of 1/8); the mean of the ranks'
    losses is the full batch's."""
    from tests.helpers import run_ranks

    run_ranks("tests.lit.test_ecg_ssl:_ddp_view_infonce_worker", timeout=120,
              env={"PACX_TEST_OUT": str(tmp_path)})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    za, zb = _view_pairs()
    full = ViewInfoNCE(0.2)(za, zb)
    assert np.mean([r["loss"] for r in ranks]) == pytest.approx(float(full["loss"]), rel=1e-9)
    top1 = float(view_retrieval_top1(za, zb))
    assert 0.0 < top1 < 1.0
    for r in ranks:
        assert r["view_top1"] == pytest.approx(top1, abs=1e-9)
