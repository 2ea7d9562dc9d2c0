"""Teachers by name (pacx.teachers): the registry, and a toy third teacher defined here only.

``vitals`` reads a raw file the release does not have (``vitals_<split>.npy``, written by the fixture) with a
tiny frozen network saved by the fixture. With it registered, and no library file changed, the library's
extraction writes its features, a 2-step Stage 2 fit through ``Stage2_PACX.py`` distils from ECG, labs and
vitals, and the alignment probe and zero-shot retrieval evaluate it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import pacx
from pacx.data.symile import SymileMIMICDataModule
from pacx.data.symile_files import FileSpec, SymileFileError, ValidationCache
from pacx.data.teacher_features import OnTheFlyTeachers
from pacx.eval.alignment import load_split, probe_encoder
from pacx.eval.zero_shot import load_stage2_heads, stage2_pool, zero_shot_retrieval
from pacx.models.heads import upgrade_head_keys
from pacx.teachers import (
    DEFAULT_TEACHERS,
    TEACHERS,
    TeacherSpec,
    check_finite,
    extract_teacher_features,
    load_teachers,
    register_teacher,
    resolve_teachers,
)
from pacx.testing.symile import write_symile_release
from tests.helpers import load_script, stage2_args

N_VITALS, VITALS_DIM = 6, 8  # raw vitals per row; the toy teacher's feature width
TEACHERS3 = ("ecg", "labs", "vitals")


# ------------------------------------------------------------------------------------------ the toy teacher


class VitalsNet(nn.Module):
    """A frozen 'vitals' encoder: Linear(6 -> 8) then tanh; ``embed_dim`` 8."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_dim = VITALS_DIM
        self.linear = nn.Linear(N_VITALS, VITALS_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))  # [B, 6] -> [B, 8]


def load_vitals_net(weights: str | Path) -> nn.Module:
    net = VitalsNet()
    net.load_state_dict(torch.load(weights, weights_only=True), strict=True)
    return net.eval()


def preprocess_vitals(vitals: np.ndarray) -> tuple[np.ndarray]:
    check_finite("vitals", vitals)
    return (((vitals - 0.5) * 2.0).astype(np.float32),)  # [0, 1] -> [-1, 1]


VITALS_FILE = FileSpec("vitals", "vitals_{split}.npy", (N_VITALS,), ("float32",),
                       frozenset({"train", "val", "val_retrieval", "test"}), frozenset())
VITALS = TeacherSpec("vitals", VITALS_DIM, (VITALS_FILE,), load_vitals_net, preprocess_vitals,
                     lambda net, x: net(x), title="vitals")


@pytest.fixture(scope="module")
def vitals():
    """``vitals`` registered for this module's tests only."""
    register_teacher(VITALS)
    yield VITALS
    TEACHERS.pop("vitals")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "vitals.pth"
    torch.save(VitalsNet().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory, vitals, weights) -> Path:
    """A synthetic release (ECG and labs features included) plus raw vitals, whose features the library's
    extraction writes through the script's ``--teacher vitals=...``."""
    out = write_symile_release(tmp_path_factory.mktemp("symile") / "data_npy", n_train=32, n_val=16,
                               n_test_queries=10, cxr_size=40, write_teacher_features=True)
    rng = np.random.default_rng(0)
    for split in VITALS_FILE.splits:
        n = len(np.load(out / split / f"hadm_id_{split}.npy"))
        np.save(out / split / VITALS_FILE.filename(split), rng.uniform(size=(n, N_VITALS)).astype(np.float32))
    load_script("extract_teacher_features").main(["--data-root", str(out), "--teacher", f"vitals={weights}",
                                                  "--batch-size", "7", "--no-progress"])
    return out


@pytest.fixture(autouse=True)
def _fresh_validation_memory():
    ValidationCache.forget_all()
    yield
    ValidationCache.forget_all()


# ------------------------------------------------------------------------------------------ registry


def test_release_teachers_are_registered():
    for name, width in (("ecg", 1024), ("labs", 256)):
        spec = TEACHERS[name]
        assert (spec.width, spec.feature_file, spec.feature_key) == (width, f"{name}_features.npy",
                                                                     f"{name}_features")
    assert DEFAULT_TEACHERS == ("ecg", "labs") and resolve_teachers() == DEFAULT_TEACHERS
    assert (resolve_teachers(None, "ecg") == ("labs",)
            and resolve_teachers(["ecg", "labs"], "labs") == ("ecg",))
    with pytest.raises(KeyError, match="unknown teacher 'ekg'"):
        resolve_teachers(["ekg"])
    with pytest.raises(ValueError, match="a lowercase identifier other than"):
        TeacherSpec("cxr", 8, (VITALS_FILE,), load_vitals_net, preprocess_vitals, lambda net, x: net(x))


@pytest.mark.bad_input
@pytest.mark.parametrize("given", ["ecg", "labs"])
def test_teachers_given_as_one_string_are_refused(given):
    """Teachers given as a bare string (``teachers="labs"``) instead of a list → ValueError that says to pass
    a list, not "unknown teacher 'l'" (a string iterates by characters)."""
    with pytest.raises(ValueError, match=rf"teachers must be a list of names, e\.g\. \['{given}'\]"):
        resolve_teachers(given)


def test_register_once(vitals):
    assert TEACHERS["vitals"] is vitals and resolve_teachers(TEACHERS3) == TEACHERS3
    with pytest.raises(KeyError, match="registered twice"):
        register_teacher(vitals)


# --------------------------------------------------------------------------------- the toy teacher end to end


def test_extraction_writes_its_features(root, weights):
    net = load_vitals_net(weights)
    for split in ("train", "val", "test"):
        raw = np.load(root / split / f"vitals_{split}.npy")
        with torch.no_grad():
            want = net(torch.from_numpy(preprocess_vitals(raw)[0])).numpy()
        got = np.load(root / split / "vitals_features.npy")
        assert got.dtype == np.float32 and got.shape == (len(raw), VITALS_DIM)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    n_uni = len(np.load(root / "test_uni" / "hadm_id_test.npy"))
    np.testing.assert_array_equal(np.load(root / "test_uni" / "vitals_features.npy"),
                                  np.load(root / "test" / "vitals_features.npy")[:n_uni])
    # a second run through the library function skips the complete files
    results = extract_teacher_features(root, load_teachers({"vitals": weights}), ["train"], progress=False)
    assert [(r.key, r.status) for r in results] == [("vitals_features", "skipped")]


def test_bad_raw_rows_name_the_file(root, weights, tmp_path):
    bad = tmp_path / "data_npy"
    (bad / "train").mkdir(parents=True)
    for name in ("hadm_id_train.npy", "vitals_train.npy"):
        (bad / "train" / name).write_bytes((root / "train" / name).read_bytes())
    raw = np.load(bad / "train" / "vitals_train.npy")
    raw[5, 2] = np.inf
    np.save(bad / "train" / "vitals_train.npy", raw)
    with pytest.raises(SymileFileError, match=r"vitals_train\.npy: row 5 has NaN or inf"):
        extract_teacher_features(bad, load_teachers({"vitals": weights}), ["train"], progress=False)


def test_on_the_fly_equals_the_extracted_features(root, weights):
    dm = SymileMIMICDataModule(str(root), "cxr_raw_teachers", batch_size=4, num_workers=0,
                               train_transform="resize", img_size=32, pin_memory=False,
                               serve_teachers=["vitals"], teacher_weights={"vitals": str(weights)})
    dm.setup("validate")
    assert isinstance(dm.teachers, OnTheFlyTeachers) and dm.teachers.dims == {"vitals": VITALS_DIM}
    feats = torch.cat([dm.on_after_batch_transfer(b, 0)["teachers"]["vitals"] for b in dm.val_dataloader()])
    np.testing.assert_allclose(feats.numpy(), np.load(root / "val" / "vitals_features.npy"), rtol=1e-6,
                               atol=1e-6)


@pytest.fixture(scope="module")
def stage2_cli(tmp_path_factory, root, stage1_run):
    """A 2-step Stage 2 fit through Stage2_PACX.py from ECG, labs and vitals (the demo config: whitened
    teachers, 4 components each)."""
    from Stage2_PACX import main

    run = tmp_path_factory.mktemp("runs") / "stage2_vitals"
    return main(stage2_args(run, root, stage1_run, "--trainer.max_steps", "2", "--trainer.val_check_interval",
                            "2", "--model.init_args.teachers", "[ecg, labs, vitals]"))


def test_stage2_fit_distils_from_the_third_teacher(stage2_cli, root):
    module, run = stage2_cli.model, Path(stage2_cli.trainer.default_root_dir)
    assert module.teacher_names == TEACHERS3 and module.teacher_widths["vitals"] == VITALS_DIM
    assert (set(module.proj) == {"cxr", *TEACHERS3}
            and set(module.reg) == set(module.teacher_norms) == set(TEACHERS3))
    # the vitals heads received gradients in the fit: AdamW holds moments for
    # exactly the parameters it stepped
    state = stage2_cli.trainer.optimizers[0].state
    for head in (module.proj["vitals"], module.reg["vitals"]):
        for p in head.parameters():
            assert p.requires_grad and p in state and state[p]["exp_avg"].abs().sum() > 0
    # the whitening of its features was fitted on the train split
    vitals = np.load(root / "train" / "vitals_features.npy").astype(np.float64)
    np.testing.assert_allclose(module.teacher_norms["vitals"].mean.double().numpy(), vitals.mean(0),
                               atol=1e-6)

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert {"proj.vitals.1.weight", "reg.vitals.1.weight",
            "teacher_norms.vitals.proj"} <= set(ckpt["state_dict"])
    # the current layout passes as is
    assert upgrade_head_keys(ckpt["state_dict"], TEACHERS3) == ckpt["state_dict"]
    metrics = pd.read_csv(run / "metrics.csv")
    for name in ("train/clip_vitals_step", "train/reg_vitals_step", "val/clip_vitals", "val/reg_cos_vitals",
                 "val/split_top1_cxr_vitals", "val/infonce_frac_vitals", "val/clip_ecg"):
        assert metrics[name].notna().any(), name
    assert json.loads((run / "run.json").read_text())["status"] == "completed"


def test_alignment_probe_and_zero_shot_on_the_third_teacher(stage2_cli, root):
    run = Path(stage2_cli.trainer.default_root_dir)
    encoder = pacx.load_encoder(run).set_pool(stage2_pool(run))
    fit, test = (load_split(root, s, teachers=TEACHERS3) for s in ("train", "test_uni"))
    assert (fit.targets["vitals"] == "vitals_features"
            and fit.arrays["vitals_features"].shape == (32, VITALS_DIM))
    results = probe_encoder(encoder, fit, test, img_size=32, batch_size=8, drop_last_batch=None)
    assert set(results) == set(TEACHERS3)
    assert results["vitals"]["n_test"] == 10 and np.isfinite(results["vitals"]["r2"])

    heads = load_stage2_heads(run)
    assert set(heads) == {"cxr", *TEACHERS3}
    zs = zero_shot_retrieval(encoder, heads, load_split(root, "test", teachers=TEACHERS3), img_size=32)
    assert 0.0 <= zs["cxr_vitals_acc"] <= 1.0 and zs["chance"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"without the features of teacher\(s\) \['vitals'\]"):
        zero_shot_retrieval(encoder, heads, load_split(root, "test"), img_size=32)
