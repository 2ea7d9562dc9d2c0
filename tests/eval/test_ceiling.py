"""The raw-pixel ceiling: sklearn's pipeline on the evaluation-transformed pixels, reproducible for a seed."""

import json

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from pacx.data.prepare import run_converter
from pacx.data.stage3 import BenchmarkDataModule
from pacx.eval.ceiling import pixel_ceiling, split_pixels
from pacx.testing.benchmarks import RELEASE_WRITERS
from tests.helpers import load_script


@pytest.fixture(scope="module")
def chexchonet(tmp_path_factory):
    base = tmp_path_factory.mktemp("chexchonet")
    raw = RELEASE_WRITERS["chexchonet"](base / "raw", 0, n_patients=60)
    run_converter("chexchonet", raw, base / "manifests")
    return raw, base / "manifests"


def _dm(raw, manifests):
    return BenchmarkDataModule("chexchonet", root=str(raw), manifest_dir=str(manifests), img_size=32,
                               num_workers=0, pin_memory=False)


def test_ceiling_equals_an_independent_fit_and_is_reproducible(chexchonet):
    raw, manifests = chexchonet
    first = pixel_ceiling(_dm(raw, manifests), pca=8, seed=3)
    assert pixel_ceiling(_dm(raw, manifests), pca=8, seed=3) == first
    x_tr, y_tr = split_pixels(_dm(raw, manifests), "train")
    x_te, y_te = split_pixels(_dm(raw, manifests), "test")
    assert x_tr.shape[1] == 32 * 32 and y_tr.shape == (len(x_tr), 1)
    scaler = StandardScaler().fit(x_tr)
    pca = PCA(8, svd_solver="randomized", random_state=3).fit(scaler.transform(x_tr))
    clf = LogisticRegression(max_iter=5000).fit(pca.transform(scaler.transform(x_tr)), y_tr[:, 0])
    expected = roc_auc_score(y_te[:, 0], clf.predict_proba(pca.transform(scaler.transform(x_te)))[:, 1])
    assert first["auroc"] == pytest.approx(expected, abs=1e-12)
    assert first["n_train"] == len(x_tr) and first["n_test"] == len(x_te) and first["pca"] == 8


def test_script_prints_and_writes_json(chexchonet, tmp_path, capsys):
    raw, manifests = chexchonet
    out = tmp_path / "ceiling.json"
    load_script("pixel_ceiling").main(["--benchmark", "chexchonet", "--root", str(raw), "--manifest-dir",
                                       str(manifests), "--img-size", "32", "--pca", "8", "--seed", "3",
                                       "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["auroc"] == pytest.approx(pixel_ceiling(_dm(raw, manifests), pca=8, seed=3)["auroc"])
    assert f"AUROC {saved['auroc']:.4f}" in capsys.readouterr().out
    assert np.isfinite(saved["auroc"]) and 0.0 <= saved["auroc"] <= 1.0
