"""What the demo phantom lets a CXR encoder reach on the CXR-labs alignment metrics.

From the phantom's ground truth (``<data>/truth/symile.csv``) and its Symile release: how much of the
factors the CXR and the labs share (cardiac size, fluid) pixels or an encoder's features reveal, and what a
CXR revealing them that well allows: mutual information, InfoNCE floor, zero-shot ceiling, ridge R².
``python -m pacx.demo.bounds OUT/data [--encoder NAME=PATH ...]``; how to read it: docs/method.md#demo-scale.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.cross_decomposition import CCA
from sklearn.linear_model import Ridge, RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pacx.data.symile_files import SymileFileError
from pacx.demo.phantom.generate import TRUTH_DIR
from pacx.demo.phantom.releases import RELEASES
from pacx.eval.alignment import extract_cxr_features, load_split, ridge_probe
from pacx.eval.zero_shot import retrieval_groups
from pacx.models.load import load_encoder
from pacx.utils import write_json_atomic

log = logging.getLogger(__name__)

SHARED = ("cardiac_size", "fluid")  # the latent factors both the phantom CXR and its labs show
READOUT_ALPHAS = np.logspace(-2, 4, 13)


def load_truth(path: str | Path) -> pd.DataFrame:
    """The phantom's Symile ground truth indexed by ``hadm_id``; an error names a missing file or column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"phantom ground truth not found: {path} (see python -m pacx.demo.phantom)")
    table = pd.read_csv(path)
    missing = sorted({"hadm_id", *SHARED} - set(table.columns))
    if missing:
        raise KeyError(f"{path}: missing column(s) {missing}")
    return table.set_index("hadm_id")


def latent(truth: pd.DataFrame, hadm_id: np.ndarray, source: str) -> np.ndarray:
    """The shared factors [N, 2] of admissions ``hadm_id``; an admission without ground truth is an error."""
    absent = np.setdiff1d(hadm_id, truth.index.to_numpy())
    if absent.size:
        raise KeyError(f"{source}: {absent.size} admission(s) have no ground truth, e.g. hadm_id {absent[0]}")
    return truth.loc[hadm_id, list(SHARED)].to_numpy(np.float64)


def readout_r2(x_fit: np.ndarray, t_fit: np.ndarray, x_eval: np.ndarray, t_eval: np.ndarray) -> np.ndarray:
    """Held-out R² [K] of each factor ``t`` [N, K] from features ``x`` [N, D]: standardised ridge, alpha by
    leave-one-out on the fit rows, the fit rows' mean as the baseline."""
    probe = make_pipeline(StandardScaler(), RidgeCV(alphas=READOUT_ALPHAS)).fit(x_fit, t_fit)
    err = ((probe.predict(x_eval) - t_eval) ** 2).sum(0)
    return 1.0 - err / ((t_eval - t_fit.mean(0)) ** 2).sum(0)


def view_bounds(r2: np.ndarray, z: dict[str, np.ndarray], labs: dict[str, np.ndarray], groups: np.ndarray,
                batch: int = 64, draws: int = 20, seed: int = 0) -> dict[str, float]:
    """Bounds for a CXR that shows the shared factors with R² ``r2`` [2] (true factors ``z`` plus independent
    noise): mutual information with the labs features (Gaussian, canonical correlations on ``val``), the
    InfoNCE floor at ``batch`` as a fraction of log(batch), and the Bayes 1-of-G top-1 on the ``test``
    ``groups`` [Q, G] under a linear-Gaussian model of the factors given the labs fitted on ``train``.
    ``z``: factors [N, 2] of ``train``, ``val`` and the test ``query`` rows; ``labs``: features of ``train``,
    ``val`` and ``test``. Averaged over ``draws`` noise draws."""
    measured = np.asarray(r2, np.float64)
    r2 = np.clip(measured, 1e-3, 1.0)  # a readout at or below the mean reveals (almost) nothing
    scale = np.sqrt((1.0 - r2) / r2)
    rng = np.random.default_rng(seed)
    mis, hits = [], []
    for _ in range(draws):
        view = {k: v + scale * rng.standard_normal(v.shape) for k, v in z.items()}
        model = Ridge(alpha=10.0).fit(labs["train"], view["train"])
        pred_val = model.predict(labs["val"])
        a, b = CCA(len(r2)).fit(pred_val, view["val"]).transform(pred_val, view["val"])
        rho = np.array([abs(np.corrcoef(a[:, i], b[:, i])[0, 1]) for i in range(len(r2))])
        mis.append(-0.5 * np.log1p(-np.minimum(rho, 0.999) ** 2).sum())
        precision = np.linalg.inv(np.atleast_2d(np.cov(view["train"] - model.predict(labs["train"]),
                                                       rowvar=False)))
        diff = view["query"][:, None] - model.predict(labs["test"])[groups]  # [Q, G, 2]
        score = -np.einsum("qgi,ij,qgj->qg", diff, precision, diff)
        hits.append(float((score[:, 1:] < score[:, :1]).all(axis=1).mean()))
    mi = float(np.mean(mis))
    return {**{f"r2_{name}": float(v) for name, v in zip(SHARED, measured)}, "mi_nats": mi,
            "infonce_frac_floor": max(0.0, 1.0 - mi / math.log(batch)),
            "zero_shot_top1": float(np.mean(hits)), "chance": 1.0 / groups.shape[1]}


def oracle_ridge_r2(z_fit: np.ndarray, labs_fit: np.ndarray, z_test: np.ndarray, labs_test: np.ndarray,
                    width: int = 128, seed: int = 0) -> dict[str, float]:
    """Alignment ridge R² (the paper's probe, docs/datasets.md#alignment) of an encoder that holds the true
    shared factors exactly: alone, and as 2 of ``width`` features whose others carry nothing."""
    rng = np.random.default_rng(seed)

    def pad(z: np.ndarray) -> np.ndarray:
        return np.hstack([z, rng.standard_normal((len(z), width - z.shape[1]))])

    alone = ridge_probe(z_fit, labs_fit, z_test, labs_test, drop_last_batch=None).metrics["r2"]
    padded = ridge_probe(pad(z_fit), labs_fit, pad(z_test), labs_test, drop_last_batch=None).metrics["r2"]
    return {"factors_only": float(alone), f"factors_in_{width}": float(padded)}


def phantom_bounds(data: str | Path, encoders: dict[str, str] | None = None, img_size: int = 64,
                   batch: int = 64, draws: int = 20, seed: int = 0) -> dict:
    """All bounds for the phantom at ``data`` (``python -m pacx.demo.phantom --out DATA``; the demo's
    ``OUT/data``), whose Symile splits hold the labs teacher's features: for the true factors, for what
    the raw pixels reveal, and for each of ``encoders`` (name -> anything ``pacx.load_encoder`` reads)."""
    root = Path(data) / RELEASES["symile"].subdir
    truth = load_truth(Path(data) / TRUTH_DIR / "symile.csv")
    splits = {k: load_split(root, k, teachers=["labs"]) for k in ("train", "val", "test", "test_uni")}
    hadm = {k: np.asarray(s.arrays["hadm_id"]) for k, s in splits.items()}
    labs = {k: np.asarray(s.arrays[s.targets["labs"]], np.float64) for k, s in splits.items()}
    test = splits["test"]
    if "label" not in test.arrays or "label_hadm_id" not in test.arrays:
        raise SymileFileError(f"{root / 'test'}: no label / label_hadm_id file; the bounds need the "
                              "retrieval split")
    groups = retrieval_groups(np.asarray(test.arrays["label"]), np.asarray(test.arrays["label_hadm_id"]),
                              source=f"{test.paths['label']}")
    z = {k: latent(truth, hadm[k], str(root / k)) for k in ("train", "val", "test_uni")}
    z["query"] = latent(truth, hadm["test"][groups[:, 0]], str(root / "test"))
    cxr = {k: splits[k].arrays["cxr"] for k in ("train", "val")}

    def bounds(r2: np.ndarray) -> dict[str, float]:
        return view_bounds(r2, z, labs, groups, batch, draws, seed)

    def readout(features: dict[str, np.ndarray]) -> np.ndarray:
        return readout_r2(features["train"], z["train"], features["val"], z["val"])

    pixels = {k: np.asarray(v[:, 0], np.float32).reshape(len(v), -1) for k, v in cxr.items()}
    result = {"shared_factors": list(SHARED), "batch": batch, "n_queries": int(groups.shape[0]),
              "true_factors": bounds(np.ones(len(SHARED))), "raw_pixels": bounds(readout(pixels)),
              "ridge_r2_oracle": oracle_ridge_r2(z["train"], labs["train"], z["test_uni"], labs["test_uni"],
                                                 seed=seed),
              "encoders": {}}
    for name, path in (encoders or {}).items():
        enc = load_encoder(path)
        feats = {k: extract_cxr_features(enc, v, img_size, source=str(root / k)) for k, v in cxr.items()}
        r2 = readout(feats)
        log.info("%s: R² of %s from its features: %s", name, " / ".join(SHARED), np.round(r2, 3))
        result["encoders"][name] = bounds(r2)
    return result


def _encoder_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--encoder {text!r}: expected NAME=PATH")
    return name, path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pacx.demo.bounds", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="the phantom directory with teacher features (a demo's OUT/data)")
    parser.add_argument("--encoder", action="append", type=_encoder_arg, default=[],
                        help="NAME=PATH of encoder weights (an export or a run), repeatable")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64, help="the Stage 2 batch of the InfoNCE floor")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = phantom_bounds(args.data, dict(args.encoder), args.img_size, args.batch, args.draws, args.seed)
    if args.json:
        write_json_atomic(args.json, result)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
