"""Stage 3 segmentation: decoder shapes, loss/metric formulas, paired augmentation, and synthetic release ->
converter -> manifests -> fit + test for every segmentation registry entry."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pacx.data.manifest import ManifestError
from pacx.data.prepare import run_converter
from pacx.data.registry import BENCHMARKS
from pacx.data.seg_dataset import SegmentationDataset, paired_train_augment
from pacx.lit.segment import SegmentationLoss, SegmentationModule, dice_iou, soft_dice_loss
from pacx.models.backbones import BackboneConfig
from pacx.models.seg_decoder import SegDecoder, tokens_to_map
from pacx.testing.seg_benchmarks import SEG_RELEASE_WRITERS

SEGMENTATION = sorted(n for n, s in BENCHMARKS.items() if s.task == "segmentation")
# CXL-Seg rows come from the split file, not a folder listing: drop rows whose files are missing
CONVERTER_OPTIONS = {"cxlseg": {"check_files": True}}


def test_every_segmentation_entry_has_a_writer_and_config(repo):
    for name in SEGMENTATION:
        assert name in SEG_RELEASE_WRITERS
        assert (repo / "configs/stage3/seg" / f"{name}.yaml").is_file()
    assert (repo / "configs/stage3/segmentation.yaml").is_file()


@pytest.mark.parametrize(("patch", "grid", "dim"), [(8, 4, 32), (16, 14, 64), (16, 2, 768)])
def test_decoder_returns_logits_at_input_resolution(patch, grid, dim):
    tokens = torch.randn(2, grid * grid, dim)
    out = SegDecoder(dim, patch)(tokens_to_map(tokens, grid))
    assert out.shape == (2, 1, grid * patch, grid * patch)


def test_decoder_widths_for_patch16_follow_the_paper():
    convs = [m for m in SegDecoder(768, 16).modules()
             if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(768, 256), (256, 128), (128, 64), (64, 32),
                                                                (32, 1)]
    with pytest.raises(ValueError, match="power of two"):
        SegDecoder(768, 12)


def test_token_map_keeps_the_image_layout():
    """Patch tokens reshaped by tokens_to_map sit where their patch is: the patch embedding's conv output."""
    from pacx.models.vit import ViTEncoder, vit_config

    torch.manual_seed(0)
    encoder = ViTEncoder(vit_config("vit_test", 32)).eval()  # patch 8: a 4x4 grid
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tokens_to_map(encoder.patch_embed(x), 4), encoder.patch_embed.proj(x))


def test_decoder_reads_the_normed_patch_tokens_without_cls():
    """The decoder's input is the final-norm output of the 16 patch tokens (CLS dropped), in grid layout."""
    from pacx.lit.segment import SegmentationModule

    torch.manual_seed(0)
    module = SegmentationModule("covidqu_seg", BackboneConfig("random", None, "vit_test", 32),
                                decoder_width=8).eval()
    seen = []
    module.decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = module(x)
        enc = module.backbone
        tokens = torch.cat([enc.cls_with_pos(2), enc.prepare_tokens(x)], dim=1)  # [2, 17, D]
        for blk in enc.blocks:
            tokens = blk(tokens)
        expected = enc.norm(tokens)[:, 1:]  # [2, 16, D]
    assert logits.shape == (2, 1, 32, 32)
    feature_map = seen[0]  # [2, D, 4, 4]
    for r in range(4):
        for c in range(4):
            torch.testing.assert_close(feature_map[:, :, r, c], expected[:, 4 * r + c])


def test_soft_dice_and_hard_dice_iou_match_independent_computations():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, generator=g)
    target = (torch.rand(3, 1, 8, 8, generator=g) > 0.5).float()
    p = 1 / (1 + np.exp(-logits.numpy().astype(np.float64)))
    y = target.numpy().astype(np.float64)
    expected_soft = 1 - (2 * (p * y).sum() + 1e-6) / (p.sum() + y.sum() + 1e-6)
    assert soft_dice_loss(logits, target).item() == pytest.approx(expected_soft, rel=1e-5)
    hard = (p > 0.5).astype(np.float64)
    inter = (hard * y).sum()
    dice, iou = dice_iou(logits, target)
    assert dice.item() == pytest.approx((2 * inter + 1e-6) / (hard.sum() + y.sum() + 1e-6), rel=1e-6)
    assert iou.item() == pytest.approx((inter + 1e-6) / (hard.sum() + y.sum() - inter + 1e-6), rel=1e-6)
    perfect = torch.where(target > 0, 10.0, -10.0)
    assert dice_iou(perfect, target)[0].item() == pytest.approx(1.0)
    # an empty mask predicted empty: the ε terms make it a perfect score, not 0 / 0 or a loss of 1
    empty, silent = torch.zeros(2, 1, 8, 8), torch.full((2, 1, 8, 8), -40.0)
    assert soft_dice_loss(silent, empty).item() == pytest.approx(0.0, abs=1e-4)
    assert [v.item() for v in dice_iou(silent, empty)] == pytest.approx([1.0, 1.0])


def test_segmentation_loss_weights_its_terms():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    target = (torch.rand(2, 1, 8, 8, generator=g) > 0.6).double()
    x, y = logits.numpy(), target.numpy()
    bce = np.mean(np.logaddexp(0, x) - y * x)
    out = SegmentationLoss(bce_weight=2.0, dice_weight=0.5)(logits, target)
    assert out["bce"].item() == pytest.approx(bce, rel=1e-10)
    torch.testing.assert_close(out["soft_dice"], soft_dice_loss(logits, target))
    assert out["loss"].item() == pytest.approx(2.0 * bce + 0.5 * out["soft_dice"].item(), rel=1e-10)


def test_defaults_are_the_stage3_settings():
    """docs/datasets.md#stage-3-settings: decoder width 256, 1.0 · BCE + 1.0 · soft Dice, AdamW lr 1e-4,
    weight decay 1e-4, betas (0.9, 0.999), 5 warmup epochs."""
    import inspect

    defaults = {k: v.default for k, v in inspect.signature(SegmentationModule).parameters.items()}
    assert {k: defaults[k] for k in ("decoder_width", "bce_weight", "dice_weight", "lr", "weight_decay",
                                     "betas", "warmup_epochs")} == {
        "decoder_width": 256, "bce_weight": 1.0, "dice_weight": 1.0, "lr": 1e-4, "weight_decay": 1e-4,
        "betas": (0.9, 0.999), "warmup_epochs": 5.0}


def _asymmetric_pair(size: int = 32) -> tuple[Image.Image, Image.Image]:
    """An image whose red channel equals the mask: a block in the upper-left quadrant."""
    arr = np.zeros((size, size), dtype=np.uint8)
    arr[4:14, 3:12] = 255
    rgb = np.stack([arr, np.zeros_like(arr), np.zeros_like(arr)], axis=-1)
    return Image.fromarray(rgb, "RGB"), Image.fromarray(arr, "L")


def test_paired_augmentation_moves_image_and_mask_together():
    flipped = 0
    for seed in range(12):
        torch.manual_seed(seed)
        image, mask = paired_train_augment(*_asymmetric_pair())
        red, m = np.asarray(image)[..., 0].astype(int), np.asarray(mask).astype(int)
        assert np.array_equal(red, m)
        flipped += int(m[:, 16:].sum() > m[:, :16].sum())
    assert 0 < flipped < 12  # flips happen sometimes, not always


def test_train_augmentation_is_set_by_the_resumable_sample_seed(tmp_path):
    """The resumable loader seeds each sample's draws (pacx.data.resumable.seed_sample: torch and numpy):
    the same (index, seed) key gives the same flip and angle every time."""
    from pacx.data.resumable import SeededDataset

    image, mask = _asymmetric_pair()
    image.save(tmp_path / "a.png")
    mask.save(tmp_path / "a_mask.png")
    df = pd.DataFrame({"img_path": ["a.png"], "mask_path": ["a_mask.png"]})
    ds = SeededDataset(SegmentationDataset(df, tmp_path, "img_path", "mask_path", 32, train=True), seed=0)
    for sample_seed in (1, 123, 2**40 + 7):
        first = ds[(0, sample_seed)]
        random.seed(sample_seed + 1)  # Python's generator is not part of the sample seed
        for _ in range(4):
            again = ds[(0, sample_seed)]
            assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    masks = [ds[(0, s)][1] for s in range(16)]
    assert len({m.numpy().tobytes() for m in masks}) > 1  # different seeds, different draws


def _write_pair(root: Path, name: str, size=(16, 16), mask_size=None) -> None:
    Image.fromarray(np.full((*size, 3), 128, np.uint8)).save(root / f"{name}.png")
    mask = np.zeros(mask_size or size, np.uint8)
    mask[2:8, 2:6] = 200
    Image.fromarray(mask, "L").save(root / f"{name}_mask.png")


@pytest.mark.bad_input
def test_dataset_outputs_binary_masks_and_names_bad_rows(tmp_path):
    """Segmentation manifest row with a missing mask, or a mask of another size than its image →
    ManifestError naming the CSV, the row and its line, and the file."""
    _write_pair(tmp_path, "a")
    _write_pair(tmp_path, "b", mask_size=(12, 16))
    df = pd.DataFrame({"img_path": ["a.png", "a.png", "b.png"],
                       "mask_path": ["a_mask.png", "gone.png", "b_mask.png"]})
    ds = SegmentationDataset(df, tmp_path, "img_path", "mask_path", 32, train=True, source="train.csv")
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y.shape == (1, 32, 32)
    assert set(y.unique().tolist()) <= {0.0, 1.0} and y.sum() > 0
    with pytest.raises(ManifestError, match=r"train\.csv: row 1 \(line 3\): .*gone\.png"):
        ds[1]
    with pytest.raises(ManifestError, match=r"train\.csv: row 2 \(line 4\): mask .*b_mask\.png is 16x12"):
        ds[2]


def test_cache_decoded_serves_the_same_pairs_without_reading_files_again(tmp_path):
    """With ``cache_decoded`` each pair is decoded once: later epochs give the same tensors (and the same
    augmentation for the same draws) with the files gone."""
    for name in ("a", "b"):
        _write_pair(tmp_path, name)
    df = pd.DataFrame({"img_path": ["a.png", "b.png"], "mask_path": ["a_mask.png", "b_mask.png"]})
    for train in (False, True):
        plain = SegmentationDataset(df, tmp_path, "img_path", "mask_path", 24, train=train)
        cached = SegmentationDataset(df, tmp_path, "img_path", "mask_path", 24, train=train,
                                     cache_decoded=True)
        for idx in (0, 1):
            torch.manual_seed(idx)
            want = plain[idx]
            torch.manual_seed(idx)
            got = cached[idx]
            assert all(torch.equal(w, g) for w, g in zip(want, got))
        assert sorted(cached.decoded) == [0, 1]
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in tmp_path.glob("*.png"):
        f.rename(moved / f.name)
    torch.manual_seed(1)
    again = cached[1]
    torch.manual_seed(1)
    assert all(torch.equal(a, g) for a, g in zip(again, got))
    with pytest.raises(ManifestError, match="not found"):  # without the cache the files are read again
        plain[1]


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_masks_resize_with_the_configured_interpolation_then_binarise(tmp_path, mode):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (10, 10), dtype=np.uint8), mode="L").save(tmp_path / "i.png")
    mask = (rng.random((10, 10)) > 0.5).astype(np.uint8) * 255
    Image.fromarray(mask, mode="L").save(tmp_path / "m.png")
    df = pd.DataFrame({"img_path": ["i.png"], "mask_path": ["m.png"]})
    _, y = SegmentationDataset(df, tmp_path, "img_path", "mask_path", 16, train=False,
                               mask_interpolation=mode)[0]
    resample = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR}[mode]
    expected = np.asarray(Image.fromarray(mask, mode="L").resize((16, 16), resample),
                          dtype=np.float32) / 255 > 0.5
    np.testing.assert_array_equal(y[0].numpy(), expected.astype(np.float32))
    if mode == "nearest":  # nearest-neighbour: every output pixel is one source pixel
        src = ((np.arange(16) + 0.5) * 10 / 16).astype(int)  # pixel centres
        np.testing.assert_array_equal(y[0].numpy(), mask[src][:, src] / 255)


def test_a_listed_mask_missing_from_the_release_names_its_row(tmp_path):
    from pacx.data.seg_dataset import SegmentationDataModule

    raw = SEG_RELEASE_WRITERS["cxlseg"](tmp_path / "raw", 0)
    run_converter("cxlseg", raw, tmp_path / "manifests")  # without check_files the unpaired row stays
    dm = SegmentationDataModule("cxlseg", str(_image_root(raw, tmp_path / "manifests")),
                                str(tmp_path / "manifests"), batch_size=4, num_workers=0, img_size=32,
                                pin_memory=False)
    errors = []
    for split in ("train", "val", "test"):
        ds = dm.build_dataset(split)
        for i in range(len(ds)):
            try:
                ds[i]
            except ManifestError as err:
                errors.append(str(err))
    assert len(errors) == 1 and "row " in errors[0] and "-mask.jpg" in errors[0]


def _image_root(raw: Path, manifests: Path) -> Path:
    """The folder under ``raw`` that the manifest's paths are relative to."""
    first = pd.read_csv(manifests / "train.csv")["img_path"].iloc[0]
    for d in [raw, *sorted(p for p in raw.rglob("*") if p.is_dir())]:
        if (d / first).is_file():
            return d
    raise AssertionError(f"no image root for {first} under {raw}")


@pytest.mark.parametrize("name", SEGMENTATION)
def test_fit_then_test_appends_results(name, stage1_run, tmp_path, repo):
    from Stage3_eval import main

    raw = SEG_RELEASE_WRITERS[name](tmp_path / "raw", 0)
    run_converter(name, raw, tmp_path / "manifests", **CONVERTER_OPTIONS.get(name, {}))
    root = _image_root(raw, tmp_path / "manifests")
    run_dir = tmp_path / "run"
    cli = main([
        "fit", "--config", str(repo / "configs/stage3/segmentation.yaml"),
        "--config", str(repo / "configs/stage3/seg" / f"{name}.yaml"),
        "--model.backbone.kind", "weights", "--model.backbone.weights", str(stage1_run),
        "--model.backbone.arch", "vit_test", "--data.img_size", "32",
        "--data.root", str(root), "--data.manifest_dir", str(tmp_path / "manifests"),
        "--data.batch_size", "8", "--data.num_workers", "0", "--data.pin_memory", "false",
        "--trainer.max_epochs", "1", "--trainer.precision", "32", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(run_dir), "--wandb", "disabled",
    ])
    assert cli.model.monitor == ("val/dice", "max") and cli.model.hparams.benchmark == name
    metrics = pd.read_csv(run_dir / "metrics.csv")
    for key in ("test/dice", "test/iou", "val/dice"):
        assert key in metrics.columns and metrics[key].notna().any(), key
    row = pd.read_csv(run_dir / "results.csv").iloc[0]
    assert row["benchmark"] == name and row["metric_value"] == pytest.approx(row["test/iou"])
    assert 0.0 <= row["test/dice"] <= 1.0


def test_backbone_stays_unchanged_and_in_eval_mode(stage1_run, tmp_path):
    import pytorch_lightning as pl

    from pacx.data.seg_dataset import SegmentationDataModule
    from pacx.lit.segment import SegmentationModule

    raw = SEG_RELEASE_WRITERS["qata"](tmp_path / "raw", 0)
    run_converter("qata", raw, tmp_path / "manifests")
    dm = SegmentationDataModule("qata", str(_image_root(raw, tmp_path / "manifests")),
                                str(tmp_path / "manifests"), batch_size=4, num_workers=0, img_size=32,
                                pin_memory=False)
    module = SegmentationModule("qata", BackboneConfig("mae", str(stage1_run), "vit_test", 32),
                                warmup_epochs=0)
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    decoder_before = [p.detach().clone() for p in module.decoder.parameters()]
    modes: list[bool] = []
    backbone = module.backbone  # forward_features, not __call__: hook the patch embedding, read every mode
    backbone.patch_embed.register_forward_pre_hook(
        lambda m, args: modes.append(any(sub.training for sub in backbone.modules())))
    pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
               default_root_dir=tmp_path).fit(module, datamodule=dm)
    assert len(modes) > 2 and not any(modes)
    assert all(torch.equal(before[k], v) for k, v in module.backbone.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(decoder_before, module.decoder.parameters(),
                                                     strict=True))
    assert all(not p.requires_grad for p in module.backbone.parameters())


def _seg_split(n: int = 9):
    """(a tiny SegmentationModule, ``n`` (image, mask) pairs with masks of different sizes), the same in every
    process."""
    from pacx.lit.segment import SegmentationModule

    torch.manual_seed(0)
    module = SegmentationModule("covidqu_seg", BackboneConfig("random", None, "vit_test", 32),
                                decoder_width=8)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 32, 32, generator=g)
    masks = torch.zeros(n, 1, 32, 32)
    for i in range(n):  # a square of side 4 + 3i at a random corner
        side, (y, x) = 4 + 3 * i, torch.randint(0, 4, (2,), generator=g).tolist()
        masks[i, :, y:y + side, x:x + side] = 1.0
    return module, torch.utils.data.TensorDataset(images, masks)


def _seg_test(devices: int, global_batch: int, out) -> dict[str, float]:
    """``trainer.test`` of :func:`_seg_split` through Stage 3's evaluation loader (each row once); the logged
    test metrics."""
    import pytorch_lightning as pl

    from pacx.data.common import eval_loader, per_device_batch_size

    module, data = _seg_split()

    class Split(pl.LightningDataModule):
        def test_dataloader(self):
            return eval_loader(data, per_device_batch_size(global_batch, self.trainer), self.trainer)

    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=out)
    trainer.test(module, datamodule=Split(), verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_epoch_metrics_are_row_weighted_means_of_the_batch_scores(tmp_path):
    """docs/datasets.md#segmentation: each batch's Dice, IoU (hard counts over the batch), BCE and soft Dice,
    then the mean over batches weighted by their rows (batches of 4, 4 and 1 here), written out in numpy."""
    logged = _seg_test(1, 4, tmp_path)
    module, data = _seg_split()
    module.eval()
    images, masks = data.tensors
    scores, rows = [], []
    for start in (0, 4, 8):
        with torch.no_grad():
            x = module(images[start:start + 4]).double().numpy()
        y = masks[start:start + 4].double().numpy()
        p, hard = 1 / (1 + np.exp(-x)), (x > 0).astype(np.float64)
        inter = (hard * y).sum()
        bce = np.mean(np.logaddexp(0, x) - y * x)
        soft = 1 - (2 * (p * y).sum() + 1e-6) / (p.sum() + y.sum() + 1e-6)
        scores.append({"dice": (2 * inter + 1e-6) / (hard.sum() + y.sum() + 1e-6),
                       "iou": (inter + 1e-6) / (hard.sum() + y.sum() - inter + 1e-6),
                       "bce": bce, "soft_dice": soft, "loss": bce + soft})
        rows.append(len(y))
    assert rows == [4, 4, 1]
    for key in ("dice", "iou", "bce", "soft_dice", "loss"):
        expected = sum(r * s[key] for r, s in zip(rows, scores, strict=True)) / sum(rows)
        assert logged[f"test/{key}"] == pytest.approx(expected, rel=1e-5), key
    assert len({round(s["dice"], 6) for s in scores}) == 3  # the weighting matters here


def _ddp_seg_test_worker() -> None:
    """One rank of a 2-process CPU (gloo) DDP test of :func:`_seg_test` at a global batch of 4; rank zero
    writes the logged metrics to PACX_TEST_OUT."""
    import json
    import os

    torch.set_num_threads(1)
    logged = _seg_test(2, 4, os.environ["PACX_TEST_OUT"])
    if os.environ["RANK"] == "0":
        (Path(os.environ["PACX_TEST_OUT"]) / "logged.json").write_text(json.dumps(logged))


def test_ddp_dice_and_iou_are_those_of_the_global_batches(tmp_path):
    """Dice and IoU are per batch (the configured global batch), then averaged weighted by batch size. 9 test
    pairs at a global batch of 4 on 2 real gloo processes: the global batches are the one-process batches
    (rows 0-3, 4-7, 8), so test/dice, test/iou and the loss equal the one-process values (IoU 0.12546), not
    those of each rank's half-batches (0.12454; 0.14011 before the epoch means counted 9 rows as 8)."""
    import json

    from tests.helpers import run_ranks

    run_ranks("tests.lit.test_segment:_ddp_seg_test_worker", timeout=300,
              env={"PACX_TEST_OUT": str(tmp_path)})
    ddp = json.loads((tmp_path / "logged.json").read_text())
    one = _seg_test(1, 4, tmp_path / "one")
    assert 0.0 < one["test/dice"] < 1.0 and 0.0 < one["test/iou"] < 1.0
    for key in ("test/loss", "test/bce", "test/soft_dice", "test/dice", "test/iou"):
        assert ddp[key] == pytest.approx(one[key], rel=1e-5), key


def _seg_first_step_grads(devices: int, out) -> dict[str, torch.Tensor]:
    """The decoder's gradient at the first optimizer step (after DDP's averaging) of a fit of
    :func:`_seg_split` on 8 pairs at a global batch of 4 through Stage 3's training loader."""
    import pytorch_lightning as pl

    from pacx.data.common import per_device_batch_size
    from pacx.data.resumable import train_loader

    module, data = _seg_split(8)
    grads: dict[str, torch.Tensor] = {}

    class Split(pl.LightningDataModule):
        def train_dataloader(self):
            return train_loader(data, per_device_batch_size(4, self.trainer), self.trainer, drop_last=False,
                                seed=2)

    class FirstStep(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.update({n: p.grad.clone() for n, p in pl_module.decoder.named_parameters()})

    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
                         callbacks=[FirstStep()])
    trainer.fit(module, datamodule=Split())
    return grads


def _ddp_seg_grads_worker() -> None:
    import os

    torch.set_num_threads(1)
    grads = _seg_first_step_grads(2, os.environ["PACX_TEST_OUT"])
    torch.save(grads, Path(os.environ["PACX_TEST_OUT"]) / f"grads{os.environ['RANK']}.pt")


def test_ddp_training_step_takes_the_global_batch_gradient(tmp_path):
    """The soft Dice is a statistic of the whole batch: 2 real gloo processes at 2 pairs each take the
    gradient of one process at the global batch of 4 (the ranks' soft Dice reads the sums of both,
    differentiably), not the mean of two half-batch soft Dices."""
    from tests.helpers import run_ranks

    run_ranks("tests.lit.test_segment:_ddp_seg_grads_worker", timeout=300,
              env={"PACX_TEST_OUT": str(tmp_path)})
    one = _seg_first_step_grads(1, tmp_path / "one")
    assert one and max(float(g.abs().max()) for g in one.values()) > 0
    for rank in range(2):
        ddp = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)
        assert ddp.keys() == one.keys()
        for name, g in one.items():
            torch.testing.assert_close(ddp[name], g, rtol=1e-4, atol=1e-7, msg=name)


def test_segmentation_config_holds_the_reference_per_epoch_warmup_and_cosine():
    """docs/datasets.md#stage-3-settings: the segmentation config steps the authors' schedule per epoch:
    (e + 1) / 5 for the 5 warmup epochs, then a cosine over the remaining 45, each held for its epoch."""
    import math

    import yaml

    from tests.helpers import lrs_per_step

    config = Path(__file__).resolve().parents[2] / "configs/stage3/segmentation.yaml"
    base = yaml.safe_load(config.read_text())
    assert base["model"]["init_args"]["lr_interval"] == "epoch"
    spe, epochs, lr = 2, 50, 1e-4
    module = SegmentationModule("cxlseg", BackboneConfig("random", None, "vit_test", 32), decoder_width=16,
                                lr=lr, lr_interval="epoch")
    got = lrs_per_step(module, spe, epochs)

    def reference(e: int) -> float:
        return (e + 1) / 5 if e < 5 else 0.5 * (1 + math.cos(math.pi * (e - 5) / 45))

    assert got == pytest.approx([lr * reference(s // spe) for s in range(spe * epochs)], rel=1e-12, abs=1e-15)
