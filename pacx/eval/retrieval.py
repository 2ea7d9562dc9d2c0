"""Retrieval hits with ties counted fairly: the one rule behind Stage 2's batch and whole-split top-k, the
alignment probe's R@k and zero-shot 1-of-G accuracy (docs/datasets.md#alignment).

A query ranks its own key among candidates by a similarity. Where candidates score exactly as high as the
positive (a duplicated key, a zero or constant embedding), any fixed rule misleads: counting a tie for the
positive gives a dead all-zero embedding a top-1 of 1.0, counting it against the positive gives it 0, and
breaking ties by index or ``argpartition`` order depends on row order. Here a query's hit is its expected
value when the tied candidates are put in a uniformly random order:

    P(hit@k) = clip((k - higher) / (tied + 1), 0, 1)

with ``higher`` the candidates scoring strictly above the positive and ``tied`` the others scoring the same.
Without ties this is the usual 0/1 hit, so the numbers of runs without ties are unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def expected_hits(sim: torch.Tensor, positive: torch.Tensor | int,
                  ks: Iterable[int]) -> dict[int, torch.Tensor]:
    """Per-query expected hit@k, ``{k: [Q]}``, from similarities ``sim`` [Q, C] whose positive for query q
    is column ``positive[q]`` (an int: the same column for every query). ``k`` at or above C is a sure hit.
    A NaN similarity is refused: its rank is undefined."""
    if sim.ndim != 2:
        raise ValueError(f"similarities must be [queries, candidates], got shape {list(sim.shape)}")
    if torch.isnan(sim).any():
        raise ValueError(f"{int(torch.isnan(sim).any(dim=1).sum())} of {sim.shape[0]} queries have NaN "
                         "similarities: their ranks are undefined (a NaN embedding upstream?)")
    rows = torch.arange(sim.shape[0], device=sim.device)
    pos = sim[rows, positive].unsqueeze(1)  # [Q, 1]
    higher = (sim > pos).sum(dim=1).to(sim.dtype)
    tied = (sim == pos).sum(dim=1).to(sim.dtype) - 1  # the positive itself is not a competitor
    return {k: ((k - higher) / (tied + 1)).clamp(0.0, 1.0) for k in ks}


def cosine_matrix(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarities [Q, K] of the rows of ``query`` [Q, D] and ``keys`` [K, D] (a zero row has
    cosine 0 with everything), in float64 so that near-ties are not made or broken by rounding."""
    q = torch.nn.functional.normalize(query.double(), dim=-1)
    c = torch.nn.functional.normalize(keys.double(), dim=-1)
    return q @ c.T


def paired_topk(query: torch.Tensor, keys: torch.Tensor,
                ks: Iterable[int] = (1, 5)) -> dict[int, torch.Tensor]:
    """Mean expected hit@k (0-d float64 tensors) of each query [N, D] retrieving its own row of ``keys``
    [N, D] among all N rows, by cosine."""
    if query.shape[0] != keys.shape[0]:
        raise ValueError(f"paired retrieval needs as many queries as keys, got {query.shape[0]} and "
                         f"{keys.shape[0]}")
    sim = cosine_matrix(query, keys)
    return {k: v.mean() for k, v in expected_hits(sim, torch.arange(len(sim), device=sim.device), ks).items()}
