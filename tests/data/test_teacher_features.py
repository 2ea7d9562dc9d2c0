"""On-the-fly teachers (pacx.data.teacher_features): the same numbers as the precomputed feature files.

A small synthetic Symile tree and small teachers saved to files (ECGFounder ``demo_small``, a narrow labs
DAE); ``extract_teacher_features`` writes the reference files, and ``OnTheFlyTeachers`` must reproduce
them from the raw arrays, also through the ``cxr_raw_teachers`` item kind and the DataModule.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from pacx.data.symile import ITEMS, RAW_TEACHERS_ITEM, SymileMIMICDataModule, build_cxr_transform, uses_cxr
from pacx.data.symile_files import ValidationCache
from pacx.data.teacher_features import OnTheFlyTeachers
from pacx.models.ecgfounder import create_ecgfounder
from pacx.models.labs_dae import LabsDAE, LabsDAEConfig
from pacx.teachers import extract_teacher_features, load_teachers
from pacx.testing.symile import write_symile_release
from pacx.weights.checkpoint import CheckpointError

ECG_DIM, LABS_DIM = 128, 16  # demo_small's last width; the small DAE's latent
SPLITS = ("train", "val")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.save({"state_dict": create_ecgfounder("demo_small", head=False).state_dict()}, d / "ecg.pth")
    dae = LabsDAE(LabsDAEConfig(hidden_dim=32, latent_dim=LABS_DIM))
    torch.save({"state_dict": {f"model.{k}": v for k, v in dae.state_dict().items()}}, d / "dae.ckpt")
    return {"ecg": d / "ecg.pth", "labs": d / "dae.ckpt"}


OPTIONS = {"ecg": {"config": "demo_small"}}


@pytest.fixture(scope="module")
def root(tmp_path_factory, weights) -> Path:
    """train 10 and val 3 rows (32 px CXR) with features written by the extraction (batch 5)."""
    out = write_symile_release(tmp_path_factory.mktemp("symile") / "data_npy", n_train=10, n_val=3,
                               n_test_queries=2, n_candidates=2, cxr_size=32, seed=0)
    teachers = load_teachers(weights, OPTIONS)
    extract_teacher_features(out, teachers, splits=SPLITS, batch_size=5, progress=False)
    return out


@pytest.fixture(scope="module")
def otf(weights) -> OnTheFlyTeachers:
    return OnTheFlyTeachers(weights, OPTIONS)


@pytest.fixture(autouse=True)
def _fresh_validation_memory():
    ValidationCache.forget_all()
    yield
    ValidationCache.forget_all()


def raw_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ecg = np.load(root / split / f"ecg_{split}.npy")  # [N, 1, 5000, 12]
    pct = np.load(root / split / f"labs_percentiles_{split}.npy").astype(np.float32)  # [N, 50]
    miss = np.load(root / split / f"labs_missingness_{split}.npy").astype(np.float32)  # int64 on disk
    return torch.from_numpy(ecg), torch.from_numpy(pct), torch.from_numpy(miss)


def assert_features_close(got: torch.Tensor, file: Path) -> None:
    want = np.load(file)
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5, atol=1e-5 * scale)


def raw(ecg: torch.Tensor, pct: torch.Tensor, miss: torch.Tensor) -> dict:
    """The ``raw`` part of a ``cxr_raw_teachers`` batch: each teacher's input rows."""
    return {"ecg": (ecg,), "labs": (pct, miss)}


@pytest.mark.parametrize("split", SPLITS)
def test_equals_extracted_files(root, otf, split):
    """Batches of 4 here against batches of 5 in the extraction: rows are independent of their batch."""
    ecg, pct, miss = raw_split(root, split)
    feats = [otf(raw(ecg[i:i + 4], pct[i:i + 4], miss[i:i + 4])) for i in range(0, len(ecg), 4)]
    assert_features_close(torch.cat([f["ecg"] for f in feats]), root / split / "ecg_features.npy")
    assert_features_close(torch.cat([f["labs"] for f in feats]), root / split / "labs_features.npy")


def test_frozen_eval_no_grad(otf, root):
    assert otf.dims == {"ecg": ECG_DIM, "labs": LABS_DIM}
    params = list(otf.parameters())
    assert params and not any(p.requires_grad for p in params)
    otf.train()  # e.g. as a submodule of a module put in training mode
    assert not any(m.training for m in otf.modules())
    with torch.enable_grad():
        out = otf(raw(*raw_split(root, "val")))
    assert all(not f.requires_grad and f.grad_fn is None for f in out.values())


def test_float32_under_autocast(otf, root):
    """Mixed precision must not change the targets: autocast is off inside the teachers."""
    batch = raw(*raw_split(root, "val"))
    ref = otf(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = otf(batch)
    for name, b in got.items():
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, ref[name], rtol=0, atol=0)


def test_non_finite_ecg_is_refused(otf, root):
    ecg, pct, miss = raw_split(root, "val")
    ecg[1, 0, 10, 3] = float("nan")
    with pytest.raises(ValueError, match="row 1 has NaN or inf"):
        otf(raw(ecg, pct, miss))
    with pytest.raises(ValueError, match=r"no raw inputs for teacher\(s\) \['labs'\]"):
        otf({"ecg": (ecg,)})


def test_wrong_weights_fail_loudly(weights):
    with pytest.raises(CheckpointError, match="does not fit ECGFounder.*shape mismatch"):
        OnTheFlyTeachers(weights, {"ecg": {"config": "12_lead"}})
    with pytest.raises(ValueError, match=r"teacher options for \['ekg'\]"):
        OnTheFlyTeachers(weights, {"ekg": {}})


def test_item_kind_registered():
    assert RAW_TEACHERS_ITEM in ITEMS
    assert uses_cxr(RAW_TEACHERS_ITEM)


def test_data_path_matches_precomputed_files(root, weights):
    """The data module's on-the-fly teachers give what ``cxr_teachers`` serves:
    the CXR and the file features."""
    kw = dict(batch_size=2, num_workers=0, train_transform="resize", img_size=16, pin_memory=False)
    dm = SymileMIMICDataModule(str(root), RAW_TEACHERS_ITEM,
                               teacher_weights={k: str(v) for k, v in weights.items()},
                               teacher_options=OPTIONS, **kw)
    dm.setup("fit")
    item = dm.datasets["train"][0]
    assert tuple(item["cxr"].shape) == (3, 16, 16) and item["cxr"].dtype == torch.float32
    assert {k: [(tuple(t.shape), t.dtype) for t in v] for k, v in item["raw"].items()} == {  # rows as stored
        "ecg": [((1, 5000, 12), torch.float32)], "labs": [((50,), torch.float32), ((50,), torch.int64)]}
    batches = [dm.on_after_batch_transfer(batch, 0) for batch in dm.val_dataloader()]  # val: in file order
    want_cxr = build_cxr_transform("resize", 16)(torch.from_numpy(np.load(root / "val" / "cxr_val.npy")))
    torch.testing.assert_close(torch.cat([b["cxr"] for b in batches]), want_cxr, rtol=0, atol=0)
    for name in ("ecg", "labs"):
        assert_features_close(torch.cat([b["teachers"][name] for b in batches]),
                              root / "val" / f"{name}_features.npy")
    with pytest.raises(ValueError, match="go with item 'cxr_raw_teachers'"):
        SymileMIMICDataModule(str(root), "cxr_teachers", teacher_weights={"ecg": str(weights["ecg"])})
    one = SymileMIMICDataModule(str(root), RAW_TEACHERS_ITEM, teacher_weights={"ecg": str(weights["ecg"])},
                                **kw)
    with pytest.raises(ValueError, match=r"must name exactly the teachers served.*missing \['labs'\]"):
        one.setup("fit")


LOADER = dict(batch_size=2, num_workers=0, train_transform="resize", img_size=16, pin_memory=False)
TRAINER = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False)


class _Recorder(pl.LightningModule):
    """Keeps the teacher features of each validation batch, as Stage 2's model receives them."""

    teacher_names = ("ecg", "labs")

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Linear(1, 1)
        self.batches: list[dict[str, torch.Tensor]] = []

    def validation_step(self, batch, batch_idx):
        self.batches.append({t: f.detach().cpu() for t, f in batch["teachers"].items()})


@pytest.mark.parametrize("precision", ["16-true", "bf16-true"])
def test_true_half_precision_does_not_touch_the_raw_inputs(root, weights, tmp_path, precision):
    """Lightning casts every float tensor of a batch to the precision's dtype *before*
    ``on_after_batch_transfer``; the teachers must still see the rows as stored (16-true rounded the raw ECG
    and labs to float16, bf16-true failed in numpy with "unsupported ScalarType BFloat16")."""
    dm = SymileMIMICDataModule(str(root), RAW_TEACHERS_ITEM, **LOADER, teacher_options=OPTIONS,
                               teacher_weights={k: str(v) for k, v in weights.items()})
    model = _Recorder()
    trainer = pl.Trainer(precision=precision, default_root_dir=tmp_path, **TRAINER)
    trainer.validate(model, datamodule=dm, verbose=False)
    for name in ("ecg", "labs"):
        got = torch.cat([b[name] for b in model.batches])
        assert_features_close(got, root / "val" / f"{name}_features.npy")


@pytest.mark.bad_input
def test_raw_teacher_item_without_teacher_weights_is_refused_at_setup(root, tmp_path):
    """Stage 2 with `data.item: cxr_raw_teachers` but no `data.teacher_weights` → ValueError at setup naming
    teacher_weights (the raw rows reached the model, which failed with KeyError 'teachers')."""
    dm = SymileMIMICDataModule(str(root), RAW_TEACHERS_ITEM, **LOADER)
    trainer = pl.Trainer(default_root_dir=tmp_path, **TRAINER)
    with pytest.raises(ValueError, match=r"cxr_raw_teachers.*data\.teacher_weights.*\['ecg', 'labs'\]"):
        trainer.validate(_Recorder(), datamodule=dm, verbose=False)
    alone = SymileMIMICDataModule(str(root), RAW_TEACHERS_ITEM, **LOADER)
    alone.setup("fit")  # without a model (e.g. to read the raw rows) it serves them as before
    assert sorted(next(iter(alone.val_dataloader()))["raw"]) == ["ecg", "labs"]


@pytest.mark.bad_input
def test_on_the_fly_teacher_width_is_checked_at_setup(root, weights, tmp_path):
    """On-the-fly teachers whose width differs from the model's teacher_dims → ValueError at setup naming the
    weights file and teacher_dims (it surfaced only at the first batch, naming neither)."""
    from pacx.lit.pacx import PaCXModule

    dm = SymileMIMICDataModule(str(root), RAW_TEACHERS_ITEM, **LOADER, teacher_options=OPTIONS,
                               teacher_weights={k: str(v) for k, v in weights.items()})
    dm.setup("validate")
    widths = dm.feature_widths()
    assert widths == {t: (np.load(root / "val" / f"{t}_features.npy", mmap_mode="r").shape[1], weights[t])
                      for t in ("ecg", "labs")}
    model = PaCXModule(encoder_arch="vit_test", img_size=16, shared_dim=8, tuning="full",
                       teacher_dims={"ecg": widths["ecg"][0] + 1})
    dm = SymileMIMICDataModule(str(root), RAW_TEACHERS_ITEM, **LOADER, teacher_options=OPTIONS,
                               teacher_weights={k: str(v) for k, v in weights.items()})
    with pytest.raises(ValueError, match=rf"{weights['ecg']}: {widths['ecg'][0]}-wide .*teacher_dims"):
        pl.Trainer(default_root_dir=tmp_path, **TRAINER).validate(model, datamodule=dm, verbose=False)


def test_legacy_teacher_keys_are_read_as_teacher_weights_and_options(root, weights):
    """The earlier ``ecgfounder`` / ``labs_dae`` / ``ecgfounder_config`` keys: translated with a
    FutureWarning; ``ecgfounder_config`` also beside the new ``teacher_weights`` (it was dropped there, and
    the 12-lead default then failed to load demo_small weights), merged into ``teacher_options.ecg``."""
    w = {k: str(v) for k, v in weights.items()}
    with pytest.warns(FutureWarning, match="deprecated"):
        old = SymileMIMICDataModule(str(root), RAW_TEACHERS_ITEM, **LOADER, ecgfounder=w["ecg"],
                                    labs_dae=w["labs"], ecgfounder_config="demo_small")
    assert old.hparams.teacher_weights == w and old.hparams.teacher_options == OPTIONS
    with pytest.warns(FutureWarning, match="deprecated"):
        mixed = SymileMIMICDataModule(str(root), RAW_TEACHERS_ITEM, **LOADER, teacher_weights=w,
                                      teacher_options={"ecg": {"trust_pickle": False}},
                                      ecgfounder_config="demo_small")
    assert mixed.hparams.teacher_options == {"ecg": {"config": "demo_small", "trust_pickle": False}}
    mixed.setup("validate")
    assert mixed.feature_widths()["ecg"][0] == np.load(root / "val" / "ecg_features.npy").shape[1]
    with pytest.raises(ValueError, match=r"ecgfounder_config 'demo_small' and teacher_options\.ecg\.config"):
        SymileMIMICDataModule(str(root), RAW_TEACHERS_ITEM, **LOADER, teacher_weights=w,
                              teacher_options={"ecg": {"config": "12_lead"}}, ecgfounder_config="demo_small")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_ecg_device(root, weights):
    otf = OnTheFlyTeachers(weights, OPTIONS)
    ecg, pct, miss = raw_split(root, "train")
    out = otf(raw(ecg.cuda(), pct.cuda(), miss.cuda()))
    assert out["ecg"].device.type == out["labs"].device.type == "cuda"
    assert next(otf.parameters()).device.type == "cuda"
    for name in ("ecg", "labs"):
        torch.testing.assert_close(out[name].cpu(),
                                   torch.from_numpy(np.load(root / "train" / f"{name}_features.npy")),
                                   rtol=1e-4, atol=1e-4)
