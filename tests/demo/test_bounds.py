"""The phantom's alignment bounds (``pacx.demo.bounds``): the mutual information equals its closed form on a
Gaussian model, the zero-shot ceiling orders with what the CXR reveals, the ridge oracle equals sklearn's
probe computed here, and a phantom tree gives a reproducible result and clear errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pacx.demo.bounds import SHARED, main, oracle_ridge_r2, phantom_bounds, readout_r2, view_bounds
from pacx.demo.phantom.generate import TRUTH_DIR, resolve_sizes
from pacx.demo.phantom.releases import RELEASES, write_symile
from pacx.eval.alignment import extract_cxr_features
from pacx.models.load import load_encoder

LABS_NOISE = 0.5  # SD of the noise on each factor in the synthetic labs features


def gaussian_world(n: int, queries: int, group: int = 10, seed: int = 100):
    """Independent standard-normal factors z [., 2]; labs features = (z + LABS_NOISE * noise, 6 noise dims).
    ``seed`` differs from the bounds' own (0), whose noise draws would otherwise repeat the factors."""
    rng = np.random.default_rng(seed)

    def labs_of(z: np.ndarray) -> np.ndarray:
        return np.hstack([z + LABS_NOISE * rng.standard_normal(z.shape), rng.standard_normal((len(z), 6))])

    z = {k: rng.standard_normal((n, 2)) for k in ("train", "val")}
    z_test = rng.standard_normal((queries * group, 2))
    groups = np.arange(queries * group).reshape(queries, group)  # column 0 is each query's own row
    labs = {k: labs_of(v) for k, v in z.items()} | {"test": labs_of(z_test)}
    return {**z, "query": z_test[groups[:, 0]]}, labs, groups


def test_mutual_information_matches_closed_form():
    """view_i = z_i + noise with R² r_i and labs_i = z_i + noise (SD s): the canonical correlations are
    sqrt(r_i / (1 + s²)), so the MI is -1/2 sum log(1 - r_i / (1 + s²)); the InfoNCE floor is
    1 - MI / log B."""
    z, labs, groups = gaussian_world(n=6000, queries=400)
    r2 = np.array([0.8, 0.5])
    got = view_bounds(r2, z, labs, groups, batch=64, draws=5)
    expected = -0.5 * np.log1p(-r2 / (1 + LABS_NOISE ** 2)).sum()
    print(f"\nMI {got['mi_nats']:.4f} vs closed form {expected:.4f}")
    assert got["mi_nats"] == pytest.approx(expected, abs=0.02)
    assert got["infonce_frac_floor"] == pytest.approx(1 - got["mi_nats"] / math.log(64))
    assert (got["r2_cardiac_size"], got["r2_fluid"]) == (0.8, 0.5)
    assert got["chance"] == 0.1


def test_zero_shot_ceiling_orders_with_what_the_cxr_reveals():
    z, labs, groups = gaussian_world(n=3000, queries=400, seed=101)
    top1 = {r: view_bounds(np.array([r, r]), z, labs, groups, draws=3)["zero_shot_top1"]
            for r in (1.0, 0.5, 0.01)}
    print("\nzero-shot ceiling by R²:", top1)
    assert top1[1.0] > top1[0.5] > top1[0.01]
    assert abs(top1[0.01] - 0.1) < 0.04  # a CXR that reveals nothing is at chance
    assert top1[1.0] > 0.5


def test_same_seed_same_bounds_and_negative_readouts_are_kept():
    z, labs, groups = gaussian_world(n=500, queries=50, seed=102)
    a = view_bounds(np.array([-0.2, 0.3]), z, labs, groups, draws=2, seed=3)
    assert a == view_bounds(np.array([-0.2, 0.3]), z, labs, groups, draws=2, seed=3)
    assert a["r2_cardiac_size"] == -0.2  # reported as measured; the bound treats it as (almost) nothing


def test_oracle_ridge_r2_is_the_papers_probe():
    rng = np.random.default_rng(0)
    z_fit, z_test = rng.standard_normal((800, 2)), rng.standard_normal((200, 2))
    w = rng.standard_normal((2, 12))
    y_fit = z_fit @ w + 2.0 * rng.standard_normal((800, 12))
    y_test = z_test @ w + 2.0 * rng.standard_normal((200, 12))
    got = oracle_ridge_r2(z_fit, y_fit, z_test, y_test, width=64)
    probe = make_pipeline(StandardScaler(), Ridge(alpha=10.0, solver="svd")).fit(z_fit, y_fit)
    assert got["factors_only"] == pytest.approx(r2_score(y_test, probe.predict(z_test)), abs=1e-9)
    assert got["factors_in_64"] < got["factors_only"]  # 62 uninformative features cost variance


def test_readout_r2_of_an_exact_linear_view_is_one():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 5))
    t = x[:, :2] @ np.array([[1.0, 0.5], [-0.5, 2.0]])
    r2 = readout_r2(x[:200], t[:200], x[200:], t[200:])
    assert r2 == pytest.approx([1.0, 1.0], abs=1e-3)


# ------------------------------------------------------------------------------------------ phantom tree


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory):
    """The quick phantom's Symile release and truth, with labs features: a fixed random map of the latent
    plus noise (as the writer's own teacher stand-ins)."""
    data = tmp_path_factory.mktemp("bounds")
    root = data / RELEASES["symile"].subdir
    truth = write_symile(root, np.random.SeedSequence(0), resolve_sizes("quick"))
    (data / TRUTH_DIR).mkdir()
    truth.to_csv(data / TRUTH_DIR / "symile.csv", index=False)
    latents = truth.set_index("hadm_id")[["cardiac_size", "lv_hypertrophy", "fluid", "heart_rate", "renal"]]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 16))
    for split in ("train", "val", "test", "test_uni"):
        hadm = np.load(next((root / split).glob("hadm_id_*.npy")))
        feats = latents.loc[hadm].to_numpy() @ w + 0.5 * rng.standard_normal((len(hadm), 16))
        np.save(root / split / "labs_features.npy", feats.astype(np.float32))
    return data


def test_phantom_bounds_reproducible_with_every_section(phantom_data, tmp_path, capsys):
    a = phantom_bounds(phantom_data, draws=2)
    assert a["shared_factors"] == list(SHARED)
    assert a["n_queries"] == resolve_sizes("quick").symile_test_queries
    for section in ("true_factors", "raw_pixels"):
        b = a[section]
        assert np.isfinite(list(b.values())).all()
        assert b["infonce_frac_floor"] == pytest.approx(1 - b["mi_nats"] / math.log(64))
    assert a["true_factors"]["r2_cardiac_size"] == 1.0 and a["true_factors"]["mi_nats"] > 0.1
    assert set(a["ridge_r2_oracle"]) == {"factors_only", "factors_in_128"}
    assert a["encoders"] == {}
    out = tmp_path / "bounds.json"
    assert main([str(phantom_data), "--draws", "2", "--json", str(out)]) == 0
    assert json.loads(out.read_text()) == a  # the CLI writes what the function returns, every time
    capsys.readouterr()


def test_missing_truth_and_unknown_admission_are_named(phantom_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="truth"):
        phantom_bounds(tmp_path, draws=1)
    broken = tmp_path / "broken"
    (broken / TRUTH_DIR).mkdir(parents=True)
    (broken / "symile").symlink_to(phantom_data / "symile")
    truth = pd.read_csv(phantom_data / TRUTH_DIR / "symile.csv")
    truth.iloc[1:].to_csv(broken / TRUTH_DIR / "symile.csv", index=False)  # the first admission is gone
    with pytest.raises(KeyError, match=f"hadm_id {truth['hadm_id'].iloc[0]}"):
        phantom_bounds(broken, draws=1)
    truth.drop(columns="fluid").to_csv(broken / TRUTH_DIR / "symile.csv", index=False)
    with pytest.raises(KeyError, match="fluid"):
        phantom_bounds(broken, draws=1)


def test_encoder_readout_is_the_ridge_on_its_cls_features(phantom_data, stage1_run):
    """An encoder's entry is view_bounds at the R² that a ridge on its own CLS features reaches."""
    root = phantom_data / RELEASES["symile"].subdir
    got = phantom_bounds(phantom_data, {"mae": str(stage1_run)}, img_size=32, draws=2)["encoders"]["mae"]
    enc = load_encoder(stage1_run)
    truth = pd.read_csv(phantom_data / TRUTH_DIR / "symile.csv").set_index("hadm_id")
    x, t = {}, {}
    for split in ("train", "val"):
        x[split] = extract_cxr_features(enc, np.load(root / split / f"cxr_{split}.npy"), 32)
        t[split] = truth.loc[np.load(root / split / f"hadm_id_{split}.npy"), list(SHARED)].to_numpy()
    expected = readout_r2(x["train"], t["train"], x["val"], t["val"])
    assert [got["r2_cardiac_size"], got["r2_fluid"]] == pytest.approx(expected.tolist(), abs=1e-9)
    assert np.isfinite(list(got.values())).all()
