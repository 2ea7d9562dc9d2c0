"""Learning-health callbacks in a real (tiny, CPU) fit: collapse warnings fire once per reason on a collapsed
run and never on a healthy one; the online probe's AUROC equals sklearn's on the same features and split,
and leaves the training RNG streams and the module's mode as they were."""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pacx.data.probe import ArrayProbeData, ProbeData
from pacx.lit.health import LearningHealth, OnlineLinearProbe

N_GLOBAL = 64


class Toy(pl.LightningModule):
    """A linear layer on random vectors; ``health_inputs`` serves a collapsed or a healthy val split."""

    def __init__(self, collapsed: bool = False, d: int = 32) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.collapsed, self.d = collapsed, d
        self.proj = torch.randn(48, 6, generator=torch.Generator().manual_seed(1))  # [3·4·4, 6]
        self.dropout = nn.Dropout(0.5)  # a no-op in eval mode; in train mode it would change the features

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def health_inputs(self) -> dict:
        g = torch.Generator().manual_seed(self.current_epoch)
        noise = torch.randn(200, self.d, generator=g)
        if self.collapsed:  # every row the same direction up to 1e-4 noise; InfoNCE at chance
            emb, loss = torch.ones(200, self.d) + 1e-4 * noise, math.log(N_GLOBAL)
        else:  # isotropic; InfoNCE at 80 % of chance
            emb, loss = noise, 0.8 * math.log(N_GLOBAL)
        return {"embeddings": emb, "infonce": {"ecg": loss, "labs": loss}, "n_global": N_GLOBAL}

    def probe_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x.flatten(1) @ self.proj)  # [B, 6]


def fit(module: pl.LightningModule, callbacks: list, tmp_path, max_epochs: int = 4) -> pl.Trainer:
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(x), batch_size=8)
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path), callbacks=callbacks)
    trainer.fit(module, data, data)
    return trainer


def test_collapsed_run_warns_once_per_reason(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="pacx.eval.health")
    health = LearningHealth(warmup_epochs=2)
    trainer = fit(Toy(collapsed=True), [health], tmp_path)
    assert [h["epoch"] for h in health.history] == [0, 1, 2, 3]  # the sanity check is skipped
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 4 and all(w.startswith(f"{tmp_path}: epoch 2:") for w in warnings)
    for needle in ("cxr-ecg is 1.000", "cxr-labs is 1.000", "embeddings collapsed", "dimensional collapse"):
        assert sum(needle in w for w in warnings) == 1
    m = trainer.callback_metrics
    assert float(m["val/infonce_frac_ecg"]) == pytest.approx(1.0)
    assert float(m["val/effective_rank"]) == pytest.approx(1.0, abs=0.05)
    assert float(m["val/emb_std"]) < 1e-4


def test_a_resumed_run_keeps_its_health_history_and_does_not_warn_again(tmp_path, caplog):
    """The callback's history and warned reasons travel in the checkpoint (loaded with weights_only): a run
    that warned at epoch 2 and is resumed from its epoch-3 checkpoint keeps epochs 0-3 and stays silent."""
    from pacx.weights.checkpoint import safe_torch_load

    caplog.set_level(logging.WARNING, logger="pacx.eval.health")
    health = LearningHealth(warmup_epochs=2)
    trainer = fit(Toy(collapsed=True), [health], tmp_path)
    ckpt = tmp_path / "epoch3.ckpt"
    trainer.save_checkpoint(ckpt)
    assert len(caplog.records) == 4
    saved = next(v for k, v in safe_torch_load(ckpt)["callbacks"].items() if k.startswith("LearningHealth"))
    assert saved["warned"] == sorted(health.monitor.warned) and len(saved["history"]) == 4
    caplog.clear()
    resumed = LearningHealth(warmup_epochs=2)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(x), batch_size=8)
    pl.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
               callbacks=[resumed]).fit(Toy(collapsed=True), data, data, ckpt_path=str(ckpt))
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3, 4, 5]
    assert caplog.records == []  # still collapsed at epochs 4-5, but every reason was already reported


def test_healthy_run_stays_silent(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="pacx.eval.health")
    health = LearningHealth(warmup_epochs=0)
    trainer = fit(Toy(collapsed=False), [health], tmp_path)
    assert caplog.records == []
    assert len(health.history) == 4
    assert all(h["infonce_frac_ecg"] == pytest.approx(0.8) for h in health.history)
    assert float(trainer.callback_metrics["val/emb_std"]) == pytest.approx(1 / math.sqrt(32), rel=0.1)
    assert float(trainer.callback_metrics["val/effective_rank"]) > 20


class ToyProbeData(ProbeData):
    """60 images [3, 4, 4], half shifted by their label; ``load`` also draws from every global RNG, as a
    careless data source might."""

    def load(self):
        torch.rand(1), np.random.rand(), random.random()
        g = torch.Generator().manual_seed(5)
        labels = torch.arange(60) % 2
        images = torch.randn(60, 3, 4, 4, generator=g) + 0.4 * labels[:, None, None, None]
        return images, labels


class RngProbe(Callback):
    """Records the global RNG states and the module mode at fit start and validation epoch end."""

    def __init__(self, set_train: bool) -> None:
        self.set_train, self.seen = set_train, []

    def _record(self, pl_module) -> None:
        if self.set_train:
            pl_module.train()
        self.seen.append((torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate(),
                          pl_module.training))

    def on_fit_start(self, trainer, pl_module) -> None:
        self._record(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._record(pl_module)


def test_online_probe_auroc_equals_sklearn_on_the_same_split(tmp_path):
    probe = OnlineLinearProbe(ToyProbeData(), every_n_epochs=2, batch_size=16, seed=0)
    module = Toy()
    trainer = fit(module, [RngProbe(set_train=True), probe], tmp_path)  # the probe must switch to eval mode
    assert [h["epoch"] for h in probe.history] == [0, 2, 3]  # every 2 epochs from 0, and the last
    images, labels = ToyProbeData().load()
    feats = (images.flatten(1) @ module.proj).double().numpy()
    y = labels.numpy()
    x_fit, x_eval, y_fit, y_eval = train_test_split(feats, y, test_size=0.3, stratify=y, random_state=0)
    scaler = StandardScaler().fit(x_fit)
    clf = LogisticRegression(C=1.0, max_iter=1000).fit(scaler.transform(x_fit), y_fit)
    expected = roc_auc_score(y_eval, clf.predict_proba(scaler.transform(x_eval))[:, 1])
    assert 0.6 < expected < 1.0  # informative but not trivial
    assert [h["auroc"] for h in probe.history] == pytest.approx([expected] * 3, abs=1e-9)
    assert float(trainer.callback_metrics["val/online_probe_auroc"]) == pytest.approx(expected, abs=1e-6)


def test_online_probe_leaves_rng_streams_and_module_mode_untouched(tmp_path):
    before, after = RngProbe(set_train=True), RngProbe(set_train=False)
    fit(Toy(), [before, OnlineLinearProbe(ToyProbeData()), after], tmp_path, max_epochs=3)
    assert len(before.seen) == len(after.seen) == 4  # fit start + 3 epochs, each probed
    for b, a in zip(before.seen, after.seen):
        assert torch.equal(b[0], a[0]) and np.array_equal(b[1], a[1]) and b[2] == a[2]
        assert a[3] is True  # the probe ran in eval mode and restored train mode


def test_callbacks_build_from_a_config(tmp_path):
    """The YAML form a LightningCLI config uses for ``trainer.callbacks``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[Callback])
    cfg = parser.parse_string(f"""
callbacks:
  - class_path: pacx.lit.health.OnlineLinearProbe
    init_args:
      every_n_epochs: 5
      data:
        class_path: pacx.data.probe.ArrayProbeData
        init_args: {{images_npy: {tmp_path}/cxr_val.npy, labels_csv: {tmp_path}/labels.csv, label: Edema,
                     index_column: row, img_size: 224, max_samples: 1000, seed: 0}}
  - class_path: pacx.lit.health.LearningHealth
    init_args: {{warmup_epochs: 3}}
""")
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    probe, health = instantiate(cfg).callbacks
    assert isinstance(probe, OnlineLinearProbe) and probe.every_n_epochs == 5
    assert isinstance(probe.data, ArrayProbeData) and probe.data.index_column == "row"
    assert isinstance(health, LearningHealth) and health.thresholds["warmup_epochs"] == 3


def _tiny_pacx_validation(n_rows: int):
    """(a tiny PaCXModule, ``n_rows`` validation pairs), the same in every process."""
    from pacx.lit.pacx import PaCXModule

    torch.manual_seed(0)  # the same weights on every rank
    module = PaCXModule(encoder_arch="vit_test", img_size=32, shared_dim=16, tuning="full")
    g = torch.Generator().manual_seed(1)
    rows = [{"cxr": torch.randn(3, 32, 32, generator=g),
             "teachers": {"ecg": torch.randn(1024, generator=g), "labs": torch.randn(256, generator=g)}}
            for _ in range(n_rows)]
    return module, rows


def _one_process_readings(root, n_rows: int, batch_size: int) -> dict[str, float]:
    """The logged ``validate`` readings of :func:`_tiny_pacx_validation` on one process."""
    module, rows = _tiny_pacx_validation(n_rows)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root)
    trainer.validate(module, DataLoader(rows, batch_size=batch_size))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def _ddp_pacx_validate_worker() -> None:
    """One rank of a 2-process CPU (gloo) Lightning DDP ``validate`` of a tiny PaCXModule (env as torchrun
    sets it; PACX_TEST_OUT, PACX_TEST_ROWS): saves the rank's per-batch InfoNCE and rank zero's logged
    readings."""
    import json
    import os
    from pathlib import Path

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    module, rows = _tiny_pacx_validation(int(os.environ.get("PACX_TEST_ROWS", "16")))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=os.environ["PACX_TEST_OUT"])
    trainer.validate(module, DataLoader(rows, batch_size=4))  # 16 rows: 8 per rank, two batches of 4 (N = 8)
    out = {"local": [c["labs"] for c in module._val_clip],
           "logged": {k: float(v) for k, v in trainer.callback_metrics.items()}}
    (Path(os.environ["PACX_TEST_OUT"]) / f"rank{rank}.json").write_text(json.dumps(out))


def test_pacx_split_readings_under_ddp_count_each_pair_once(tmp_path):
    """15 validation pairs on 2 ranks: Lightning's sampler pads rank 1 with a copy of pair 0. The whole-split
    retrieval and the embedding health readings must be those of the 15 pairs (one process), not of 16 with
    a duplicate."""
    import json

    from tests.helpers import run_ranks

    run_ranks("tests.lit.test_health:_ddp_pacx_validate_worker", timeout=300,
              env={"PACX_TEST_OUT": str(tmp_path), "PACX_TEST_ROWS": "15"})
    logged = json.loads((tmp_path / "rank0.json").read_text())["logged"]
    one = _one_process_readings(tmp_path / "one", n_rows=15, batch_size=4)
    keys = ["val/split_top1_cxr_ecg", "val/split_top5_cxr_ecg", "val/split_top5_cxr_labs",
            "val/effective_rank", "val/emb_std"]
    for key in keys:
        assert logged[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    assert one["val/split_top5_cxr_ecg"] * 15 == pytest.approx(round(one["val/split_top5_cxr_ecg"] * 15))


def test_pacx_health_infonce_under_ddp_is_the_mean_over_all_ranks(tmp_path):
    """Under DDP each rank's validation InfoNCE covers its own queries only; the logged chance fraction must
    be that of the whole split (the mean over ranks, as ``val/clip_*``), not rank zero's half."""
    import json

    from tests.helpers import run_ranks

    run_ranks("tests.lit.test_health:_ddp_pacx_validate_worker", timeout=300,
              env={"PACX_TEST_OUT": str(tmp_path)})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(len(r["local"]) == 2 for r in ranks)
    split_mean = np.mean([v for r in ranks for v in r["local"]])
    rank0_mean = np.mean(ranks[0]["local"])
    assert abs(split_mean - rank0_mean) > 1e-4  # the ranks' halves differ: the check can tell them apart
    logged = ranks[0]["logged"]
    assert logged["val/infonce_frac_labs"] * math.log(8) == pytest.approx(split_mean, rel=1e-5)
    assert logged["val/clip_labs"] == pytest.approx(split_mean, rel=1e-5)


def test_pacx_batch_readings_under_ddp_are_those_of_the_global_batch(tmp_path):
    """Under DDP the validation InfoNCE scores each query against the keys of every rank: the global batch.
    The per-batch readings (retrieval top-k, negative cosine, embedding spread) must be read on that batch
    too: 16 pairs at 4 per device on 2 processes equal one process at a batch of 8 (the same 8 pairs per
    step), not one at a batch of 4 (where top-5 of 4 keys is 1 by construction). Before: top-5 1.0 against
    0.5625 (ecg), negative cosine (labs) 0.0186 against -0.0097, cxr_std 0.513 against 0.559."""
    import json

    from tests.helpers import run_ranks

    run_ranks("tests.lit.test_health:_ddp_pacx_validate_worker", timeout=300,
              env={"PACX_TEST_OUT": str(tmp_path)})
    logged = json.loads((tmp_path / "rank0.json").read_text())["logged"]
    one = _one_process_readings(tmp_path / "one", n_rows=16, batch_size=8)
    keys = [f"val/{name}" for name in ("loss", "clip_labs", "batch_top1_cxr_ecg", "batch_top5_cxr_ecg",
                                       "batch_top1_cxr_labs", "batch_top5_cxr_labs", "pos_cos_labs",
                                       "neg_cos_ecg", "neg_cos_labs", "cxr_std", "ecg_std", "labs_std",
                                       "reg_cos_ecg", "cxr_norm")]
    assert one["val/batch_top5_cxr_labs"] < 1.0  # 5 of 8 keys: not 1 by construction
    for key in keys:
        assert logged[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
