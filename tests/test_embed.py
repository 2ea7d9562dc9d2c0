"""``python -m pacx.embed``: order, Stage 3 pixels and features, both output formats, resume, mismatches,
unreadable images, manifest input, and the README command."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import pacx.embed as embed
import pacx.embed_store as embed_store
from pacx.models.vit import ViTEncoder, vit_config
from pacx.share import export_encoder

REPO = Path(__file__).resolve().parents[1]
IMG_SIZE = 32
# relative path -> writer; sorted order is the order of this dict's keys
IMAGES = ("a/gray.png", "a/sixteen_bit.png", "b/colour.jpg", "c/deep/upper.PNG", "plain.tif")


def random_export(path: Path, seed: int) -> Path:
    """A random ``vit_test`` encoder at 32 px, exported as pacx safetensors (the path of a real export)."""
    torch.manual_seed(seed)
    encoder = ViTEncoder(vit_config("vit_test", IMG_SIZE))
    ckpt = path.with_suffix(".ckpt")
    torch.save({"pacx": {"stage": "stage1_mae", "vit_config": encoder.cfg.to_dict()},
                "state_dict": {f"model.{k}": v for k, v in encoder.state_dict().items()}}, ckpt)
    return export_encoder(ckpt, path)


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    return random_export(tmp_path_factory.mktemp("enc") / "encoder.safetensors", seed=0)


def write_images(root: Path) -> Path:
    """8-bit gray PNG, 16-bit PNG, RGB JPEG, an upper-case suffix and a TIFF, of different sizes; plus a
    file that is not an image."""
    rng = np.random.default_rng(0)
    for rel in IMAGES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (40, 36), dtype=np.uint8)).save(root / IMAGES[0])
    sixteen = Image.fromarray(rng.integers(0, 4096, (48, 40), dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    sixteen.save(root / IMAGES[1])
    Image.fromarray(rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)).save(root / IMAGES[2], quality=90)
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(root / IMAGES[3], format="PNG")
    Image.fromarray(rng.integers(0, 256, (50, 20), dtype=np.uint8)).save(root / IMAGES[4])
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def xrays(tmp_path) -> Path:
    return write_images(tmp_path / "xrays")


def run(encoder: Path, images: Path, out: Path, *extra: str) -> int:
    return embed.main([str(encoder), str(images), "--out", str(out), "--device", "cpu", "--num-workers", "0",
                       "--batch-size", "2", "--no-progress", *extra])


def stage3_features(weights: Path, images: Path, rel_paths: list[str]) -> np.ndarray:
    """The Stage 3 evaluation path: the benchmark data module's predict images (``resize_eval``) through the
    backbone Stage 3 builds, by the linear probe's feature extractor."""
    from pacx.data.feature_cache import extract_features
    from pacx.data.stage3 import BenchmarkDataModule
    from pacx.models.backbones import BackboneConfig, build_backbone

    csv = images / "stage3.csv"
    pd.DataFrame({"path": rel_paths}).to_csv(csv, index=False)
    dm = BenchmarkDataModule("tb", img_size=IMG_SIZE, batch_size=3, num_workers=0, pin_memory=False,
                             manifest=str(csv), predict_path_column="path")
    dataset = dm.predict_dataloader().dataset
    backbone = build_backbone(BackboneConfig(kind="pacx", weights=str(weights), img_size=IMG_SIZE))
    return extract_features(backbone, dataset, 3, torch.device("cpu")).numpy()


def test_folder_to_npy_matches_stage3_features(encoder_file, xrays, tmp_path, capsys):
    out = tmp_path / "emb.npy"
    assert run(encoder_file, xrays, out) == 0
    assert capsys.readouterr().out.strip() == str(out)
    emb = np.load(out)
    paths = (tmp_path / "emb.npy.paths.txt").read_text().splitlines()
    assert paths == sorted(IMAGES) and emb.shape == (len(IMAGES), 32) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, stage3_features(encoder_file, xrays, paths), atol=1e-5, rtol=0)
    assert not (tmp_path / "emb.npy.shards").exists() and not (tmp_path / "emb.npy.unreadable.csv").exists()
    # Stage 3 on GPUs
    assert run(encoder_file, xrays, tmp_path / "bf16.npy", "--precision", "bf16-mixed") == 0
    bf16 = np.load(tmp_path / "bf16.npy")
    assert not np.array_equal(bf16, emb) and np.allclose(bf16, emb, atol=0.1)


def test_parquet_agrees_with_npy(encoder_file, xrays, tmp_path):
    assert run(encoder_file, xrays, tmp_path / "emb.npy", "--shard-size", "2") == 0
    assert run(encoder_file, xrays, tmp_path / "emb.parquet", "--shard-size", "3") == 0
    df = pd.read_parquet(tmp_path / "emb.parquet")
    assert list(df.columns) == ["path", "embedding"]
    assert df["path"].tolist() == (tmp_path / "emb.npy.paths.txt").read_text().splitlines()
    np.testing.assert_array_equal(np.stack(df["embedding"]), np.load(tmp_path / "emb.npy"))
    import pyarrow.parquet as pq

    meta = json.loads(pq.read_schema(tmp_path / "emb.parquet").metadata[b"pacx_embed"])
    assert meta["n_rows"] == len(IMAGES) and meta["img_size"] == IMG_SIZE and meta["embed_dim"] == 32


def counting_encoder(monkeypatch) -> list[int]:
    """Make ``pacx.embed`` count the images each encoder call receives."""
    seen: list[int] = []
    real = embed.load_encoder

    def load(*args, **kwargs):
        model = real(*args, **kwargs)
        model.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
        return model

    monkeypatch.setattr(embed, "load_encoder", load)
    return seen


def test_resume_computes_only_the_missing_shards(encoder_file, xrays, tmp_path, monkeypatch):
    out = tmp_path / "emb.npy"
    shards = tmp_path / "emb.npy.shards"
    real_write = embed.ShardStore.write

    def write_then_die(self, shard, feats, failed):
        if shard == 2:
            raise KeyboardInterrupt("killed while shard 2 was being written")
        real_write(self, shard, feats, failed)

    with monkeypatch.context() as m:
        m.setattr(embed.ShardStore, "write", write_then_die)
        with pytest.raises(KeyboardInterrupt):
            run(encoder_file, xrays, out, "--shard-size", "2")
    assert not out.exists()
    assert sorted(p.name for p in shards.glob("shard-*.npy")) == ["shard-00000.npy", "shard-00001.npy"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*")}

    seen = counting_encoder(monkeypatch)
    assert run(encoder_file, xrays, out, "--shard-size", "2", "--keep-shards") == 0
    assert sum(seen) == 1  # only the image of shard 2 (5 images, shards of 2)
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-0000[01].*")} == mtimes
    fresh = tmp_path / "fresh.npy"
    assert run(encoder_file, xrays, fresh) == 0
    np.testing.assert_array_equal(np.load(out), np.load(fresh))


def test_overwrite_killed_before_the_rename_leaves_no_array_beside_other_paths(encoder_file, xrays, tmp_path,
                                                                               monkeypatch):
    """``.npy`` and ``.paths.txt`` are two files: a run killed between their renames must not leave the old
    array beside the new path list (row i would name another image)."""
    out = tmp_path / "emb.npy"
    assert run(encoder_file, xrays, out) == 0
    Image.new("L", (8, 8)).save(xrays / "a/0_first.png")  # sorts first: every row moves down by one
    real_replace = embed_store.os.replace

    def killed_before_the_array(src, dst):
        if Path(dst) == out:
            raise KeyboardInterrupt("killed before the new array was renamed into place")
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(embed_store.os, "replace", killed_before_the_array)
        with pytest.raises(KeyboardInterrupt):
            run(encoder_file, xrays, out, "--overwrite")
    paths = (tmp_path / "emb.npy.paths.txt").read_text().splitlines()
    assert paths == sorted([*IMAGES, "a/0_first.png"])
    assert not out.exists() or len(np.load(out)) == len(paths)
    assert run(encoder_file, xrays, out, "--overwrite") == 0
    assert np.load(out).shape == (len(paths), 32)


def test_a_shard_folder_whose_removal_was_interrupted_is_discarded(encoder_file, xrays, tmp_path, caplog):
    """The shard folder is removed with ``shutil.rmtree`` (after the merge, or by ``--overwrite``); killed
    halfway, it may have lost ``embed.json`` but not all shards. Such shards cannot be checked, so a rerun
    discards them and recomputes; a folder holding anything else is still refused."""
    out = tmp_path / "emb.npy"
    shards = tmp_path / "emb.npy.shards"
    assert run(encoder_file, xrays, out, "--shard-size", "2", "--keep-shards") == 0
    expected = np.load(out)
    for name in ("embed.json", "shard-00000.npy", "shard-00000.json"):  # rmtree's first victims
        (shards / name).unlink()
    (shards / ".shard-00001.npy.tmp123").write_bytes(b"partial")  # a shard being written when killed
    assert run(encoder_file, xrays, out, "--shard-size", "2", "--overwrite") == 0
    np.testing.assert_array_equal(np.load(out), expected)
    assert not shards.exists()
    shards.mkdir()
    (shards / "shard-00001.npy").write_bytes(b"")
    (shards / "notes.txt").write_text("mine")
    caplog.clear()
    assert run(encoder_file, xrays, out, "--overwrite") == 1
    assert "not a pacx.embed shard folder" in caplog.text and (shards / "notes.txt").exists()


@pytest.mark.bad_input
def test_rerun_with_other_inputs_is_an_error_naming_the_mismatch(encoder_file, xrays, tmp_path, caplog):
    """pacx.embed resumed with another encoder, shard size, precision or image list → EmbedError naming the
    field with its old and new value (``--overwrite`` starts again)."""
    out = tmp_path / "emb.npy"
    assert run(encoder_file, xrays, out, "--keep-shards", "--shard-size", "2") == 0
    out.unlink()
    other = random_export(tmp_path / "other.safetensors", seed=1)
    assert run(other, xrays, out, "--shard-size", "2") == 1
    assert ("encoder_sha256" in caplog.text and "--overwrite" in caplog.text
            and "images_sha256" not in caplog.text)
    caplog.clear()
    assert run(encoder_file, xrays, out, "--shard-size", "3") == 1
    assert "shard_size: recorded 2, now 3" in caplog.text
    caplog.clear()
    assert run(encoder_file, xrays, out, "--shard-size", "2", "--precision", "bf16-mixed") == 1
    assert "precision: recorded '32', now 'bf16-mixed'" in caplog.text
    caplog.clear()
    Image.new("L", (8, 8)).save(xrays / "new.png")
    assert run(encoder_file, xrays, out, "--shard-size", "2") == 1
    assert "n_images: recorded 5, now 6" in caplog.text and "images_sha256" in caplog.text
    assert run(encoder_file, xrays, out, "--shard-size", "2", "--overwrite") == 0
    assert np.load(out).shape == (6, 32)
    caplog.clear()
    assert run(encoder_file, xrays, out) == 1  # an existing output is kept unless --overwrite
    assert "exists" in caplog.text


@pytest.mark.bad_input
def test_unreadable_images_fail_by_name_then_skip_lists_them(encoder_file, xrays, tmp_path, caplog,
                                                             monkeypatch):
    """pacx.embed on a folder with an undecodable image → exit 1 naming the file, no output written
    (``--skip-unreadable`` lists it in ``<out>.unreadable.csv`` instead)."""
    (xrays / "a/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "emb.parquet"
    assert run(encoder_file, xrays, out, "--shard-size", "2") == 1
    assert not out.exists()
    assert "1 of 6 images could not be read" in caplog.text and "a/broken.png" in caplog.text
    assert "--skip-unreadable" in caplog.text

    seen = counting_encoder(monkeypatch)
    caplog.clear()
    assert run(encoder_file, xrays, out, "--shard-size", "2", "--skip-unreadable") == 0
    assert seen == []  # the shards of the first run are reused: only a merge
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert any("1 of 6 images could not be read" in r.getMessage() for r in warnings)
    df = pd.read_parquet(out)
    assert df["path"].tolist() == sorted(IMAGES)
    listed = pd.read_csv(tmp_path / "emb.parquet.unreadable.csv")
    assert list(listed.columns) == ["path", "reason"] and listed["path"].tolist() == ["a/broken.png"]
    assert "ImageDecodeError" in listed["reason"].iat[0]

    caplog.clear()  # --overwrite without --skip-unreadable fails again, saying the output is the old one
    assert run(encoder_file, xrays, out, "--shard-size", "2", "--overwrite") == 1
    assert f"No output was written ({out} is an earlier run's, left as it was)" in caplog.text


@pytest.mark.bad_input
def test_a_file_name_that_is_not_utf8_is_named(encoder_file, xrays, tmp_path, caplog):
    """pacx.embed on a folder holding a file whose name is not UTF-8 (Latin-1 ``café.png``) → exit 1 before
    any work, naming the file (the outputs store paths as UTF-8 text)."""
    name = b"a/caf\xe9.png".decode("utf-8", "surrogateescape")  # how Python lists such a name
    Image.new("L", (8, 8)).save(xrays / name)
    assert run(encoder_file, xrays, tmp_path / "emb.npy") == 1
    assert "1 file name(s) are not UTF-8" in caplog.text and repr(name) in caplog.text
    assert not (tmp_path / "emb.npy.shards").exists()


def test_manifest_csv_in_row_order_with_root_and_absolute_paths(encoder_file, xrays, tmp_path):
    assert run(encoder_file, xrays, tmp_path / "folder.npy") == 0
    by_path = dict(zip(sorted(IMAGES), np.load(tmp_path / "folder.npy")))
    rows = [IMAGES[4], str(xrays / IMAGES[2]), IMAGES[0], "missing.png", IMAGES[1]]
    csv = tmp_path / "lists" / "images.csv"
    csv.parent.mkdir()
    pd.DataFrame({"Path": rows, "Label": [0, 1, 0, 1, 1]}).to_csv(csv, index=False)  # a converter's column
    out = tmp_path / "csv.npy"
    assert run(encoder_file, csv, out, "--root", str(xrays), "--skip-unreadable") == 0
    kept = (tmp_path / "csv.npy.paths.txt").read_text().splitlines()
    assert kept == [rows[0], rows[1], rows[2], rows[4]]
    expected = np.stack([by_path[IMAGES[4]], by_path[IMAGES[2]], by_path[IMAGES[0]], by_path[IMAGES[1]]])
    np.testing.assert_array_equal(np.load(out), expected)
    listed = pd.read_csv(tmp_path / "csv.npy.unreadable.csv")
    assert listed["path"].tolist() == ["missing.png"] and "FileNotFoundError" in listed["reason"].iat[0]
    with pytest.raises(embed.ManifestError, match="no column 'file'"):
        embed.list_images(csv, path_column="file")


def readme_embed_commands() -> list[str]:
    """The ``python -m pacx.embed`` lines of the README's "Embed a folder of X-rays" section."""
    text = (REPO / "README.md").read_text()
    section = re.search(r"^#+ Embed a folder of X-rays\n(.*?)(?=^#)", text, re.S | re.M)
    assert section, "README has an 'Embed a folder of X-rays' section"
    blocks = re.findall(r"```bash\n(.*?)```", section.group(1), re.S)
    lines = " ".join(blocks).replace("\\\n", " ").splitlines()
    return [line.split("#")[0].strip() for line in lines if line.strip().startswith("python -m pacx.embed")]


def test_readme_commands_run(encoder_file, tmp_path, monkeypatch, capsys):
    """The README's commands, run as written in a folder holding ``mae_encoder.safetensors``,
    a folder of X-rays ``xrays/`` and their manifest ``xrays.csv`` (the README block needs
    user data, so it is not marked for tests/test_docs.py, which has none). The first runs as
    a process, the others in this one (same argv)."""
    first, *others = readme_embed_commands()
    assert others
    shutil.copy(encoder_file, tmp_path / "mae_encoder.safetensors")
    write_images(tmp_path / "xrays")
    pd.DataFrame({"path": [f"xrays/{p}" for p in IMAGES]}).to_csv(tmp_path / "xrays.csv", index=False)
    result = subprocess.run([sys.executable, *shlex.split(first)[1:]], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "emb.parquet"
    monkeypatch.chdir(tmp_path)
    for command in others:
        argv = shlex.split(command)
        assert argv[:3] == ["python", "-m", "pacx.embed"]
        assert embed.main(argv[3:]) == 0
    folder, csv = pd.read_parquet(tmp_path / "emb.parquet"), np.load(tmp_path / "emb.npy")
    rows = [sorted(IMAGES).index(p) for p in IMAGES]
    np.testing.assert_array_equal(np.stack(folder["embedding"])[rows], csv)
