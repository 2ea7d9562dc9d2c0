"""The extension recipes of docs/architecture.md, end to end, with everything new defined in this file only.

* **A benchmark** (docs/architecture.md#add-a-benchmark): ``toy``, one :class:`BenchmarkSpec` registered with
  ``register_benchmark``, one converter registered with ``register_converter`` that turns a folder-labelled
  raw release (PNGs the fixture writes) into ``{train,val,test}`` manifests, and a 4-line override stacked
  after ``configs/stage3/linear_probe.yaml``. ``scripts/prepare.py toy`` converts it and a 1-epoch linear
  probe through ``Stage3_eval.py`` fits, tests and appends a results row named ``toy``.
* **A backbone** (docs/architecture.md#add-a-backbone): a ViT size ``vit_toy`` in ``VIT_ARCHS`` and a backbone
  kind ``seeded`` in ``BACKBONES``, built by ``build_backbone`` and probed on ``toy`` through the same CLI.

Every registration is removed on teardown, so other tests never see them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pacx.data.converters.classification import split_two_step, write_manifests
from pacx.data.prepare import CONVERTERS, register_converter
from pacx.data.registry import BENCHMARKS, SPLITS, BenchmarkSpec, get_benchmark, register_benchmark
from pacx.models.backbones import BACKBONES, BackboneConfig, build_backbone
from pacx.models.vit import VIT_ARCHS, ViTEncoder, vit_config
from tests.helpers import REPO, load_script

N_PER_CLASS, RAW_SIZE, IMG_SIZE = 20, 40, 32
CLASSES = {"normal": 0, "abnormal": 1}  # raw folder -> label

# ------------------------------------------------------------------------------------------ the toy benchmark

TOY = BenchmarkSpec(
    name="toy", task="binary", labels=("abnormal",), path_column="Path", mask_column=None,
    image_dirs=dict.fromkeys(SPLITS, "images"), manifest_files={s: f"toy_{s}.csv" for s in SPLITS},
    metric="auroc", label_source="columns", in_paper=False,
    description="toy: folder-labelled synthetic PNGs, stratified 60/20/20 (tests/test_toy_benchmark.py)",
)

# The whole benchmark-specific Stage 3 config: stacked after configs/stage3/linear_probe.yaml.
TOY_OVERRIDE = """\
data:
  init_args:
    benchmark: toy
    batch_size: 8
"""


def prepare_toy(raw: Path, out: Path, seed: int = 42) -> dict:
    """``<raw>/images/<class>/*.png`` -> Path (relative to ``images/``) and 0/1 label, stratified 60/20/20."""
    spec = get_benchmark("toy")
    rows = [(f"{cls}/{f.name}", label) for cls, label in CLASSES.items()
            for f in sorted((raw / "images" / cls).glob("*.png"))]
    if not rows:
        raise FileNotFoundError(f"toy: no images/<class>/*.png under {raw}")
    df = pd.DataFrame(rows, columns=[spec.path_column, spec.labels[0]])
    return write_manifests(spec, split_two_step(df, 0.2, 0.25, int(seed), stratify=spec.labels[0]), out)


def write_toy_release(raw: Path) -> Path:
    """Grey PNGs in one folder per class; abnormal images carry a bright square, so the probe has signal."""
    rng = np.random.default_rng(0)
    for cls, label in CLASSES.items():
        (raw / "images" / cls).mkdir(parents=True)
        for i in range(N_PER_CLASS):
            pixels = rng.integers(40, 120, size=(RAW_SIZE, RAW_SIZE), dtype=np.uint8)
            if label:
                pixels[10:30, 10:30] = 230
            Image.fromarray(pixels, mode="L").save(raw / "images" / cls / f"{cls}_{i:03d}.png")
    return raw


@pytest.fixture(scope="module")
def toy():
    """``toy`` in the benchmark and converter registries for this module's tests only."""
    register_benchmark(TOY)
    register_converter("toy", task=TOY.task, metric=TOY.metric, description=TOY.description)(prepare_toy)
    yield TOY
    BENCHMARKS.pop("toy")
    CONVERTERS.pop("toy")


@pytest.fixture(scope="module")
def prepared(toy, tmp_path_factory) -> tuple[Path, Path]:
    """(image root, manifest dir) after ``scripts/prepare.py toy``."""
    base = tmp_path_factory.mktemp("toy")
    raw = write_toy_release(base / "raw")
    assert load_script("prepare").main(["toy", "--raw", str(raw), "--out", str(base / "manifests"),
                                        "--no-progress"]) == 0
    return raw, base / "manifests"


@pytest.fixture(scope="module")
def toy_override(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("configs") / "toy.yaml"
    path.write_text(TOY_OVERRIDE)
    return path


def probe_args(raw: Path, manifests: Path, override: Path, run_dir: Path, *backbone: str) -> list[str]:
    """1-epoch linear probe on CPU through the base config plus the toy override."""
    return [
        "fit", "--config", str(REPO / "configs/stage3/linear_probe.yaml"), "--config", str(override),
        *backbone, "--data.img_size", str(IMG_SIZE),
        "--data.root", str(raw), "--data.manifest_dir", str(manifests), "--data.num_workers", "0",
        "--data.pin_memory", "false", "--model.feature_cache_dir", str(run_dir.parent / "feature_cache"),
        "--trainer.max_epochs", "1", "--trainer.precision", "32", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(run_dir), "--wandb", "disabled",
    ]


def only_results_row(run_dir: Path) -> pd.Series:
    results = pd.read_csv(run_dir / "results.csv")
    assert len(results) == 1
    return results.iloc[0]


def test_register_benchmark_once(toy):
    assert get_benchmark("toy") is toy and "toy" in CONVERTERS
    with pytest.raises(KeyError, match="registered twice"):
        register_benchmark(toy)


def test_prepare_writes_the_manifests(toy, prepared, capsys):
    raw, manifests = prepared
    frames = {s: pd.read_csv(manifests / toy.manifest_files[s]) for s in SPLITS}
    assert sum(len(df) for df in frames.values()) == 2 * N_PER_CLASS
    paths = [p for df in frames.values() for p in df[toy.path_column]]
    assert len(set(paths)) == len(paths)  # the splits are disjoint
    for split, df in frames.items():
        assert list(df.columns) == [toy.path_column, *toy.label_columns]
        assert set(df["abnormal"]) == {0, 1}, split  # stratified: both classes in every split
        assert all((raw / toy.image_dirs[split] / p).is_file() for p in df[toy.path_column])
    assert (manifests / "prepare.json").is_file()
    load_script("prepare").main(["--list"])
    assert "toy" in capsys.readouterr().out


def test_linear_probe_writes_a_toy_results_row(toy, prepared, toy_override, tmp_path):
    from Stage3_eval import main

    raw, manifests = prepared
    run_dir = tmp_path / "toy_lp"
    cli = main(probe_args(raw, manifests, toy_override, run_dir, "--model.backbone.kind", "random",
                          "--model.backbone.arch", "vit_test"))
    assert cli.datamodule.spec is toy and cli.model.hparams.mode == "linear_probe"
    row = only_results_row(run_dir)
    assert row["benchmark"] == "toy" and row["backbone_kind"] == "random"
    assert math.isfinite(row["metric_value"]) and 0.0 <= row["metric_value"] <= 1.0


# ------------------------------------------------------------------------------------------ the toy backbone

TOY_ARCH = dict(embed_dim=24, depth=1, num_heads=2, patch_size=8)


def _seeded(cfg: BackboneConfig) -> ViTEncoder:
    """A new kind: a random encoder of ``arch`` drawn from a fixed seed, so every build is the same."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return ViTEncoder(vit_config(cfg.arch, cfg.img_size))


@pytest.fixture
def toy_backbone(monkeypatch):
    """``vit_toy`` in VIT_ARCHS and ``seeded`` in BACKBONES for one test (monkeypatch removes them)."""
    monkeypatch.setitem(VIT_ARCHS, "vit_toy", TOY_ARCH)
    monkeypatch.setitem(BACKBONES, "seeded", _seeded)


def test_new_arch_and_kind_build_through_the_registries(toy_backbone):
    cfg = BackboneConfig("seeded", None, "vit_toy", IMG_SIZE)
    first, second = build_backbone(cfg), build_backbone(cfg)
    assert first.embed_dim == 24 and len(first.blocks) == 1 and first.cfg.patch_size == 8
    x = torch.randn(2, 3, IMG_SIZE, IMG_SIZE)
    with torch.no_grad():
        assert first(x).shape == (2, 24)
        torch.testing.assert_close(first(x), second(x))
    assert build_backbone(BackboneConfig("random", None, "vit_toy", IMG_SIZE)).embed_dim == 24


def test_new_backbone_probes_the_toy_benchmark(toy_backbone, toy, prepared, toy_override, tmp_path):
    from Stage3_eval import main

    raw, manifests = prepared
    run_dir = tmp_path / "toy_seeded"
    cli = main(probe_args(raw, manifests, toy_override, run_dir, "--model.backbone.kind", "seeded",
                          "--model.backbone.arch", "vit_toy"))
    assert cli.model.backbone.embed_dim == 24
    row = only_results_row(run_dir)
    assert (row["benchmark"] == "toy" and row["backbone_kind"] == "seeded"
            and math.isfinite(row["metric_value"]))
