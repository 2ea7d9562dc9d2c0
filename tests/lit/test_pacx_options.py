"""Stage 2 options that change what the heads see (pool, head_norm, teacher_norm) and the learning-health
readings every Stage 2 run logs; zero-shot retrieval rebuilds the same embedding from the checkpoint."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pacx.eval.zero_shot import load_stage2_heads, stage2_pool
from pacx.lit.pacx import PaCXModule
from pacx.models.heads import TeacherNorm
from pacx.models.vit import create_vit
from Stage2_PACX import main
from tests.helpers import stage2_args


@pytest.fixture(scope="module")
def symile_root(tmp_path_factory):
    from pacx.testing.symile import write_symile_release

    return write_symile_release(tmp_path_factory.mktemp("symile") / "data_npy", n_train=32, n_val=16,
                                n_test_queries=10, cxr_size=40, write_teacher_features=True)


def test_avg_pool_is_the_mean_patch_token():
    enc = create_vit("vit_test", 32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = enc.forward_features(x)
        torch.testing.assert_close(enc(x), tokens[:, 0])
        torch.testing.assert_close(enc.set_pool("avg")(x), tokens[:, 1:].mean(1))
    with pytest.raises(KeyError, match="unknown pool"):
        enc.set_pool("max")


@pytest.mark.parametrize("mode", ["center", "standardize", "whiten"])
def test_teacher_norm_against_numpy(mode):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 3.0  # correlated, offset
    k = 3 if mode == "whiten" else 6
    norm = TeacherNorm(6, k)
    norm.fit(torch.from_numpy(feats), mode)
    out = norm(torch.from_numpy(feats).float()).double().numpy()
    centred = feats - feats.mean(0)
    if mode == "center":
        np.testing.assert_allclose(out, centred, atol=1e-4)
    elif mode == "standardize":
        np.testing.assert_allclose(out, centred / feats.std(0, ddof=1), atol=1e-4)
    else:  # whitened: identity covariance on the fit set, spanning the leading principal subspace
        np.testing.assert_allclose(np.cov(out.T), np.eye(3), atol=1e-4)
        evecs = np.linalg.eigh(np.cov(centred.T))[1][:, ::-1][:, :3]
        proj = norm.proj.double().numpy()
        np.testing.assert_allclose(np.abs(evecs.T @ proj / np.linalg.norm(proj, axis=0)), np.eye(3),
                                   atol=1e-6)


def test_teacher_components_only_with_whiten():
    with pytest.raises(ValueError, match="teacher_components"):
        PaCXModule(encoder_arch="vit_test", img_size=32, teacher_norm="standardize", teacher_components=4)
    with pytest.raises(ValueError, match="teacher_components"):
        PaCXModule(encoder_arch="vit_test", img_size=32, teacher_norm="whiten")


@pytest.mark.bad_input
def test_a_global_batch_of_one_is_an_error_before_training(tmp_path, symile_root, stage1_run):
    """Stage 2 with a global batch of 1 (`--data.batch_size 1`) → ValueError "data.batch_size is 1: the
    contrastive loss needs at least 2 pairs per global batch", before any checkpoint is written.

    One pair per batch leaves InfoNCE no negative (its loss is 0 and its chance value log 1)."""
    run = tmp_path / "pacx"
    with pytest.raises(ValueError, match="data.batch_size is 1: the contrastive loss needs at least 2"):
        main(stage2_args(run, symile_root, stage1_run, "--trainer.max_epochs", "1", "--data.batch_size", "1"))
    assert not (run / "checkpoints").exists()


def test_stage2_options_reach_checkpoint_zero_shot_and_health(tmp_path, symile_root, stage1_run):
    run = tmp_path / "pacx"
    main(stage2_args(run, symile_root, stage1_run, "--trainer.max_epochs", "2",
                     "--model.init_args.teacher_norm", "whiten", "--model.init_args.teacher_components", "4",
                     "--model.init_args.head_norm", "true", "--model.init_args.pool", "avg"))
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    state = ckpt["state_dict"]
    labs = np.load(symile_root / "train" / "labs_features.npy").astype(np.float64)
    np.testing.assert_allclose(state["teacher_norms.labs.mean"].double().numpy(), labs.mean(0), atol=1e-5)
    assert (state["teacher_norms.labs.proj"].shape == (labs.shape[1], 4)
            and state["proj.labs.1.weight"].shape[1] == 4)
    assert state["reg.labs.1.weight"].shape[0] == 4 and "feat_norm.running_mean" in state

    # zero-shot rebuilds the same embeddings: heads with their norms, the run's pool
    module = PaCXModule(encoder_arch="vit_test", img_size=32, shared_dim=16, tuning="lora",
                        teacher_norm="whiten", teacher_components=4, head_norm=True, pool="avg").eval()
    module.load_state_dict(state, strict=True)
    heads, x = load_stage2_heads(run), torch.from_numpy(labs[:5]).float()
    assert stage2_pool(run) == "avg"
    with torch.no_grad():
        torch.testing.assert_close(heads["labs"](x), module.proj["labs"](module.teacher_norms["labs"](x)))
        feat = torch.randn(5, module.vit_cfg.embed_dim)
        torch.testing.assert_close(heads["cxr"](feat), module.proj["cxr"](module.feat_norm(feat)))

    # every Stage 2 run logs its learning health; InfoNCE against log(per-device batch 8)
    metrics = pd.read_csv(run / "metrics.csv")
    for name in ("val/infonce_frac_ecg", "val/infonce_frac_labs", "val/effective_rank", "val/emb_std"):
        assert metrics[name].notna().sum() == 2, name
    frac = metrics["val/infonce_frac_labs"].dropna().iloc[-1]
    clip = metrics["val/clip_labs"].dropna().iloc[-1]  # 16 val rows = two full batches of 8
    assert frac == pytest.approx(clip / np.log(8), rel=1e-4)
    assert json.loads((run / "run.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("mode", ["raw", "whiten"])
def test_regression_targets_keep_float32_under_bf16_autocast(mode):
    """The regression target is the teacher embedding (after ``teacher_norm``) in float32 under
    ``bf16-mixed``: ``raw`` gives the features bit for bit, ``whiten`` the float32 map; autocast used to
    round them to bf16 (up to ~0.4 % per entry) through TeacherNorm's matmul."""
    kw = {"teacher_norm": "whiten", "teacher_components": 4} if mode == "whiten" else {}
    module = PaCXModule(encoder_arch="vit_test", img_size=32, shared_dim=16,
                        teacher_dims={"ecg": 12, "labs": 8}, **kw).eval()
    gen = torch.Generator().manual_seed(0)
    feats = {"ecg": torch.randn(5, 12, generator=gen) * 3 + 1, "labs": torch.randn(5, 8, generator=gen)}
    if mode == "whiten":
        for t, x in feats.items():
            module.teacher_norms[t].fit(torch.randn(64, x.shape[1], generator=gen) * 2 + 1, "whiten")
    batch = {"cxr": torch.randn(5, 3, 32, 32, generator=gen), "teachers": feats}
    with torch.no_grad():
        exact = {t: module.teacher_norms[t](x) for t, x in feats.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module.embed(batch)
    for t, x in feats.items():
        assert out["target"][t].dtype == torch.float32
        torch.testing.assert_close(out["target"][t], exact[t], rtol=0, atol=0)
        if mode == "raw":
            assert torch.equal(out["target"][t], x)
