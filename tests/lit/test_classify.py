"""Stage 3 classification: synthetic release -> converter -> manifests -> fit +
test, and the module's rules."""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from sklearn import metrics as skm
from torchmetrics import MetricCollection

from pacx.data.manifest import ManifestError
from pacx.data.prepare import run_converter
from pacx.data.registry import BENCHMARKS, INDEX_COLUMN
from pacx.data.stage3 import BenchmarkDataModule
from pacx.lit.classify import LOSSES, METRICS, PREDICTIONS, ClassificationModule, metric_key
from pacx.models.backbones import BackboneConfig, build_backbone
from pacx.testing.benchmarks import RELEASE_WRITERS
from pacx.weights.checkpoint import CheckpointError
from tests.helpers import lrs_per_step

CLASSIFICATION = sorted(n for n, s in BENCHMARKS.items() if s.task != "segmentation" and n in RELEASE_WRITERS)
MULTICLASS = sorted(n for n in CLASSIFICATION if BENCHMARKS[n].task == "multiclass")
# MedMod is built only with a decision on Symile's training admissions (docs/datasets.md#leakage); these
# synthetic releases share no ids with any Symile release, so keeping them is harmless.
CONVERTER_OPTIONS = {name: {"allow_overlap": True} for name in ("medmod_phys", "medmod_mort")}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """name -> (image root, manifest dir), converted once per benchmark on demand."""
    cache: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in cache:
            base = tmp_path_factory.mktemp(name)
            raw = RELEASE_WRITERS[name](base / "raw", 0)
            run_converter(name, raw, base / "manifests", **CONVERTER_OPTIONS.get(name, {}))
            cache[name] = (raw, base / "manifests")
        return cache[name]

    return get


def stage3_configs(name: str) -> list[str]:
    """``--config`` arguments of a benchmark: its mode's base, then its override where it has one (the
    benchmarks without a paper config run the base with ``--data.benchmark``)."""
    stage3 = Path(__file__).resolve().parents[2] / "configs/stage3"
    base, folder = (("segmentation", "seg") if BENCHMARKS[name].task == "segmentation"
                    else ("linear_probe", "lp"))
    configs = [stage3 / f"{base}.yaml", stage3 / folder / f"{name}.yaml"]
    return [arg for path in configs if path.is_file() for arg in ("--config", str(path))]


def stage3_args(name: str, raw: Path, manifests: Path, run_dir: Path, weights: Path,
                *extra: str) -> list[str]:
    return [
        "fit", *stage3_configs(name),
        "--data.benchmark", name,
        "--model.backbone.kind", "weights", "--model.backbone.weights", str(weights),
        "--model.backbone.arch", "vit_test", "--data.img_size", "32",
        "--data.root", str(raw), "--data.manifest_dir", str(manifests), "--data.batch_size", "8",
        "--data.num_workers", "0", "--data.pin_memory", "false", "--trainer.max_epochs", "1",
        "--trainer.precision", "32", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(run_dir), "--wandb",
        "disabled", *extra,
    ]


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_fit_then_test_appends_results(name, prepared, stage1_run, tmp_path, repo):
    from Stage3_eval import main

    raw, manifests = prepared(name)
    spec = BENCHMARKS[name]
    run_dir = tmp_path / "run"
    cli = main(stage3_args(name, raw, manifests, run_dir, stage1_run))
    assert cli.model.monitor == (metric_key(spec, "val", "auroc"), "max")
    metrics = pd.read_csv(run_dir / "metrics.csv")
    key = metric_key(spec, "test")
    assert key in metrics.columns and metrics[key].notna().any()
    assert metric_key(spec, "val", "auroc") in metrics.columns
    results = pd.read_csv(run_dir / "results.csv")
    assert len(results) == 1
    row = results.iloc[0]
    assert row["benchmark"] == name and row["backbone_kind"] == "weights" and row["mode"] == "linear_probe"
    assert row["metric_value"] == pytest.approx(row[key])
    assert row["train_fraction"] == 1.0 and str(row["backbone_weights"]) == str(stage1_run)


def test_test_loads_the_best_checkpoint_on_the_monitor_beside_a_configs_own(prepared, stage1_run, tmp_path,
                                                                            capsys, caplog):
    """Lightning's ``ckpt_path="best"`` means the first ModelCheckpoint among the callbacks, which a config's
    ``trainer.callbacks`` may supply (here one keeping the *worst* epoch); the test must still load pacx's own
    best checkpoint on the module's monitor metric. ``--test_table false``: one log line, no table."""
    from Stage3_eval import main

    raw, manifests = prepared("tb")
    run_dir, monitor = tmp_path / "run", metric_key(BENCHMARKS["tb"], "val", "auroc")
    caplog.set_level(logging.INFO, logger="pacx.cli")
    cli = main(stage3_args("tb", raw, manifests, run_dir, stage1_run, "--trainer.max_epochs", "3",
                           "--trainer.callbacks+=pytorch_lightning.callbacks.ModelCheckpoint",
                           "--trainer.callbacks.dirpath", str(tmp_path / "own"),
                           "--trainer.callbacks.monitor", monitor,
                           "--trainer.callbacks.mode", "min", "--test_table", "false"))
    own = [cb for cb in cli.trainer.checkpoint_callbacks if cb is not cli.best_checkpoint]
    assert len(own) == 2 and own[0].monitor == monitor  # the config's, then LastCheckpoint
    assert cli.best_checkpoint.best_model_path != own[0].best_model_path  # the two disagree here
    assert cli.trainer.ckpt_path == cli.best_checkpoint.best_model_path
    val = pd.read_csv(run_dir / "metrics.csv")[monitor].dropna()
    assert len(val) == 3 and float(cli.best_checkpoint.best_model_score) == pytest.approx(val.max())
    test_auroc = pd.read_csv(run_dir / "results.csv").iloc[-1]["metric_value"]
    lines = [r.getMessage() for r in caplog.records if r.name == "pacx.cli"]
    lines = [line for line in lines if line.startswith(f"{run_dir}: ")]
    assert len(lines) == 1 and f"{metric_key(BENCHMARKS['tb'], 'test')} {test_auroc:.4f}" in lines[0]
    assert "Test metric" not in capsys.readouterr().out


def _datamodule(name, prepared, **kwargs) -> BenchmarkDataModule:
    raw, manifests = prepared(name)
    return BenchmarkDataModule(name, str(raw), str(manifests), batch_size=4, num_workers=0, img_size=32,
                               pin_memory=False, **kwargs)


def _fit(module: ClassificationModule, dm: BenchmarkDataModule, root: Path) -> None:
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=1)
    trainer.fit(module, datamodule=dm)


def test_linear_probe_keeps_backbone_fixed_and_in_eval_mode(prepared, stage1_run, tmp_path):
    # the per-epoch path: the backbone runs inside every training step and must stay in eval mode there
    module = ClassificationModule("tb", BackboneConfig("mae", str(stage1_run), "vit_test", 32),
                                  mode="linear_probe", feature_cache=False)
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    head_before = module.head.weight.detach().clone()
    modes: list[bool] = []  # backbone.training at every forward, training batches included
    module.backbone.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    _fit(module, _datamodule("tb", prepared), tmp_path)
    assert len(modes) > 2 and not any(modes)
    assert all(torch.equal(before[k], v) for k, v in module.backbone.state_dict().items())
    assert not torch.equal(head_before, module.head.weight)
    assert {g["name"] for g in module.param_groups()} == {"head_decay", "head_no_decay"}


def test_finetune_trains_backbone_at_a_tenth_of_the_lr(prepared, stage1_run, tmp_path):
    module = ClassificationModule("tb", BackboneConfig("mae", str(stage1_run), "vit_test", 32),
                                  mode="finetune", lr=1e-2)
    groups = {g["name"]: g for g in module.param_groups()}
    assert set(groups) == {"head_decay", "head_no_decay", "backbone_decay", "backbone_no_decay"}
    assert groups["head_decay"]["lr"] == pytest.approx(1e-2)
    assert groups["backbone_decay"]["lr"] == pytest.approx(1e-3)
    assert (groups["backbone_no_decay"]["lr"] == pytest.approx(1e-3)
            and groups["backbone_no_decay"]["weight_decay"] == 0)
    assert groups["head_decay"]["weight_decay"] == 0.01
    before = module.backbone.blocks[0].attn.qkv.weight.detach().clone()
    _fit(module, _datamodule("tb", prepared), tmp_path)
    assert not torch.equal(before, module.backbone.blocks[0].attn.qkv.weight)
    optimizer = module.trainer.optimizers[0]
    initial = {g["name"]: g["initial_lr"] for g in optimizer.param_groups}
    assert initial["backbone_decay"] == pytest.approx(0.1 * initial["head_decay"])


@pytest.mark.parametrize("name", MULTICLASS)
def test_multiclass_targets_are_class_indices(name, prepared):
    dm = _datamodule(name, prepared)
    dm.setup("fit")
    n_classes = len(BENCHMARKS[name].labels)
    for ds in dm.datasets.values():
        assert ds.labels.dtype == torch.long and ds.labels.ndim == 1
        assert int(ds.labels.min()) >= 0 and int(ds.labels.max()) < n_classes
    _, target = next(iter(dm.train_dataloader()))
    assert target.dtype == torch.long and target.ndim == 1


def test_label_outside_the_classes_names_the_row(prepared, tmp_path):
    raw, manifests = prepared("covidqu")
    spec = BENCHMARKS["covidqu"]
    bad = tmp_path / "manifests"
    bad.mkdir()
    for split, file in spec.manifest_files.items():
        df = pd.read_csv(manifests / file)
        if split == "val":
            df.loc[1, INDEX_COLUMN] = 7
        df.to_csv(bad / file, index=False)
    dm = BenchmarkDataModule("covidqu", str(raw), str(bad), batch_size=4, num_workers=0, img_size=32)
    with pytest.raises(ManifestError, match=r"row 1: Label=7"):
        dm.setup("fit")


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_low_data_subset_keeps_a_positive_per_label(name, prepared):
    spec = BENCHMARKS[name]
    full, _ = _datamodule(name, prepared).manifest_table("train")
    small, _ = _datamodule(name, prepared, train_fraction=0.01, subset_seed=3).manifest_table("train")
    assert len(small) < len(full) and list(small.columns) == list(full.columns)
    if spec.label_source == "index":
        assert set(small[INDEX_COLUMN]) == set(full[INDEX_COLUMN])
    else:
        for label in spec.label_columns:
            if (full[label] == 1).any():
                assert (small[label] == 1).sum() >= 1, label


def test_backbone_errors_name_the_path(stage1_run, tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        build_backbone(BackboneConfig("pacx", str(missing), None, 32))
    with pytest.raises(CheckpointError, match=re.escape(str(stage1_run))):
        build_backbone(BackboneConfig("mae", str(stage1_run), "vit_demo", 32))
    with pytest.raises(ValueError, match="needs an arch"):
        build_backbone(BackboneConfig("random", None, None, 32))
    encoder = build_backbone(BackboneConfig("random", None, "vit_test", 32))
    assert encoder(torch.zeros(2, 3, 32, 32)).shape == (2, encoder.embed_dim)


def test_head_norm_standardises_features_before_the_linear_head(stage1_run):
    module = ClassificationModule("tb", BackboneConfig("mae", str(stage1_run), "vit_test", 32),
                                  head_norm=True)
    norm, linear = module.head
    assert isinstance(norm, torch.nn.BatchNorm1d) and not norm.affine and not list(norm.parameters())
    assert {g["name"] for g in module.param_groups()} == {"head_decay", "head_no_decay"}
    norm.running_mean.copy_(torch.arange(32.0))
    norm.running_var.copy_(torch.full((32,), 4.0))
    module.eval()
    x = torch.randn(5, 32)
    expected = linear((x - torch.arange(32.0)) / torch.sqrt(torch.tensor(4.0 + 1e-6)))
    torch.testing.assert_close(module.head(x), expected)
    module.train()  # a one-sample training batch (an epoch's last) falls back to the running statistics
    torch.testing.assert_close(module.head(x[:1]), expected[:1])
    plain = ClassificationModule("tb", BackboneConfig("mae", str(stage1_run), "vit_test", 32))
    assert isinstance(plain.head, torch.nn.Linear)  # the reference's bare head by default


def _task_data(task: str, n: int = 60, c: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [n, C] (C = 1 for binary) informative of the targets. For binary / multilabel the second half
    lies in (0.05, 0.95), where a missing sigmoid would go unnoticed by torchmetrics' own auto-sigmoid."""
    g = torch.Generator().manual_seed(seed)
    if task == "multiclass":
        counts = [n // 2, n // 4, n // 6, n - n // 2 - n // 4 - n // 6]  # unbalanced: macro ≠ weighted
        y = torch.repeat_interleave(torch.arange(c), torch.tensor(counts))[torch.randperm(n, generator=g)]
        return torch.randn(n, c, generator=g) + 1.5 * torch.nn.functional.one_hot(y, c), y
    c = 1 if task == "binary" else c
    y = (torch.rand(n, c, generator=g) < 0.4).float()
    y[:2], y[2:4] = 1.0, 0.0  # both classes in every column
    logits = torch.randn(n, c, generator=g) + 1.5 * (y - 0.5)
    logits[n // 2:] = 0.05 + 0.9 * torch.rand(n - n // 2, c, generator=g)
    return logits, y


def _sklearn_metrics(task: str, logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """docs/datasets.md#metrics by scikit-learn: AUROC on the probabilities, the rest at 0.5 / argmax."""
    if task == "binary":
        p, t = 1 / (1 + np.exp(-logits[:, 0])), y[:, 0]
        pred = p >= 0.5
        return {"auroc": skm.roc_auc_score(t, p), "acc": skm.accuracy_score(t, pred),
                "precision": skm.precision_score(t, pred), "recall": skm.recall_score(t, pred),
                "f1": skm.f1_score(t, pred)}
    if task == "multilabel":
        p = 1 / (1 + np.exp(-logits))
        pred = p >= 0.5
        acc = np.mean([skm.accuracy_score(y[:, j], pred[:, j]) for j in range(y.shape[1])])
        auroc = skm.roc_auc_score(y, p, average="macro")
    else:
        e = np.exp(logits - logits.max(1, keepdims=True))
        p = e / e.sum(1, keepdims=True)
        pred = p.argmax(1)
        acc = skm.balanced_accuracy_score(y, pred)  # macro accuracy = mean per-class recall
        auroc = skm.roc_auc_score(y, p, multi_class="ovr", average="macro")
    kw = {"average": "macro", "zero_division": 0}
    return {"auroc_macro": auroc, "acc_macro": acc, "precision_macro": skm.precision_score(y, pred, **kw),
            "recall_macro": skm.recall_score(y, pred, **kw), "f1_macro": skm.f1_score(y, pred, **kw)}


@pytest.mark.parametrize("task", ["binary", "multilabel", "multiclass"])
def test_task_losses_and_epoch_metrics_against_numpy_and_sklearn(task):
    """LOSSES, PREDICTIONS and METRICS of a task (docs/datasets.md#metrics, #heads-and-losses) on two batches
    accumulated as in an epoch, against a numpy loss and scikit-learn metrics on the whole."""
    logits, y = _task_data(task)
    lg, t = logits.double().numpy(), y.numpy()
    if task == "multiclass":
        logp = lg - lg.max(1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
        expected_loss = -logp[np.arange(len(t)), t].mean()
    else:
        expected_loss = np.mean(np.logaddexp(0, lg) - t * lg)  # BCE with logits, mean over all entries
    loss = LOSSES[task](logits.double(), y)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    num = logits.shape[1]
    metrics = MetricCollection(METRICS[task](num))
    for rows in (slice(0, 30), slice(30, 60)):
        metrics.update(*PREDICTIONS[task](logits[rows], y[rows]))
    got = {k: float(v) for k, v in metrics.compute().items()}
    assert got == pytest.approx(_sklearn_metrics(task, logits.double().numpy(), t), abs=1e-6)


def test_epoch_metrics_start_afresh_each_epoch(monkeypatch):
    """The per-epoch metrics are reset after they are logged: a second epoch's values are its own."""
    module = ClassificationModule("tb", BackboneConfig("random", None, "vit_test", 32))
    logged: list[dict] = []
    monkeypatch.setattr(module, "log_dict",
                        lambda values: logged.append({k: float(v) for k, v in values.items()}))
    for seed in (1, 2):
        logits, y = _task_data("binary", seed=seed)
        module.val_metrics.update(*PREDICTIONS["binary"](logits, y))
        module.on_validation_epoch_end()
        expected = _sklearn_metrics("binary", logits.double().numpy(), y.numpy())
        assert logged[-1] == pytest.approx({f"val/{k}": v for k, v in expected.items()}, abs=1e-6)


def test_defaults_are_the_stage3_settings():
    """docs/datasets.md#stage-3-settings: lr 3e-3, weight decay 0.01, betas (0.9, 0.999), no warmup, backbone
    at 0.1 × lr, the bare linear head, the flip-aware feature cache."""
    defaults = {k: v.default for k, v in inspect.signature(ClassificationModule).parameters.items()}
    assert {k: defaults[k] for k in ("mode", "lr", "weight_decay", "betas", "warmup_epochs",
                                     "backbone_lr_scale", "head_norm", "feature_cache")} == {
        "mode": "linear_probe", "lr": 3e-3, "weight_decay": 0.01, "betas": (0.9, 0.999), "warmup_epochs": 0.0,
        "backbone_lr_scale": 0.1, "head_norm": False, "feature_cache": "flip"}


def test_stage3_configs_hold_the_reference_per_epoch_cosine():
    """docs/datasets.md#stage-3-settings: the linear-probe configs step the authors' schedule per epoch, a
    half cosine over the 40 epochs held within each epoch (epoch e: lr · ½(1 + cos(π e / 40)), never exactly
    0); ``lr_interval: step`` evaluates the same curve per optimizer step."""
    import math

    import yaml

    config = Path(__file__).resolve().parents[2] / "configs/stage3/linear_probe.yaml"
    base = yaml.safe_load(config.read_text())
    assert base["model"]["init_args"]["lr_interval"] == "epoch"
    spe, epochs, lr = 3, 40, 3e-3
    module = ClassificationModule("tb", BackboneConfig("random", None, "vit_test", 32), lr=lr,
                                  lr_interval="epoch")
    expected = [lr * 0.5 * (1 + math.cos(math.pi * (s // spe) / epochs)) for s in range(spe * epochs)]
    assert lrs_per_step(module, spe, epochs) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    per_step = ClassificationModule("tb", BackboneConfig("random", None, "vit_test", 32), lr=lr,
                                    lr_interval="step")
    curve = [lr * 0.5 * (1 + math.cos(math.pi * s / (spe * epochs))) for s in range(spe * epochs)]
    assert lrs_per_step(per_step, spe, epochs) == pytest.approx(curve, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_a_class_without_positives_counts_as_zero_auroc_and_is_named(task, caplog):
    """docs/datasets.md#metrics: a class with no positive (or no negative) rows in an evaluation split has no
    AUROC; torchmetrics scores it 0 and the macro mean keeps it (as the reference), and a warning names it."""
    name = "vindr" if task == "multilabel" else "chestx6"
    module = ClassificationModule(name, BackboneConfig("random", None, "vit_test", 32))
    labels = module.spec.labels
    c = len(labels)
    g = torch.Generator().manual_seed(3)
    if task == "multilabel":
        y = (torch.rand(40, c, generator=g) < 0.4).float()
        y[:2], y[2:4] = 1.0, 0.0
        y[:, 4] = 0.0  # no positive in this split
        y[:, 7] = 1.0  # no negative
        absent = [4, 7]
    else:
        y = torch.arange(40) % (c - 1)  # the last class never occurs
        absent = [c - 1]
    logits = torch.randn(40, c, generator=g)
    module.val_metrics.update(*PREDICTIONS[task](logits, y))
    module.val_label_counts.update(*PREDICTIONS[task](logits, y))
    logged: list[dict] = []
    module.log_dict = lambda values: logged.append({k: float(v) for k, v in values.items()})
    with caplog.at_level(logging.WARNING, logger="pacx.lit.classify"):
        module.on_validation_epoch_end()
    lg, t = logits.double().numpy(), y.numpy()
    if task == "multilabel":
        p, onehot = 1 / (1 + np.exp(-lg)), t
    else:
        e = np.exp(lg - lg.max(1, keepdims=True))
        p, onehot = e / e.sum(1, keepdims=True), np.eye(c)[t]
    per_class = [0.0 if j in absent else skm.roc_auc_score(onehot[:, j], p[:, j]) for j in range(c)]
    assert logged[-1]["val/auroc_macro"] == pytest.approx(np.mean(per_class), abs=1e-6)
    warned = [r.getMessage() for r in caplog.records if "AUROC" in r.getMessage()]
    assert len(warned) == 1 and "val" in warned[0]
    assert all(repr(labels[j]) in warned[0] for j in absent)
    assert not any(repr(labels[j]) in warned[0] for j in range(c) if j not in absent)


@pytest.mark.parametrize("task", ["binary", "multilabel"])
def test_hard_predictions_are_probabilities_above_one_half(task):
    """docs/datasets.md#metrics: a row is predicted positive when its probability is above 0.5, torchmetrics'
    rule (the authors' code): a logit of exactly 0 (probability 0.5) is a negative prediction."""
    c = 1 if task == "binary" else 3
    logits = torch.tensor([[0.0] * c, [0.0] * c, [1e-3] * c, [-1e-3] * c])
    y = torch.tensor([[1.0] * c, [0.0] * c, [1.0] * c, [1.0] * c])
    metrics = MetricCollection(METRICS[task](c))
    metrics.update(*PREDICTIONS[task](logits, y))
    got = {k.split("_")[0]: float(v) for k, v in metrics.compute().items()}
    pred = (1 / (1 + np.exp(-logits.double().numpy())) > 0.5)[:, 0]  # every column alike
    t = y.numpy()[:, 0]
    assert got["acc"] == pytest.approx(skm.accuracy_score(t, pred)) == pytest.approx(0.5)
    assert got["recall"] == pytest.approx(skm.recall_score(t, pred)) == pytest.approx(1 / 3)


def test_a_binary_split_with_one_class_is_named():
    """A binary validation split without positives: AUROC 0 (torchmetrics); the warning names the label."""
    module = ClassificationModule("tb", BackboneConfig("random", None, "vit_test", 32))
    logits, y = torch.randn(6, 1), torch.zeros(6, 1)
    module.val_metrics.update(*PREDICTIONS["binary"](logits, y))
    module.val_label_counts.update(*PREDICTIONS["binary"](logits, y))
    logged: list[dict] = []
    module.log_dict = lambda values: logged.append({k: float(v) for k, v in values.items()})
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("pacx.lit.classify").addHandler(handler)
    try:
        module.on_validation_epoch_end()
    finally:
        logging.getLogger("pacx.lit.classify").removeHandler(handler)
    assert logged[-1]["val/auroc"] == 0.0
    assert len(records) == 1 and "'Label' (no positive)" in records[0] and "val/auroc" in records[0]
