"""Retrieval with ties (pacx.eval.retrieval): the expected hit under a random order of tied candidates,
against an enumeration of every order."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pacx.eval.alignment import recall_at_k
from pacx.eval.retrieval import expected_hits, paired_topk


def _hit_rate_over_orders(row: list[float], positive: int, k: int) -> float:
    """Hit@k of one query averaged over every order of its candidates used as the tie-break."""
    hits = []
    for order in itertools.permutations(range(len(row))):
        position = {c: i for i, c in enumerate(order)}
        ranked = sorted(range(len(row)), key=lambda c: (-row[c], position[c]))
        hits.append(positive in ranked[:k])
    return float(np.mean(hits))


def test_expected_hits_equal_the_mean_over_every_tie_break_order():
    rng = np.random.default_rng(0)
    sim = rng.integers(0, 3, size=(12, 6)).astype(float)  # few levels: many ties
    positive = rng.integers(0, 6, size=12)
    got = expected_hits(torch.from_numpy(sim), torch.from_numpy(positive), (1, 2, 5, 6, 9))
    for k, values in got.items():
        want = [_hit_rate_over_orders(sim[q].tolist(), int(positive[q]), k) for q in range(12)]
        assert values.tolist() == pytest.approx(want), k
    # without ties, the plain 0/1 hit of the strict rank
    distinct = torch.from_numpy(rng.permutation(30).reshape(5, 6).astype(float))
    rank = (distinct > distinct[:, :1]).sum(dim=1)
    assert expected_hits(distinct, 0, (1, 3))[3].tolist() == (rank < 3).double().tolist()


def test_a_dead_embedding_scores_chance_not_perfect():
    keys = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    top = paired_topk(torch.zeros(40, 8), keys, (1, 5))  # every cosine 0: all 40 keys tied
    assert top[1].item() == pytest.approx(1 / 40) and top[5].item() == pytest.approx(5 / 40)


def test_duplicated_targets_share_the_hit():
    y = np.random.default_rng(2).normal(size=(10, 5))
    y[9] = y[0]  # rows 0 and 9 identical: each query of the two finds two equally close rows
    r = recall_at_k(y, y, ks=(1, 2))
    assert r[1] == pytest.approx(100 * (8 + 0.5 + 0.5) / 10) and r[2] == pytest.approx(100.0)


def test_nan_similarities_are_refused():
    sim = torch.tensor([[1.0, 0.5], [float("nan"), 0.2]])
    with pytest.raises(ValueError, match="1 of 2 queries have NaN"):
        expected_hits(sim, 0, (1,))


def test_paired_topk_against_explicit_ranking():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g)
    k[:5] = q[:5] * 3  # the first five queries find their own key first
    top = paired_topk(q, k, (1, 5))
    sims = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).T
    order = sims.argsort(dim=1, descending=True)
    expected1 = np.mean([int(order[i, 0] == i) for i in range(20)])
    expected5 = np.mean([int(i in order[i, :5].tolist()) for i in range(20)])
    assert top[1].item() == pytest.approx(expected1) and top[5].item() == pytest.approx(expected5)
    assert top[1] >= 0.25
