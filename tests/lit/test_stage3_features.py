"""Cached-feature linear probing, embedding export (``predict``) and the
low-data seed, through Stage3_eval.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import pacx
from pacx.data.feature_cache import (
    FeatureCache,
    FeatureDataset,
    FlipFeatureDataset,
    cached_features,
    images_fingerprint,
)
from pacx.data.registry import BENCHMARKS
from pacx.data.transforms import resize_eval
from pacx.weights.checkpoint import safe_torch_load
from tests.helpers import gloo_rank, run_ranks
from tests.lit.test_classify import stage3_args


def _test_images(tb) -> tuple[Path, list[str]]:
    """The image root and relative paths of the tb test split."""
    raw, manifests = tb
    spec = BENCHMARKS["tb"]
    df = pd.read_csv(manifests / spec.manifest_files["test"])
    return raw / spec.image_dirs["test"], df[spec.path_column].astype(str).tolist()


def _fit(tb, run_dir: Path, weights: Path, *extra: str):
    from Stage3_eval import main

    raw, manifests = tb
    return main(stage3_args("tb", raw, manifests, run_dir, weights, "--seed_everything", "7", *extra))


def _head(run_dir: Path) -> dict[str, torch.Tensor]:
    state = safe_torch_load(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("head.")}


def test_cached_and_per_epoch_probes_give_the_same_head(tb, stage1_run, tmp_path):
    """One epoch, same seed, no augmentation: the head trained on cached features equals the head trained
    with a backbone forward per batch (to 1e-5), and so do the test metrics."""
    cache_dir = tmp_path / "cache"
    per_epoch = _fit(tb, tmp_path / "per_epoch", stage1_run, "--data.train_augment", "false",
                     "--model.feature_cache", "false")
    cached = _fit(tb, tmp_path / "cached", stage1_run, "--data.train_augment", "false",
                  "--model.feature_cache_dir", str(cache_dir))
    assert not per_epoch.model.features_served and cached.model.features_served
    a, b = _head(tmp_path / "per_epoch"), _head(tmp_path / "cached")
    assert set(a) == {"head.weight", "head.bias"}
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    ra = pd.read_csv(tmp_path / "per_epoch" / "results.csv").iloc[0]
    rb = pd.read_csv(tmp_path / "cached" / "results.csv").iloc[0]
    assert not ra["feature_cache"] and rb["feature_cache"]
    assert rb["metric_value"] == pytest.approx(ra["metric_value"], abs=1e-5)
    # one per split
    assert len(list(cache_dir.glob("*.npy"))) == 3 and len(list(cache_dir.glob("*.json"))) == 3


def test_flip_cache_and_per_epoch_probes_train_the_same_head(tb, stage1_run, tmp_path):
    """Two epochs with the train flip: the head trained on the flip-aware cache equals
    the head trained with a backbone forward per batch of flipped images (to 1e-5),
    because both draw every sample's flip from the same seeded stream; the plain cache
    (no flip) trains another head. Results rows say which runs saw the flip."""
    epochs = ("--trainer.max_epochs", "2")
    per_epoch = _fit(tb, tmp_path / "per_epoch", stage1_run, "--model.feature_cache", "false", *epochs)
    flip = _fit(tb, tmp_path / "flip", stage1_run, "--model.feature_cache", "flip", *epochs,
                "--model.feature_cache_dir", str(tmp_path / "cache"))
    plain = _fit(tb, tmp_path / "plain", stage1_run, "--model.feature_cache", "plain", *epochs,
                 "--model.feature_cache_dir", str(tmp_path / "cache"))
    assert isinstance(flip.datamodule.datasets["train"], FlipFeatureDataset)
    assert type(plain.datamodule.datasets["train"]) is FeatureDataset and not per_epoch.model.features_served
    a, b, c = (_head(tmp_path / name) for name in ("per_epoch", "flip", "plain"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0)
    assert max((c[k] - a[k]).abs().max().item() for k in a) > 1e-4  # the flips mattered
    rows = {name: pd.read_csv(tmp_path / name / "results.csv").iloc[0]
            for name in ("per_epoch", "flip", "plain")}
    assert [bool(rows[n]["train_flip"]) for n in rows] == [True, True, False]
    assert [bool(rows[n]["feature_cache"]) for n in rows] == [False, True, True]
    records = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*.json")]
    pair = [r for r in records if r["flip_pair"]]
    assert len(records) == 4 and len(pair) == 1 and pair[0]["split"] == "train" and pair[0]["dim"] == 64


def test_feature_cache_values_and_the_true_alias(stage1_run):
    """flip (default) | plain | false; ``true`` (older configs) is the default, flip-aware cache."""
    from pacx.lit.classify import ClassificationModule
    from pacx.models.backbones import BackboneConfig

    cfg = BackboneConfig("weights", str(stage1_run), "vit_test", 32)
    modes = {str(v): ClassificationModule("tb", cfg, feature_cache=v).cache_mode
             for v in ("flip", "plain", True, False)}
    assert modes == {"flip": "flip", "plain": "plain", "True": "flip", "False": None}
    assert ClassificationModule("tb", cfg).cache_mode == "flip"
    # the backbone trains: no cache
    assert ClassificationModule("tb", cfg, mode="finetune").cache_mode is None
    with pytest.raises(ValueError, match=r"feature_cache 'flop' not in flip \| plain \| true \| false"):
        ClassificationModule("tb", cfg, feature_cache="flop")


def test_flip_features_follow_the_image_paths_draws(tb, stage1_run):
    """Seeded per sample as in training, the flip-aware dataset returns the flipped features exactly where the
    image transform flips the image."""
    from pacx.data.resumable import SeededDataset, derive_seed
    from pacx.data.stage3 import BenchmarkDataModule

    raw, manifests = tb
    dm = BenchmarkDataModule("tb", str(raw), str(manifests), batch_size=4, num_workers=0, img_size=32)
    images, plain = dm.build_dataset("train"), dm.build_dataset("train", augment=False)
    n = len(images)
    pairs = torch.cat([torch.zeros(n, 1), torch.ones(n, 1)], dim=1)  # feature 0 = as is, 1 = flipped
    features = SeededDataset(FlipFeatureDataset(pairs, plain.labels, 0.5), seed=3)
    flips = []
    for epoch in range(2):
        for i in range(n):
            key = (i, derive_seed(3, 0, epoch, i))
            shown = SeededDataset(images, seed=3)[key][0]
            flipped = torch.equal(shown, plain[i][0].flip(-1)) and not torch.equal(shown, plain[i][0])
            flips.append(flipped)
            assert features[key][0].item() == float(flipped)
    assert 0 < sum(flips) < len(flips)
    # the batched fetch the training loader uses draws the same flips
    flip_ds = FlipFeatureDataset(pairs, plain.labels, 0.5)
    for epoch in range(2):
        seeds = [derive_seed(3, 0, epoch, i) for i in range(n)]
        x, y = flip_ds.seeded_batch(list(range(n)), seeds)
        assert x[:, 0].tolist() == [float(f) for f in flips[epoch * n:(epoch + 1) * n]]
        assert torch.equal(y, plain.labels)


def test_feature_cache_is_reused_and_keyed_by_weights_and_images(tb, stage1_run, tmp_path, monkeypatch):
    raw, manifests = tb
    cache_dir = tmp_path / "cache"
    _fit(tb, tmp_path / "first", stage1_run, "--model.feature_cache_dir", str(cache_dir))
    files = {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("*.npy")}
    record = json.loads(next(cache_dir.glob("*.json")).read_text())
    assert record["backbone_weights"] == str(stage1_run) and record["precision"] == "32-true"

    from pacx.lit import classify

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were recomputed although cached")

    monkeypatch.setattr(classify, "extract_features", no_extraction)
    _fit(tb, tmp_path / "second", stage1_run, "--model.feature_cache_dir", str(cache_dir))
    assert {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("*.npy")} == files
    monkeypatch.undo()

    # another backbone (random init) gives new keys for every split
    _fit(tb, tmp_path / "random", stage1_run, "--model.feature_cache_dir", str(cache_dir),
         "--model.backbone.kind", "random", "--model.backbone.weights", "null")
    assert len(list(cache_dir.glob("*.npy"))) == 6

    # a touched image changes its split's key
    root, ds_paths = _test_images(tb)
    before = images_fingerprint(root, ds_paths, resize_eval(32))
    img = root / ds_paths[0]
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    assert images_fingerprint(root, ds_paths, resize_eval(32)) != before
    assert images_fingerprint(root, ds_paths, resize_eval(48)) != images_fingerprint(root, ds_paths,
                                                                                     resize_eval(32))


def test_feature_cache_key_covers_the_encoder_architecture(tb, stage1_run, tmp_path):
    """The same weights under another architecture (LayerNorm eps: the file's own vs a forced ``arch``) give
    other features, so they must not share cache entries: every split's served features equal the run's own
    backbone applied to its images."""
    from dataclasses import replace

    from pacx.data.images import open_image
    from pacx.weights.formats import export_metadata, read_encoder_weights, write_export

    weights = read_encoder_weights(stage1_run)
    export = write_export(weights.state, export_metadata(weights, replace(weights.cfg, norm_eps=0.5)),
                          tmp_path / "eps.safetensors")
    cache = ("--model.feature_cache_dir", str(tmp_path / "cache"))
    own = _fit(tb, tmp_path / "own", export, "--model.backbone.arch", "null", *cache)  # eps 0.5
    forced = _fit(tb, tmp_path / "forced", export, *cache)  # arch vit_test: eps 1e-6, same tensors
    assert own.model.backbone.cfg.norm_eps == 0.5 and forced.model.backbone.cfg.norm_eps == 1e-6
    root, paths = _test_images(tb)
    images = torch.stack([resize_eval(32)(open_image(root / p, "RGB")) for p in paths])
    for cli in (own, forced):
        with torch.no_grad():
            expected = cli.model.backbone.eval()(images)
        torch.testing.assert_close(cli.datamodule.datasets["test"].features, expected, atol=1e-5, rtol=0)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 6


def test_unusable_cache_file_is_recomputed_with_a_warning(tmp_path, caplog):
    cache = FeatureCache(tmp_path)
    cache.save("k", torch.ones(4, 3), {"split": "val"})
    cache.path("k").write_bytes(b"not an npy file")
    calls = []

    def compute(indices):
        calls.append(indices)
        return torch.full((4, 3), 2.0)

    out = cached_features(cache, "k", 4, 3, compute, {"split": "val"})
    assert calls == [None] and torch.equal(out, torch.full((4, 3), 2.0))
    assert "unreadable" in caplog.text and str(cache.path("k")) in caplog.text
    assert torch.equal(cache.load("k", 4, 3), out)
    assert cache.load("k", 5, 3) is None and "expected float32 (5, 3)" in caplog.text


def _worker_cached_features() -> None:
    """One rank of the 2-process gloo test below (started as a subprocess)."""
    import torch.distributed as dist

    seen = []

    def compute(indices):
        seen.extend(indices)
        return torch.tensor([[float(i), float(i) ** 2] for i in indices])

    with gloo_rank() as (rank, world):
        out = cached_features(FeatureCache(os.environ["CACHE_DIR"]), "k", 7, 2, compute, {"split": "train"},
                              rank, world, dist.barrier)
        np.save(Path(os.environ["CACHE_DIR"]) / f"out{rank}.npy", out.numpy())
        np.save(Path(os.environ["CACHE_DIR"]) / f"seen{rank}.npy", np.array(seen))


def test_cached_features_shard_over_two_real_processes(tmp_path):
    run_ranks("tests.lit.test_stage3_features:_worker_cached_features", env={"CACHE_DIR": str(tmp_path)})
    expected = np.array([[i, i**2] for i in range(7)], dtype=np.float32)
    for rank in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"out{rank}.npy"), expected)
        assert list(np.load(tmp_path / f"seen{rank}.npy")) == list(range(rank, 7, 2))  # each rank its share
    np.testing.assert_array_equal(np.load(tmp_path / "k.npy"), expected)
    assert not list(tmp_path.glob("k.part*"))  # parts merged and removed


def _predict_args(tb, run_dir: Path, weights: Path, manifest: Path, out: Path, *extra: str) -> list[str]:
    raw, manifests = tb
    args = stage3_args("tb", raw, manifests, run_dir, weights, "--data.manifest", str(manifest),
                       "--embeddings_out", str(out), *extra)
    args[0] = "predict"
    return args


def _reference_embeddings(weights: Path, image_paths: list[Path]) -> np.ndarray:
    from PIL import Image

    encoder = pacx.load_encoder(weights)
    x = torch.stack([resize_eval(32)(Image.open(p).convert("RGB")) for p in image_paths])
    with torch.no_grad():
        return encoder(x).numpy()


def test_predict_writes_embeddings_in_manifest_order(tb, stage1_run, tmp_path):
    from Stage3_eval import main

    root, rel = _test_images(tb)
    # a user manifest: absolute paths, shuffled order, another column name
    paths = [root / rel[i] for i in np.random.default_rng(3).permutation(len(rel))]
    manifest = tmp_path / "mine.csv"
    pd.DataFrame({"image": [str(p) for p in paths], "note": range(len(paths))}).to_csv(manifest, index=False)
    out = tmp_path / "emb.npy"
    main(_predict_args(tb, tmp_path / "run", stage1_run, manifest, out, "--data.predict_path_column", "image",
                       "--data.batch_size", "4"))
    emb = np.load(out)
    assert emb.shape == (len(paths), 32) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, _reference_embeddings(stage1_run, paths), atol=1e-5)
    listing = pd.read_csv(out.with_suffix(".csv"))
    assert (listing["image"].tolist() == [str(p) for p in paths]
            and listing["row"].tolist() == list(range(len(paths))))
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["rows"] == len(paths) and meta["dim"] == 32 and meta["backbone_weights"] == stage1_run.name


def test_predict_on_a_folder_sorts_images_and_matches_under_two_process_ddp(tb, stage1_run, tmp_path, repo):
    """A folder of images, predicted by 2 real gloo processes: same embeddings, in sorted path order."""
    raw, _ = tb
    folder = tmp_path / "images"
    sources = sorted(raw.rglob("*.png"))[:7]
    assert len(sources) == 7
    for i, src in enumerate(sources):
        (folder / f"g{i % 2}").mkdir(parents=True, exist_ok=True)
        (folder / f"g{i % 2}" / f"img{i}.png").write_bytes(src.read_bytes())
    out = tmp_path / "emb.npy"
    args = _predict_args(tb, tmp_path / "run", stage1_run, folder, out, "--data.batch_size", "2",
                         "--trainer.strategy", "ddp", "--trainer.devices", "2")
    res = subprocess.run([sys.executable, str(repo / "Stage3_eval.py"), *args], cwd=repo, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"})
    assert res.returncode == 0, res.stderr[-3000:]
    ordered = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    listing = pd.read_csv(out.with_suffix(".csv"))
    assert listing.iloc[:, 1].tolist() == ordered
    np.testing.assert_allclose(np.load(out), _reference_embeddings(stage1_run, [folder / p for p in ordered]),
                               atol=1e-5)
    assert not list(tmp_path.glob("emb.part*"))


def test_low_data_subset_follows_seed_everything(tb, stage1_run, tmp_path):
    runs = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        cli = _fit(tb, tmp_path / name, stage1_run, "--data.train_fraction", "0.2", "--seed_everything", seed,
                   "--model.feature_cache", "false")
        runs[name] = cli.datamodule.datasets["train"].paths
        row = pd.read_csv(tmp_path / name / "results.csv").iloc[0]
        assert row["subset_seed"] == int(seed) and row["seed"] == int(seed) and row["train_fraction"] == 0.2
    assert runs["a"] == runs["b"] != runs["c"]


def test_frozen_backbone_is_left_out_of_checkpoints_and_checked_on_load(tb, stage1_run, tmp_path):
    from pacx.lit.classify import ClassificationModule
    from pacx.models.backbones import BackboneConfig
    from pacx.weights.checkpoint import CheckpointError

    _fit(tb, tmp_path / "run", stage1_run)
    ckpt = safe_torch_load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert set(ckpt["state_dict"]) == {"head.weight", "head.bias"}
    other = ClassificationModule("tb", BackboneConfig("random", None, "vit_test", 32))
    with pytest.raises(CheckpointError, match="frozen backbone with other weights"):
        other.on_load_checkpoint(ckpt)
    same = ClassificationModule("tb", BackboneConfig("weights", str(stage1_run), "vit_test", 32))
    same.on_load_checkpoint(ckpt)
    same.load_state_dict(ckpt["state_dict"])  # strict: the backbone keys were restored
    torch.testing.assert_close(same.head.weight, ckpt["state_dict"]["head.weight"])
    finetune = _fit(tb, tmp_path / "ft", stage1_run, "--model.mode", "finetune")
    state = safe_torch_load(tmp_path / "ft" / "checkpoints" / "last.ckpt")["state_dict"]
    assert set(finetune.model.state_dict()) == set(state)  # a trained backbone stays in


def test_ddp_test_counts_every_test_image_once(stage1_run, tmp_path, repo):
    """9 test images on 2 real gloo processes, where Lightning's default sampler would hand rank 1 a copy of
    image 0: the results row of the DDP ``test`` equals that of the one-process test of the checkpoint."""
    from pacx.data.prepare import run_converter
    from pacx.testing.benchmarks import write_tb
    from Stage3_eval import main

    raw = write_tb(tmp_path / "raw", 0, n=41)
    manifests = tmp_path / "manifests"
    run_converter("tb", raw, manifests)
    assert len(pd.read_csv(manifests / BENCHMARKS["tb"].manifest_files["test"])) == 9
    run = tmp_path / "run"
    args = stage3_args("tb", raw, manifests, run, stage1_run, "--seed_everything", "3",
                       "--model.feature_cache", "false")
    main(args)
    res = subprocess.run([sys.executable, str(repo / "Stage3_eval.py"), "test", *args[1:],
                          "--ckpt_path", "last", "--data.batch_size", "4", "--trainer.strategy", "ddp",
                          "--trainer.devices", "2"],
                         cwd=repo, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "WANDB_MODE": "disabled"})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = pd.read_csv(run / "results.csv")
    assert len(rows) == 2
    one, ddp = rows["metric_value"].tolist()
    assert 0.0 < one < 1.0 and ddp == pytest.approx(one, abs=1e-6)


def test_shard_sampler_gives_each_row_to_one_rank_once():
    from pacx.data.common import ShardSampler, eval_loader

    data = list(range(9))
    shards = [list(ShardSampler(data, 2, r)) for r in range(2)]
    assert shards == [[0, 2, 4, 6, 8], [1, 3, 5, 7]]
    assert [len(ShardSampler(data, 2, r)) for r in range(2)] == [5, 4]
    assert sorted(i for s in (list(ShardSampler(data, 4, r)) for r in range(4)) for i in s) == data

    class Trainer:
        world_size, global_rank = 2, 1

    batches = [b.tolist() for b in eval_loader(data, 3, Trainer())]
    assert batches == [[1, 3, 5], [7]]
    assert [b.tolist() for b in eval_loader(data, 4, None)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    with pytest.raises(ValueError, match="split of 1 rows cannot be spread over 2 devices"):
        eval_loader([0], 4, Trainer())
