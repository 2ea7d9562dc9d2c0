"""Learning-health signals: RankMe against its closed form, InfoNCE chance, embedding std, the collapse
monitor's rules, the probe AUROC and the RNG guard."""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from pacx.eval.health import (
    CollapseMonitor,
    chance_fraction,
    effective_rank,
    embedding_std,
    infonce_chance,
    linear_probe_auroc,
    preserved_rng,
)
from pacx.losses import symmetric_clip_loss


def with_spectrum(s: np.ndarray, n: int, d: int, seed: int = 0) -> torch.Tensor:
    """X = U diag(s) V^T [n, d] with orthonormal U [n, k], V [d, k]: its singular values are exactly s."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
    v, _ = np.linalg.qr(rng.standard_normal((d, len(s))))
    return torch.from_numpy(u @ np.diag(s) @ v.T)


def test_effective_rank_matches_the_closed_form_on_a_known_spectrum():
    s = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05])
    x = with_spectrum(s, n=40, d=8)
    assert effective_rank(x) == pytest.approx(math.exp(entropy(s / s.sum())), rel=1e-5)
    # computed in float64 whatever the input dtype; scale-free (the singular values are L1-normalised)
    assert effective_rank(x.float() * 1000) == pytest.approx(effective_rank(x), rel=1e-5)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_effective_rank_of_k_equal_singular_values_is_k(k):
    x = with_spectrum(np.full(k, 2.5), n=30, d=12, seed=k)
    assert effective_rank(x) == pytest.approx(k, rel=1e-4)


def test_effective_rank_of_a_rank_one_matrix_is_one_and_of_zero_is_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 1, generator=g) @ torch.randn(1, 16, generator=g)
    assert effective_rank(x) == pytest.approx(1.0, abs=1e-4)
    assert effective_rank(torch.zeros(5, 4)) == 0.0
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        effective_rank(torch.zeros(5))


def test_infonce_at_chance_equals_log_n_even_with_label_smoothing():
    """Collapsed embeddings give every key the same score: the symmetric loss is exactly log N."""
    n = 32
    a = torch.ones(n, 8) + 0.0
    b = torch.full((n, 8), 2.0)
    loss = symmetric_clip_loss(a, b, logit_scale=14.3, label_smoothing=0.02)
    assert float(loss) == pytest.approx(infonce_chance(n), rel=1e-6)
    assert chance_fraction(float(loss), n) == pytest.approx(1.0, rel=1e-6)
    assert infonce_chance(128) == pytest.approx(4.852030263919617)
    assert chance_fraction(0.5 * math.log(64), 64) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least 2 keys"):
        infonce_chance(1)


def test_embedding_std_is_one_over_sqrt_d_when_isotropic_and_zero_when_collapsed():
    g = torch.Generator().manual_seed(0)
    d = 64
    iso = torch.randn(20000, d, generator=g) * 7.0  # the scale does not matter: rows are L2-normalised
    assert embedding_std(iso) == pytest.approx(1 / math.sqrt(d), rel=0.02)
    collapsed = torch.ones(100, d) * 3 + 1e-4 * torch.randn(100, d, generator=g)
    assert embedding_std(collapsed) < 1e-4
    assert embedding_std(collapsed) < CollapseMonitor("r").std_threshold(d) < embedding_std(iso)


def test_monitor_thresholds():
    m = CollapseMonitor("r")
    assert m.std_threshold(256) == pytest.approx(0.1 / 16)
    assert m.rank_threshold(256) == pytest.approx(2.56)
    assert m.rank_threshold(16) == 2.0  # the floor


def test_monitor_warns_once_per_reason_after_warmup(caplog):
    caplog.set_level(logging.WARNING, logger="pacx.eval.health")
    m = CollapseMonitor("runs/stage2/x", warmup_epochs=2)
    collapsed = dict(infonce_fraction={"ecg": 1.0, "labs": 0.99}, emb_std=1e-5, rank=1.0, dim=128)
    per_epoch = [m.update(epoch, **collapsed) for epoch in range(6)]
    assert per_epoch[0] == per_epoch[1] == []  # warmup
    assert len(per_epoch[2]) == 4 and per_epoch[3:] == [[], [], []]
    assert len(caplog.records) == 4
    text = "\n".join(per_epoch[2])
    needles = ("runs/stage2/x: epoch 2:", "cxr-ecg is 1.000", "cxr-labs is 0.990", "1e-05", "RankMe) 1.00")
    for needle in needles:
        assert needle in text
    # a new reason later still warns, once
    assert len(m.update(6, {"ecg": 1.0, "labs": 0.99}, float("nan"), 1.0, 128)) == 1
    assert m.update(7, {"ecg": 1.0, "labs": 0.99}, float("nan"), 1.0, 128) == []


def test_monitor_is_silent_on_a_healthy_run_and_at_the_threshold_edge(caplog):
    caplog.set_level(logging.WARNING, logger="pacx.eval.health")
    m = CollapseMonitor("r", warmup_epochs=0)
    d = 256
    for epoch in range(5):
        assert m.update(epoch, {"ecg": 0.8, "labs": 0.979}, 1 / math.sqrt(d), 150.0, d) == []
    assert m.update(5, {"ecg": 0.8}, 0.1 / math.sqrt(d), 2.56, d) == []  # thresholds are strict
    assert caplog.records == []


def test_linear_probe_auroc_is_perfect_on_separable_and_chance_on_noise():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)
    separable = np.c_[y * 20.0 + rng.normal(size=200), rng.normal(size=(200, 3))]
    assert linear_probe_auroc(separable, y) == 1.0
    assert abs(linear_probe_auroc(rng.normal(size=(200, 4)), y) - 0.5) < 0.15
    with pytest.raises(ValueError, match=r"counts \[199, 1\]"):
        linear_probe_auroc(separable, np.r_[np.zeros(199, int), 1])


def test_preserved_rng_restores_every_global_stream():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    with preserved_rng():
        torch.rand(10), np.random.rand(10), random.random()
        torch.manual_seed(99)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
