"""Learning-health signals of self-supervised and contrastive training: plain tensor / array functions.

:func:`effective_rank` (RankMe, Garrido et al., ICML 2023), :func:`infonce_chance` / :func:`chance_fraction`
(an InfoNCE loss against ``log N``), :func:`embedding_std`, :class:`CollapseMonitor` (warnings, once per
reason), :func:`linear_probe_auroc` and :func:`preserved_rng`. :mod:`pacx.lit.health` feeds them from
Lightning callbacks; nothing here imports Lightning (docs/method.md#learning-health).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

log = logging.getLogger(__name__)

RANKME_EPS = 1e-7  # the paper's epsilon added to each normalised singular value


def effective_rank(x: torch.Tensor, eps: float = RANKME_EPS) -> float:
    """RankMe of ``x`` [N, D]: ``exp(-Σ p_k log p_k)`` with ``p_k = σ_k / Σσ + eps``, in float64.

    As in the paper, the singular values are those of the embedding matrix as given: not centred and not
    normalised, so a common offset of all rows counts as one direction. k equal singular values give k;
    an all-zero matrix gives 0.
    """
    if x.ndim != 2 or min(x.shape) == 0:
        raise ValueError(f"effective_rank needs a non-empty [N, D] matrix, got shape {list(x.shape)}")
    s = torch.linalg.svdvals(x.detach().to(device="cpu", dtype=torch.float64))  # [min(N, D)]
    total = s.sum()
    if total == 0:
        return 0.0
    p = s / total + eps
    return float(torch.exp(-(p * p.log()).sum()))


def infonce_chance(n_global: int) -> float:
    """``log(n_global)``: the InfoNCE of a query whose ``n_global`` keys all score the same."""
    if n_global < 2:
        raise ValueError(f"InfoNCE needs at least 2 keys per query, got n_global={n_global}")
    return math.log(n_global)


def chance_fraction(loss: float, n_global: int) -> float:
    """``loss / log(n_global)``: 1 at chance, 0 for a perfect (unsmoothed) match."""
    return float(loss) / infonce_chance(n_global)


def embedding_std(x: torch.Tensor) -> float:
    """Mean over dimensions of the std over rows of the L2-normalised ``x`` [N, D] (float64).

    Isotropic unit vectors give about ``1/sqrt(D)``; all rows pointing the same way give 0.
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"embedding_std needs an [N, D] matrix with N >= 2, got shape {list(x.shape)}")
    return float(F.normalize(x.detach().to(torch.float64), dim=-1).std(dim=0).mean())


class CollapseMonitor:
    """Warns, once per reason, when a run stops learning; fed one reading per validation epoch.

    Checked only from epoch index ``warmup_epochs`` on (i.e. after that many epochs of training):
    during the learning-rate warmup, still-random projection heads legitimately score near chance.

    Reasons:
        ``chance_<pair>``: the epoch's InfoNCE of that pair is at least ``chance_fraction`` (0.98, i.e.
            within 2 %) of ``log N``.
        ``std``: :func:`embedding_std` below ``std_factor / sqrt(D)`` (0.1). The per-dimension variances
            of unit vectors sum to ``1 - |mean|^2`` <= 1, so the mean std is at most ``sqrt(1/D)``, reached
            when isotropic; 10x below that needs all rows within a narrow cone or spread over under about
            1 % of the dimensions.
        ``rank``: :func:`effective_rank` below ``max(min_rank, rank_fraction * D)`` (2 and 0.01). Under
            1 % of the dimensions used is dimensional collapse at any width; the floor of 2 keeps the check
            meaningful for narrow spaces (rank ~1 is complete collapse: one direction for every row).
        ``nonfinite``: any reading is NaN or infinite.

    Each warning names the run, the epoch and the numbers, goes to ``logging`` and is returned by
    :meth:`update`.
    """

    def __init__(
        self,
        run_name: str,
        warmup_epochs: int = 2,
        chance_fraction: float = 0.98,
        std_factor: float = 0.1,
        rank_fraction: float = 0.01,
        min_rank: float = 2.0,
    ) -> None:
        self.run_name = run_name
        self.warmup_epochs = warmup_epochs
        self.chance_fraction = chance_fraction
        self.std_factor = std_factor
        self.rank_fraction = rank_fraction
        self.min_rank = min_rank
        self.warned: set[str] = set()

    def std_threshold(self, dim: int) -> float:
        return self.std_factor / math.sqrt(dim)

    def rank_threshold(self, dim: int) -> float:
        return max(self.min_rank, self.rank_fraction * dim)

    def update(
        self, epoch: int, infonce_fraction: Mapping[str, float], emb_std: float, rank: float, dim: int
    ) -> list[str]:
        """Check one epoch; returns the warnings produced now (already logged), empty when healthy."""
        if epoch < self.warmup_epochs:
            return []
        head = f"{self.run_name}: epoch {epoch}:"
        found: dict[str, str] = {}
        numbers = {**{f"infonce_frac_{p}": v for p, v in infonce_fraction.items()}, "emb_std": emb_std,
                   "effective_rank": rank}
        bad = {k: v for k, v in numbers.items() if not math.isfinite(v)}
        if bad:
            found["nonfinite"] = f"{head} non-finite health readings {bad}"
        for pair, frac in infonce_fraction.items():
            if frac >= self.chance_fraction:
                found[f"chance_{pair}"] = (
                    f"{head} validation InfoNCE cxr-{pair} is {frac:.3f} x log(N) "
                    f"(>= {self.chance_fraction}): the contrastive term is at chance, the pair is not learned"
                )
        if emb_std < self.std_threshold(dim):
            found["std"] = (
                f"{head} embeddings collapsed: mean per-dim std of the L2-normalised embeddings is "
                f"{emb_std:.3g} < {self.std_threshold(dim):.3g} ({self.std_factor}/sqrt({dim}); "
                f"isotropic ~{1 / math.sqrt(dim):.3g})"
            )
        if rank < self.rank_threshold(dim):
            found["rank"] = (
                f"{head} dimensional collapse: effective rank (RankMe) {rank:.2f} "
                f"< {self.rank_threshold(dim):.2f} of {dim} dimensions"
            )
        messages = [msg for reason, msg in found.items() if reason not in self.warned]
        self.warned.update(found)
        for msg in messages:
            log.warning(msg)
        return messages


def linear_probe_auroc(
    features: np.ndarray, labels: np.ndarray, C: float = 1.0, test_size: float = 0.3, seed: int = 0,
    max_iter: int = 1000,
) -> float:
    """ROC AUC of ``StandardScaler`` + ``LogisticRegression(C)`` on the held-out part of a seeded split.

    features: [N, D]; labels: [N] in {0, 1}. The split is ``train_test_split(stratify=labels,
    random_state=seed)``; the scaler is fitted on the fit part only. Needs >= 2 rows of each class.
    """
    labels = np.asarray(labels)
    counts = np.bincount(labels.astype(np.int64), minlength=2)
    if len(counts) != 2 or counts.min() < 2:
        raise ValueError(f"a binary linear probe needs >= 2 rows of each class 0/1, got counts "
                         f"{counts.tolist()}")
    features = np.asarray(features, dtype=np.float64)
    x_fit, x_eval, y_fit, y_eval = train_test_split(features, labels, test_size=test_size, stratify=labels,
                                                    random_state=seed)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    clf.fit(x_fit, y_fit)
    return float(roc_auc_score(y_eval, clf.predict_proba(x_eval)[:, 1]))


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore, on exit, torch's CPU generator, every CUDA generator (when CUDA is initialised), numpy's
    legacy global state and ``random``'s: work inside draws nothing from the training streams."""
    py_state, np_state, cpu_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
