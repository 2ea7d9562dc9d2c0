"""The Labs DAE through ``python -m pacx.teachers``: a short fit logs every
metric; its run loads as the teacher."""

import numpy as np
import pandas as pd
import pytest
import torch

from pacx.models.labs_dae import load_labs_dae
from pacx.teacher_cli import main
from pacx.weights.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def symile_root(tmp_path_factory):
    from pacx.testing.symile import write_symile_release

    return write_symile_release(tmp_path_factory.mktemp("symile") / "data_npy", n_train=48, n_val=16,
                                n_test_queries=10, cxr_size=32)


def _args(repo, run, root, *extra):
    return ["fit", "--config", str(repo / "configs/teachers/labs_dae.yaml"), "--data.root", str(root),
            "--trainer.default_root_dir", str(run), "--trainer.precision", "32", "--trainer.accelerator",
            "cpu", "--data.batch_size", "16", "--data.num_workers", "0", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--wandb", "disabled", *extra]


def test_two_step_fit_logs_all_metrics_and_exports_the_teacher(tmp_path, repo, symile_root):
    run = tmp_path / "dae"
    main(_args(repo, run, symile_root, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"))
    metrics = pd.read_csv(run / "metrics.csv")
    for split in ("train", "val"):
        suffix = "_step" if split == "train" else ""
        for name in ("loss", "clean_mse", "denoise_mse", "impute_mse", "latent_std"):
            column = metrics[f"{split}/{name}{suffix}"].dropna()
            assert len(column) and (column > 0).all(), (split, name)
    lr = metrics["train/lr"].dropna().tolist()
    assert lr == pytest.approx([3e-4 / 200, 2 * 3e-4 / 200])  # per-step warmup over 200 steps
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["pacx"]["stage"] == "labs_dae" and ckpt["global_step"] == 2
    teacher = load_labs_dae(run)
    assert not teacher.training and teacher.embed_dim == 256
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items()}
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_resuming_a_labs_run_from_a_stage1_checkpoint_is_refused(tmp_path, repo, symile_root, stage1_run):
    with pytest.raises(CheckpointError, match="'stage1_mae' checkpoint, but this run is 'labs_dae'"):
        main(_args(repo, tmp_path / "dae", symile_root, "--ckpt_path",
                   str(stage1_run / "checkpoints/last.ckpt")))


def test_weight_decay_applies_to_every_parameter_as_the_reference():
    """The reference DAE's optimizer is ``AdamW(self.parameters(), lr=3e-4, weight_decay=1e-2)``: biases and
    the LayerNorm decay too. With zero gradients one AdamW step scales every parameter by (1 - lr * wd)."""
    from pacx.lit.labs_dae import LabsDAEModule

    lr, wd = 0.5, 0.4  # large, so that the decay shows at float32 tolerance
    module = LabsDAEModule(lr=lr, weight_decay=wd)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)  # biases start at 0, where decay would not show
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    optimizer = torch.optim.AdamW(module.param_groups(), lr=lr)
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(before) == 10
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] * (1 - lr * wd), msg=name)


def _numpy_dae(module, x, m):
    """The DAE forward in float64 numpy from the module's weights: (reconstruction, z)."""
    from scipy.special import erf

    w = {k: v.detach().double().numpy() for k, v in module.model.state_dict().items()}
    gelu = lambda a: 0.5 * a * (1 + erf(a / np.sqrt(2)))  # noqa: E731
    h = np.concatenate([x, m], 1) @ w["encoder.0.weight"].T + w["encoder.0.bias"]
    h = (h - h.mean(1, keepdims=True)) / np.sqrt(h.var(1, keepdims=True) + 1e-5)
    z = gelu(h * w["encoder.1.weight"] + w["encoder.1.bias"]) @ w["encoder.3.weight"].T + w["encoder.3.bias"]
    out = gelu(z @ w["decoder.0.weight"].T + w["decoder.0.bias"])
    out = out @ w["decoder.2.weight"].T + w["decoder.2.bias"]
    return 1 / (1 + np.exp(-out)), z


def test_step_metrics_match_an_independent_numpy_computation():
    """loss / denoise_mse: MSE over the originally observed entries (one sum over the batch / one count; rows
    with nothing observed add nothing) given the corrupted input; clean_mse: the same given the uncorrupted
    raw input (mean placeholders kept, as extraction and the reference's ``self(x, m)``); impute_mse: over the
    hidden entries."""
    from pacx.lit.labs_dae import LabsDAEModule
    from pacx.models.labs_dae import corrupt

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    values = rng.random((40, 50)).astype(np.float32)
    observed = (rng.random((40, 50)) < 0.7).astype(np.float32)
    observed[[3, 17]] = 0  # admissions with no observed lab
    values[observed == 0] = 0.5  # the mean-imputed placeholders, as stored
    module = LabsDAEModule().eval()
    logged = {}
    module.log_stage = lambda stage, terms, batch_size: logged.update(terms)
    loss = module._shared_step((torch.from_numpy(values), torch.from_numpy(observed)), "val", 7)
    # the validation corruption is seeded by the batch index
    x, m, hidden = (t.double().numpy() for t in corrupt(torch.from_numpy(values), torch.from_numpy(observed),
                                                         0.15, torch.Generator().manual_seed(7)))
    np.testing.assert_array_equal(x, values * m)
    np.testing.assert_array_equal(m, observed * (1 - hidden))

    def mse(pred, mask):
        return ((pred - values) ** 2 * mask).sum() / mask.sum()

    recon, _ = _numpy_dae(module, x, m)
    clean, _ = _numpy_dae(module, values.astype(np.float64), observed.astype(np.float64))
    assert loss.item() == pytest.approx(mse(recon, observed), rel=1e-5)
    assert logged["denoise_mse"].item() == pytest.approx(mse(recon, observed), rel=1e-5)
    assert logged["impute_mse"].item() == pytest.approx(mse(recon, hidden), rel=1e-5)
    assert logged["clean_mse"].item() == pytest.approx(mse(clean, observed), rel=1e-5)


def _dae_validate(root, devices: int, batch_size: int) -> float:
    """``validate`` of a seeded Labs DAE on the release at ``root`` over ``devices`` processes (global
    ``batch_size``); returns ``val/clean_mse``, the uncorrupted reconstruction error (deterministic)."""
    import pytorch_lightning as pl

    from pacx.data.symile import SymileMIMICDataModule
    from pacx.lit.labs_dae import LabsDAEModule

    pl.seed_everything(0, verbose=False)
    module = LabsDAEModule(hidden_dim=32, latent_dim=16)
    data = SymileMIMICDataModule(str(root), "labs", batch_size=batch_size, num_workers=0, pin_memory=False)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.validate(module, data, verbose=False)
    return float(trainer.callback_metrics["val/clean_mse"])


def _ddp_dae_validate_worker() -> None:
    """One rank of a 2-process ``validate`` (PACX_TEST_DATA: the release); rank 0 writes the value."""
    import json
    import os
    from pathlib import Path

    torch.set_num_threads(1)
    value = _dae_validate(Path(os.environ["PACX_TEST_DATA"]), devices=2, batch_size=2)
    if os.environ["RANK"] == "0":
        (Path(os.environ["PACX_TEST_OUT"]) / "clean_mse.json").write_text(json.dumps(value))


def test_validation_under_ddp_reads_each_row_once(tmp_path):
    """9 validation rows on 2 DDP processes, one row per device batch: the epoch's clean reconstruction error
    is the mean over the 9 rows, as on one process with batches of one row. Lightning's padding sampler
    read row 0 a second time on rank 1 (10 rows)."""
    import json

    from pacx.testing.symile import write_symile_release
    from tests.helpers import run_ranks

    root = write_symile_release(tmp_path / "data_npy", n_train=8, n_val=9, n_test_queries=3,
                                n_candidates=3, cxr_size=32)
    single = _dae_validate(root, devices=1, batch_size=1)
    run_ranks("tests.lit.test_labs_dae:_ddp_dae_validate_worker", timeout=300,
              env={"PACX_TEST_OUT": str(tmp_path), "PACX_TEST_DATA": str(root)})
    assert json.loads((tmp_path / "clean_mse.json").read_text()) == pytest.approx(single, rel=1e-6)
