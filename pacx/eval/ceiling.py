"""The raw-pixel ceiling of a classification benchmark: logistic regression on the pixels themselves.

Each split's images go through the Stage 3 evaluation transform (first channel, flattened); scikit-learn's
per-pixel standardisation → PCA (``pca`` components, randomised, seeded by ``seed``) → L2 logistic regression
is fitted on ``train`` and scored on ``test`` (binary: AUROC; multi-output: macro AUROC). An encoder whose
probe sits far below this number has lost information the images carry.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

log = logging.getLogger(__name__)


def split_pixels(datamodule, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(pixels float32 [N, H·W], labels [N] or [N, K]) of one split under the evaluation transform."""
    ds = datamodule.build_dataset(split, augment=False)
    images = torch.stack([ds[i][0][0] for i in range(len(ds))])  # [N, H, W], first channel
    return images.flatten(1).numpy(), np.asarray(ds.labels)


def macro_auroc(y: np.ndarray, scores: np.ndarray) -> float:
    """AUROC of one binary column, or the macro mean over the columns / one-vs-rest classes."""
    if y.ndim == 1 and scores.ndim == 1:
        return float(roc_auc_score(y, scores))
    return float(roc_auc_score(y, scores, average="macro", multi_class="ovr"))


def pixel_ceiling(datamodule, pca: int = 50, seed: int = 0, C: float = 1.0) -> dict:
    """Fit the pixel probe on ``train`` and score ``test``; returns ``{"auroc", "n_train", "n_test",
    ...}``."""
    x_train, y_train = split_pixels(datamodule, "train")
    x_test, y_test = split_pixels(datamodule, "test")
    components = min(pca, *x_train.shape)
    y_fit = y_train[:, 0] if y_train.ndim == 2 and y_train.shape[1] == 1 else y_train
    y_eval = y_test[:, 0] if y_test.ndim == 2 and y_test.shape[1] == 1 else y_test
    if y_fit.ndim == 2:
        raise ValueError("pixel_ceiling takes binary or multiclass labels; score multilabel tasks per label")
    probe = make_pipeline(StandardScaler(), PCA(components, svd_solver="randomized", random_state=seed),
                          LogisticRegression(C=C, max_iter=5000))
    probe.fit(x_train, y_fit)
    proba = probe.predict_proba(x_test)
    scores = proba[:, 1] if proba.shape[1] == 2 else proba
    auroc = macro_auroc(y_eval, scores)
    log.info("%s pixel ceiling: AUROC %.4f (PCA %d, seed %d; %d train / %d test images)",
             datamodule.spec.name, auroc, components, seed, len(x_train), len(x_test))
    return {"benchmark": datamodule.spec.name, "auroc": auroc, "pca": components, "seed": seed, "C": C,
            "n_train": len(x_train), "n_test": len(x_test), "img_size": int(datamodule.hparams.img_size)}
