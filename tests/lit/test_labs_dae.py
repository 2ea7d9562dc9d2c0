"""The Labs DAE through ``python -m pacx.teachers``: a short fit logs every
metric; its run loads as the teacher."""

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
