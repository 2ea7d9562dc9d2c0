"""Stage 1 end to end through the CLI: fit, resume, run records, guards, schedule, DDP."""

import json
import math
import subprocess
import sys

import pandas as pd
import pytest
import torch
from PIL import Image

from pacx.lit.mae import MAEModule
from pacx.models.mae import create_mae
from pacx.optim import param_groups, resolve_lr, schedule_lengths, warmup_cosine, warmup_cosine_scheduler
from pacx.weights.checkpoint import CheckpointError
from Stage1_MAE import main
from tests.conftest import stage1_args


def _ckpt(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def test_two_step_fit_writes_run_and_resume_continues(tmp_path, chexpert_release):
    run = tmp_path / "run"
    main(stage1_args(run, chexpert_release, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"))
    first = _ckpt(run)
    assert first["global_step"] == 2 and first["pacx"]["stage"] == "stage1_mae"
    assert first["pacx"]["vit_config"]["embed_dim"] == 32
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["stage"] == "stage1_mae" and info["global_step"] == 2
    assert info["checkpoints"]["last"].endswith("last.ckpt") and info["git_sha"]
    assert (run / "config.yaml").is_file() and "mae_vit_test" in (run / "config.yaml").read_text()
    assert (run / "metrics.csv").is_file()

    main(stage1_args(run, chexpert_release, "--trainer.max_steps", "4", "--trainer.limit_val_batches", "1",
                     "--ckpt_path", "last"))
    second = _ckpt(run)
    assert second["global_step"] == 4
    assert second["lr_schedulers"][0]["last_epoch"] == 4  # the schedule continued, not restarted
    assert json.loads((run / "run.json").read_text())["global_step"] == 4


def test_reconstruction_grid_png(stage1_run):
    pngs = sorted((stage1_run / "reconstructions").glob("epoch*.png"))
    assert pngs
    w, h = Image.open(pngs[0]).size
    assert w == 3 * 32 + 4 * 2  # original | masked | reconstruction, 2 px padding
    assert h == 8 * 32 + 9 * 2  # 8 validation images (one per row)


def test_fit_refuses_to_overwrite_a_run(stage1_run, chexpert_release):
    with pytest.raises(FileExistsError, match="--ckpt_path last"):
        main(stage1_args(stage1_run, chexpert_release, "--trainer.max_steps", "1"))


def test_ckpt_path_last_without_checkpoint(tmp_path, chexpert_release):
    with pytest.raises(FileNotFoundError, match="no .*last.ckpt to resume from"):
        main(stage1_args(tmp_path / "fresh", chexpert_release, "--ckpt_path", "last"))


def test_ckpt_path_of_another_stage_is_a_clear_error(tmp_path, stage1_run, chexpert_release):
    other = _ckpt(stage1_run)
    other["pacx"]["stage"] = "stage2_pacx"
    torch.save(other, tmp_path / "stage2.ckpt")
    with pytest.raises(CheckpointError, match="is a 'stage2_pacx' checkpoint, but this run is 'stage1_mae'"):
        main(stage1_args(tmp_path / "r1", chexpert_release, "--ckpt_path", str(tmp_path / "stage2.ckpt")))
    foreign = {"state_dict": {"model.cls_token": torch.zeros(1, 1, 32)}, "epoch": 1}
    torch.save(foreign, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="not a pacx stage1_mae training checkpoint"):
        main(stage1_args(tmp_path / "r2", chexpert_release, "--ckpt_path", str(tmp_path / "foreign.ckpt")))


def test_print_config_shows_the_resolved_config(repo, chexpert_release, tmp_path):
    res = subprocess.run(
        [sys.executable, str(repo / "Stage1_MAE.py"), "fit", "--config",
         str(repo / "configs/stage1/mae_vitb_chexpert.yaml"), "--data.root", str(chexpert_release),
         "--print_config"], capture_output=True, text=True, check=True)
    assert "mask_ratio: 0.9" in res.stdout and "arch: mae_vit_base_patch16" in res.stdout
    assert "default_root_dir: runs/stage1/mae_vitb_chexpert" in res.stdout and "batch_size: 512" in res.stdout
    res075 = subprocess.run(
        [sys.executable, str(repo / "Stage1_MAE.py"), "fit", "--config",
         str(repo / "configs/stage1/mae_vitb_chexpert.yaml"), "--config",
         str(repo / "configs/stage1/mae_vitb_chexpert_ratio075.yaml"), "--data.root", str(chexpert_release),
         "--print_config"], capture_output=True, text=True, check=True)
    assert "mask_ratio: 0.75" in res075.stdout


def test_base_lr_is_scaled_by_global_batch_and_logged(tmp_path, chexpert_release):
    run = tmp_path / "run"
    main(stage1_args(run, chexpert_release, "--trainer.max_steps", "5", "--trainer.limit_val_batches", "1",
                     "--model.lr", "null", "--model.base_lr", "0.001", "--model.warmup_epochs", "0.5",
                     "--trainer.log_every_n_steps", "1"))
    effective = 0.001 * 8 / 256
    assert f"effective_lr: {effective}" in (run / "hparams.yaml").read_text()
    lrs = pd.read_csv(run / "metrics.csv")["train/lr"].dropna().tolist()
    # 6 optimizer steps per epoch: warmup 0.5 epoch = 3 steps, then cosine over the remaining 2 of 5 steps
    expected = [effective * f for f in (1 / 3, 2 / 3, 1.0, 1.0, 0.5)]
    assert lrs == pytest.approx(expected)


def test_gradient_accumulation_scales_the_global_batch_and_the_epoch_length(tmp_path, chexpert_release):
    """accumulate 4 over 6 batches per epoch: global batch 8 · 4 = 32 and ceil(6 / 4) = 2 optimizer steps per
    epoch (Lightning steps on the partial group at the epoch end), so warmup 0.5 epoch = 1 step; AdamW gets
    the module's betas."""
    run = tmp_path / "run"
    main(stage1_args(run, chexpert_release, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
                     "--trainer.accumulate_grad_batches", "4", "--trainer.log_every_n_steps", "1",
                     "--model.lr", "null", "--model.base_lr", "0.001", "--model.warmup_epochs", "0.5",
                     "--model.betas", "[0.8, 0.9]"))
    effective = 0.001 * 32 / 256
    assert f"effective_lr: {effective}" in (run / "hparams.yaml").read_text()
    group = _ckpt(run)["optimizer_states"][0]["param_groups"][0]
    assert tuple(group["betas"]) == (0.8, 0.9)
    # warmup 1 step, cosine over the other 2: after step 3 the lr is at the cosine's end
    assert group["lr"] == pytest.approx(effective * warmup_cosine(3, 1, 3)) and group["lr"] == 0.0
    lrs = pd.read_csv(run / "metrics.csv")["train/lr"].dropna().tolist()
    assert lrs == pytest.approx([effective, effective, effective * 0.5])  # one per optimizer step


@pytest.mark.bad_input
@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1])
def test_a_mask_ratio_outside_the_open_interval_is_refused(ratio):
    """Stage 1 `--model.mask_ratio` 0 or 1 (or outside [0, 1]) → ValueError "mask_ratio must be in (0, 1)":
    with no masked patch the loss (a mean over them) is 0 / 0."""
    with pytest.raises(ValueError, match=r"mask_ratio must be in \(0, 1\), got"):
        MAEModule(arch="mae_vit_test", img_size=32, mask_ratio=ratio)


def test_module_defaults_are_the_papers():
    """docs/method.md#stage-1: ViT-B/16 MAE, mask ratio 0.9, no norm_pix_loss, AdamW lr 1.5e-4 (absolute),
    betas (0.9, 0.95), weight decay 0.05, 10 warmup epochs, stepped per optimizer step."""
    import inspect

    defaults = {k: v.default for k, v in inspect.signature(MAEModule).parameters.items()}
    assert {k: defaults[k] for k in ("arch", "img_size", "mask_ratio", "norm_pix_loss", "lr", "base_lr",
                                     "weight_decay", "betas", "warmup_epochs", "lr_interval")} == {
        "arch": "mae_vit_base_patch16", "img_size": 224, "mask_ratio": 0.9, "norm_pix_loss": False,
        "lr": 1.5e-4, "base_lr": None, "weight_decay": 0.05, "betas": (0.9, 0.95), "warmup_epochs": 10,
        "lr_interval": "step"}


def test_resolve_lr_rule():
    assert resolve_lr(1.5e-4, None, 512) == 1.5e-4
    assert resolve_lr(None, 1.5e-4, 512) == pytest.approx(3e-4)
    with pytest.raises(ValueError, match="exactly one"):
        resolve_lr(1e-3, 1e-3, 256)


def test_warmup_cosine_closed_form():
    warm, total = 10, 110
    assert warmup_cosine(0, warm, total) == pytest.approx(0.1)
    assert warmup_cosine(9, warm, total) == pytest.approx(1.0)
    assert warmup_cosine(10, warm, total) == pytest.approx(1.0)
    assert warmup_cosine(60, warm, total) == pytest.approx(0.5)
    assert warmup_cosine(110, warm, total) == pytest.approx(0.0)
    assert warmup_cosine(35, warm, total, 0.01) == pytest.approx(
        0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    # past the end it stays at the floor (the cosine does not climb back)
    assert warmup_cosine(160, warm, total) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(310, warm, total, 0.01) == pytest.approx(0.01)


def test_schedule_lengths_round_warmup_epochs_to_steps():
    assert schedule_lengths(100, 3, 0.9) == (3, 100)  # 2.7 warmup steps round to 3, not down to 2
    assert schedule_lengths(100, 8, 1.25) == (10, 100) and schedule_lengths(100, 8, 0) == (0, 100)


def _lrs_per_step(scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("floor", [0.0, 0.01])
def test_epoch_interval_matches_a_scheduler_stepped_at_epoch_ends(floor):
    """lr_interval epoch (the authors' stepping): a per-epoch LambdaLR stepped
    once per epoch, written out here."""
    warm, epochs, per_epoch = 2, 8, 3

    def authors(e: int) -> float:  # linear warmup over epochs, then cosine to the floor
        if e < warm:
            return (e + 1) / warm
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (e - warm) / (epochs - warm)))

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = warmup_cosine_scheduler(opt, warm * per_epoch, epochs * per_epoch, floor, "epoch", per_epoch)
    ours = _lrs_per_step(scheduler, epochs * per_epoch)
    expected = [0.1 * authors(step // per_epoch) for step in range(epochs * per_epoch)]
    assert ours == pytest.approx(expected, abs=1e-12)
    assert len(set(ours[3:6])) == 1 and ours[2] != ours[3]  # held within an epoch, changed at its end


def test_epoch_interval_with_a_partial_last_epoch_counts_it():
    """A budget of 23 steps at 3 per epoch is 8 epochs, the last one partial: the per-epoch cosine spans 8
    epochs (it reaches its floor after the last), not 7."""
    warm, per_epoch, total = 2, 3, 23
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_cosine_scheduler(opt, warm * per_epoch, total, 0.0, "epoch", per_epoch)
    ours = _lrs_per_step(scheduler, total)
    expected = [(e + 1) / warm if e < warm else 0.5 * (1 + math.cos(math.pi * (e - warm) / (8 - warm)))
                for e in (step // per_epoch for step in range(total))]
    assert ours == pytest.approx(expected, abs=1e-12)
    assert ours[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 6)))  # epoch 7 of 8: not yet 0


def test_epoch_interval_needs_whole_warmup_epochs_and_a_known_interval():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="whole number of warmup epochs"):
        warmup_cosine_scheduler(opt, 5, 30, interval="epoch", steps_per_epoch=3)
    with pytest.raises(ValueError, match="lr interval"):
        warmup_cosine_scheduler(opt, 5, 30, interval="batch")


def test_no_weight_decay_on_biases_norms_and_tokens():
    model = create_mae("mae_vit_test", img_size=32)
    groups = param_groups(model.named_parameters(), 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert {"cls_token", "mask_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias",
            "norm.bias"} <= no_decay
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "decoder_pred.weight"} <= decay
    assert all(model.get_parameter(n).ndim >= 2 for n in decay)
    assert "pos_embed" not in decay | no_decay and "decoder_pos_embed" not in decay | no_decay  # fixed
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay


def test_ddp_two_processes_keep_the_global_batch(tmp_path, chexpert_release, repo):
    """Real 2-process DDP (gloo, CPU): per-device batch 4 of global 8, same optimizer steps as 1 device."""
    run = tmp_path / "ddp"
    args = stage1_args(run, chexpert_release, "--trainer.max_epochs", "1", "--trainer.devices", "2",
                       "--trainer.strategy", "ddp", "--trainer.limit_val_batches", "1")
    subprocess.run([sys.executable, str(repo / "Stage1_MAE.py"), *args], check=True, capture_output=True,
                   timeout=600, cwd=tmp_path)
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 2 and info["status"] == "completed"
    assert info["global_step"] == 48 // 8  # 24 samples per rank / per-device batch 4
    ckpt = _ckpt(run)
    assert ckpt["global_step"] == 6


def _fit_losses_and_state(run, chexpert_release, *extra):
    main(stage1_args(run, chexpert_release, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
                     "--trainer.log_every_n_steps", "1", *extra))
    losses = pd.read_csv(run / "metrics.csv")["train/loss_step"].dropna().tolist()
    return losses, _ckpt(run)


def test_compiled_and_fused_fit_equals_the_eager_fit(tmp_path, chexpert_release):
    """``model.compile`` (Dynamo + AOTAutograd's joint graph; the aot_eager backend keeps it fast on a CPU)
    and ``model.fused_adamw`` change how the step runs, not what it computes: the same losses and weights
    after 3 steps, and the same checkpoint keys (the compiled wrapper is not part of the module tree)."""
    eager_losses, eager = _fit_losses_and_state(tmp_path / "eager", chexpert_release)
    fast_losses, fast = _fit_losses_and_state(
        tmp_path / "fast", chexpert_release, "--model.compile", "true",
        "--model.compile_options", "{backend: aot_eager}", "--model.fused_adamw", "true")
    assert len(eager_losses) == 3 and fast_losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-6)
    assert fast["state_dict"].keys() == eager["state_dict"].keys()
    for key, value in eager["state_dict"].items():
        got, atol = fast["state_dict"][key], torch.full_like(value, 1e-6)
        if key.endswith("attn.qkv.bias"):  # the key bias: its true gradient is 0 (softmax is shift-
            dim = value.numel() // 3  # invariant), so rounding noise sets its sign and Adam turns that into
            atol[dim:2 * dim] = 1e-4  # a step of up to ~lr (1.5e-3); measured differences are <= 2.5e-5
        assert ((got - value).abs() <= atol + 1e-4 * value.abs()).all(), key
    assert fast["optimizer_states"][0]["param_groups"][0]["fused"] is True
    assert not eager["optimizer_states"][0]["param_groups"][0]["fused"]  # auto: not fused off CUDA


def test_max_epochs_minus_one_trains_by_steps(tmp_path, chexpert_release):
    """``max_epochs: -1`` + ``max_steps``: the schedule spans max_steps (Lightning returns it without loading
    the data, which the optimizer's global batch needs); with no max_steps either, a clear error."""
    run = tmp_path / "run"
    main(stage1_args(run, chexpert_release, "--trainer.max_epochs", "-1", "--trainer.max_steps", "4",
                     "--trainer.limit_val_batches", "0", "--model.warmup_epochs", "0"))
    ckpt = _ckpt(run)
    assert ckpt["global_step"] == 4
    lr = ckpt["optimizer_states"][0]["param_groups"][0]["lr"]
    assert lr == pytest.approx(1.5e-3 * warmup_cosine(4, 0, 4))  # the cosine ends at step 4 = max_steps
    with pytest.raises(ValueError, match="max_epochs is -1 and trainer.max_steps is -1"):
        main(stage1_args(tmp_path / "inf", chexpert_release, "--trainer.max_epochs", "-1"))


def _mae_validate(root, devices: int) -> tuple[float, MAEModule, object]:
    """``validate`` of a seeded test MAE on the release at ``root``, global batch 4 over ``devices``
    processes; returns ``(val/loss, module, datamodule)``."""
    import pytorch_lightning as pl

    from pacx.data.chexpert import CheXpertDataModule

    pl.seed_everything(0, verbose=False)
    module = MAEModule(arch="mae_vit_test", img_size=32)
    data = CheXpertDataModule(root=str(root), batch_size=4, num_workers=0, img_size=32, pin_memory=False)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.validate(module, data, verbose=False)
    return float(trainer.callback_metrics["val/loss"]), module, data


def _ddp_mae_validate_worker() -> None:
    """One rank of a 2-process ``validate`` (PACX_TEST_DATA: the release); rank 0 writes val/loss."""
    import os
    from pathlib import Path

    torch.set_num_threads(1)
    loss, module, _ = _mae_validate(Path(os.environ["PACX_TEST_DATA"]), devices=2)
    if module.global_rank == 0:
        (Path(os.environ["PACX_TEST_OUT"]) / "val_loss.json").write_text(json.dumps(loss))


def test_val_loss_is_the_mean_over_rows_with_fixed_masks_on_any_device_count(tmp_path):
    """Stage 1 ``val/loss`` is the mean of each validation image's loss under its own fixed mask (row i:
    row i mod 4 of the draw seeded with i // 4, for global batch 4), on one process and on 2 DDP processes
    alike. 9 images over 2 ranks: Lightning's padding sampler read row 0 twice, and the masks were drawn
    per device batch, so the 2-process value differed."""
    from pacx.testing.chexpert import write_chexpert_release
    from tests.helpers import run_ranks

    root = write_chexpert_release(tmp_path / "CheXpert-v1.0-small", n_train=4, n_valid=9, seed=1,
                                  width=40, height=36)
    single, module, data = _mae_validate(root, devices=1)

    model, patches = module.model.eval(), module.model.cfg.num_patches
    per_row = []
    with torch.no_grad():
        for i in range(len(data.datasets["val"])):
            noise = torch.rand(4, patches, generator=torch.Generator().manual_seed(i // 4))[i % 4]
            image = data.datasets["val"][i][0][None]
            per_row.append(float(model(image, mask_ratio=module.hparams.mask_ratio, noise=noise[None])[0]))
    assert len(per_row) == 9
    assert single == pytest.approx(sum(per_row) / 9, rel=1e-5)

    run_ranks("tests.lit.test_stage1:_ddp_mae_validate_worker", timeout=300,
              env={"PACX_TEST_OUT": str(tmp_path), "PACX_TEST_DATA": str(root)})
    assert json.loads((tmp_path / "val_loss.json").read_text()) == pytest.approx(single, rel=1e-5)
