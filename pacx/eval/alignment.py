"""Alignment evaluation (docs/datasets.md#alignment): how much ECG / labs (any registered teacher)
information a frozen CXR encoder carries, measured by ridge probes onto the teacher embeddings.

Plain functions on arrays and encoders, in pipeline order: :func:`load_split`, :func:`extract_cxr_features`,
:func:`ridge_probe` (fit rows: :func:`fit_indices`, docs/design.md#alignment-fit-set),
:func:`alignment_metrics`, :func:`probe_encoder`. Zero-shot retrieval is :mod:`pacx.eval.zero_shot`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import Ridge, RidgeCV
from sklearn.metrics import r2_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from pacx.data.symile import resize_normalized
from pacx.data.symile_files import SymileFileError, open_npy, validate_split
from pacx.eval.retrieval import paired_topk
from pacx.teachers import DEFAULT_TEACHERS, resolve_teachers, teacher_spec

log = logging.getLogger(__name__)

EVAL_ITEM = "cxr"  # the item kind whose files (CXR, ids, labels) the evaluation reads, beside the teachers'
RECALL_KS = (1, 5, 10)
FIT_BATCH = 256  # the reference's probe loader batch (shuffle=True, drop_last=True)
PAPER_ALPHA = 10.0  # the reference's ridge penalty
# ``alpha="cv"``: the penalty chosen by efficient leave-one-out on the fit rows, over half decades 0.1 .. 1e6
CV_ALPHAS = tuple(10.0 ** (k / 2) for k in range(-2, 13))

# ------------------------------------------------------------------------------------------ data + features


@dataclass(frozen=True)
class SymileSplit:
    """Memory maps of one split, keyed as in ``pacx.data.symile_files.FILES``: ``cxr`` [N, 3, H, W],
    ``hadm_id`` [N], for retrieval splits ``label`` / ``label_hadm_id`` [N], and each teacher's features
    (``ecg_features`` [N, 1024], ``labs_features`` [N, 256], ...). ``targets`` maps teacher -> file key."""

    name: str
    paths: dict[str, Path]
    arrays: dict[str, np.ndarray]
    targets: dict[str, str]

    def __len__(self) -> int:
        return len(self.arrays["hadm_id"])


def load_split(
    root: str | Path, split: str, check_values: bool = False, teachers: Sequence[str] = DEFAULT_TEACHERS
) -> SymileSplit:
    """Validate and memory-map ``<root>/<split>/`` for the evaluation: the CXRs and the feature files of
    ``teachers`` (registered names).

    Layout is always checked (each file present, one N across files; teacher features of any width, 1024 /
    256 for the release teachers); ``check_values`` also scans for NaN/inf and non-binary labels (slow on
    the multi-GB CXR arrays).
    """
    if not Path(root).is_dir():
        raise FileNotFoundError(f"Symile-MIMIC root is not a directory: {root}")
    specs = [teacher_spec(t) for t in resolve_teachers(teachers)]
    paths = validate_split(root, split, EVAL_ITEM, check_values=check_values,
                           extra=[s.feature_spec for s in specs])
    return SymileSplit(split, paths, {key: open_npy(path) for key, path in paths.items()},
                       {s.name: s.feature_key for s in specs})


@torch.inference_mode()
def extract_cxr_features(
    encoder: nn.Module,
    cxr: np.ndarray,
    img_size: int = 224,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    rows: np.ndarray | None = None,
    source: str = "cxr array",
) -> np.ndarray:
    """CLS features, float32 [N, D], of ImageNet-normalised CXRs ``cxr`` [N, 3, H, W] (e.g. a memmap).

    docs/datasets.md#alignment: each image is only resized to ``img_size`` with antialias
    (``resize_normalized``), with no augmentation and no renormalisation; the encoder runs in eval mode
    without gradients. ``rows`` selects rows (in the given order) instead of all of them; if the encoder
    returns tokens [B, T, D], the CLS token (index 0) is taken. ``source`` names the array in errors.
    """
    if cxr.ndim != 4 or cxr.shape[1] != 3:
        raise SymileFileError(f"{source}: expected CXRs of shape [N, 3, H, W], got {list(cxr.shape)}")
    n = len(cxr) if rows is None else len(rows)
    resize = resize_normalized(img_size)
    was_training = encoder.training
    encoder.eval().to(device)
    out: list[torch.Tensor] = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        # slices read contiguously
        picked = cxr[start:stop] if rows is None else cxr[np.asarray(rows[start:stop])]
        batch = np.array(picked, dtype=np.float32)  # a copy out of the memmap
        feats = encoder(resize(torch.from_numpy(batch).to(device)))  # [B, D] (or [B, T, D])
        out.append((feats[:, 0] if feats.ndim == 3 else feats).float().cpu())
        if (start // batch_size) % 50 == 0:
            log.info("%s: features of %d / %d images", source, stop, n)
    encoder.train(was_training)
    if not out:
        return np.zeros((0, getattr(encoder, "embed_dim", 0)), np.float32)
    return torch.cat(out).numpy()


# ------------------------------------------------------------------------------------------ ridge probe


def fit_indices(n: int, drop_last_batch: int | None = FIT_BATCH, seed: int = 0) -> np.ndarray:
    """Sorted rows [n_fit] of an ``n``-row fit split that the probe is fitted on.

    ``drop_last_batch=b`` keeps ``(n // b) * b`` rows drawn by a seeded permutation, as the reference's
    shuffled ``drop_last`` loader of batch ``b`` does (9,984 of 10,000 for b = 256); ``None`` keeps all.
    """
    if drop_last_batch is None:
        return np.arange(n)
    if drop_last_batch < 1:
        raise ValueError(f"drop_last_batch must be a positive batch size or None, got {drop_last_batch}")
    keep = n // drop_last_batch * drop_last_batch
    if keep == 0:
        raise ValueError(f"drop_last_batch={drop_last_batch} keeps no rows of a {n}-row fit split; "
                         "use a smaller batch or None (all rows)")
    return np.sort(np.random.default_rng(seed).permutation(n)[:keep])


@dataclass(frozen=True)
class ProbeResult:
    """Ridge predictions ``pred`` [N_test, T], their :func:`alignment_metrics` and the fit-row count."""

    pred: np.ndarray
    metrics: dict[str, float]
    n_fit: int


def _check_pair(x: np.ndarray, y: np.ndarray, what: str) -> None:
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"{what}: expected features [N, D] and targets [N, T] with one N, "
                         f"got {list(x.shape)} and {list(y.shape)}")


def ridge_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    alpha: float | str = PAPER_ALPHA,
    drop_last_batch: int | None = FIT_BATCH,
    seed: int = 0,
) -> ProbeResult:
    """Fit ``StandardScaler → Ridge(alpha, solver="svd")`` from X [N, D] to Y [N, T], score on test.

    X is standardised with the fit rows' mean and std; Y is not standardised. The fit rows are
    :func:`fit_indices` ``(len(train_x), drop_last_batch, seed)``. ``alpha="cv"`` chooses one penalty for
    all targets from :data:`CV_ALPHAS` by efficient leave-one-out on the fit rows (``RidgeCV``: the mean
    squared error over the targets); the metrics name the penalty used as ``alpha``.
    """
    _check_pair(train_x, train_y, "train")
    _check_pair(test_x, test_y, "test")
    if train_x.shape[1] != test_x.shape[1] or train_y.shape[1] != test_y.shape[1]:
        raise ValueError(f"train and test widths differ: X {train_x.shape[1]} vs {test_x.shape[1]}, "
                         f"Y {train_y.shape[1]} vs {test_y.shape[1]}")
    if alpha == "cv":
        ridge = RidgeCV(alphas=CV_ALPHAS)
    elif isinstance(alpha, (int, float)) and alpha > 0:
        ridge = Ridge(alpha=float(alpha), solver="svd")
    else:
        raise ValueError(f"alpha must be a positive number or 'cv', got {alpha!r}")
    rows = fit_indices(len(train_x), drop_last_batch, seed)
    probe = make_pipeline(StandardScaler(), ridge)
    probe.fit(train_x[rows], train_y[rows])
    chosen = float(ridge.alpha_ if alpha == "cv" else alpha)
    if alpha == "cv" and chosen in (CV_ALPHAS[0], CV_ALPHAS[-1]):
        log.warning("leave-one-out chose alpha %g, at the end of the grid %g .. %g", chosen, CV_ALPHAS[0],
                    CV_ALPHAS[-1])
    pred = np.asarray(probe.predict(test_x))
    return ProbeResult(pred, {**alignment_metrics(pred, test_y), "alpha": chosen}, len(rows))


# ------------------------------------------------------------------------------------------ metrics


def cosine_rows(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Cosine of matching rows of ``a`` and ``b`` [N, T] -> [N] (float64; norms clamped at ``eps``)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.maximum(np.linalg.norm(a, axis=1), eps) * np.maximum(np.linalg.norm(b, axis=1), eps)
    return (a * b).sum(axis=1) / norms


def centred_cosine(pred: np.ndarray, y: np.ndarray) -> float:
    """Mean cosine after subtracting the mean of ``y`` [N, T] (the test-set mean) from both."""
    mu = np.asarray(y, np.float64).mean(axis=0)
    return float(cosine_rows(pred - mu, y - mu).mean())


def permutation_baseline(y: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Mean cosine between ``y`` [N, T] and its rows under one ``default_rng(seed)`` permutation,
    raw and centred (both with the same permutation): what an uninformative probe would score."""
    perm = np.random.default_rng(seed).permutation(len(y))
    yc = np.asarray(y, np.float64) - np.asarray(y, np.float64).mean(axis=0)
    return {"baseline_cos": float(cosine_rows(y, y[perm]).mean()),
            "baseline_cos_centred": float(cosine_rows(yc, yc[perm]).mean())}


def recall_at_k(pred: np.ndarray, y: np.ndarray, ks: tuple[int, ...] = RECALL_KS) -> dict[int, float]:
    """R@k in percent: query i hits if its own row is among the k most cosine-similar rows of ``y``.

    Similarity = L2-normalised ``pred`` [N, T] times L2-normalised ``y``ᵀ, [N, N]; k is capped at N. Rows
    tied with the own row (duplicated targets, a constant prediction) count as a random order of the tied
    rows (:func:`pacx.eval.retrieval.expected_hits`); the reference breaks them by ``argpartition`` order.
    """
    p, t = (torch.tensor(np.asarray(a, np.float64)) for a in (pred, y))
    hits = paired_topk(p, t, ks)
    return {k: float(100.0 * v) for k, v in hits.items()}


def duplicate_rows(y: np.ndarray) -> int:
    """How many rows of ``y`` [N, T] repeat an earlier row exactly (N minus the unique-row count)."""
    return int(len(y) - len(np.unique(np.asarray(y), axis=0)))


def alignment_metrics(pred: np.ndarray, y: np.ndarray, seed: int = 0) -> dict[str, float]:
    """All docs/datasets.md#alignment numbers for predictions ``pred`` of targets ``y`` [N, T]; R@k in
    percent."""
    metrics = {
        "r2": float(r2_score(y, pred, multioutput="uniform_average")),
        "cos": float(cosine_rows(pred, y).mean()),
        "cos_centred": centred_cosine(pred, y),
        **{f"recall@{k}": v for k, v in recall_at_k(pred, y).items()},
        **permutation_baseline(y, seed),
        "duplicate_rows": duplicate_rows(y),
        "n_test": len(y),
    }
    return metrics


def probe_encoder(
    encoder: nn.Module,
    fit: SymileSplit,
    test: SymileSplit,
    img_size: int = 224,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    alpha: float | str = PAPER_ALPHA,
    drop_last_batch: int | None = FIT_BATCH,
    seed: int = 0,
    cv_alpha: bool = False,
) -> dict[str, dict[str, float]]:
    """docs/datasets.md#alignment for one encoder: features of both splits once, then one ridge probe per
    target.

    Returns ``{target: metrics + n_fit}`` for every teacher of the splits (``fit.targets`` =
    ``test.targets``); with ``cv_alpha``, each target's metrics also hold ``cv``: those of a second probe
    whose penalty leave-one-out chose (:func:`ridge_probe` ``alpha="cv"``) on the same features.
    """
    if fit.targets != test.targets:
        raise ValueError(f"the fit and test splits hold different teachers: {list(fit.targets)} vs "
                         f"{list(test.targets)}")
    feats = {s.name: extract_cxr_features(encoder, s.arrays["cxr"], img_size, batch_size, device,
                                          source=str(s.paths["cxr"])) for s in (fit, test)}
    results = {}
    for target, key in fit.targets.items():
        data = (feats[fit.name], np.asarray(fit.arrays[key], np.float32), feats[test.name],
                np.asarray(test.arrays[key], np.float32))
        res = ridge_probe(*data, alpha, drop_last_batch, seed)
        results[target] = {**res.metrics, "n_fit": res.n_fit}
        if cv_alpha:
            cv = ridge_probe(*data, "cv", drop_last_batch, seed)
            results[target]["cv"] = cv.metrics
            log.info("%s probe, alpha %g by leave-one-out: R² %.4f", target, cv.metrics["alpha"],
                     cv.metrics["r2"])
        log.info("%s probe: R² %.4f, cos %.4f, centred cos %.4f, R@1 %.2f%%", target, res.metrics["r2"],
                 res.metrics["cos"], res.metrics["cos_centred"], res.metrics["recall@1"])
    return results
