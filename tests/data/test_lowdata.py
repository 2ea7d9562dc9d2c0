"""Low-data subsampler (docs/datasets.md#low-data): size, per-label positives, seeding, bad input."""

import random

import numpy as np
import pandas as pd
import pytest

from pacx.data.lowdata import indicator_columns, low_data_subset, subset_size

LABELS = ["a", "b", "c", "rare"]


@pytest.fixture
def table():
    rng = np.random.default_rng(0)
    n = 200
    df = pd.DataFrame({"Path": [f"img{i:03d}.png" for i in range(n)]})
    df["a"] = (rng.random(n) < 0.5).astype(int)
    df["b"] = (rng.random(n) < 0.2).astype(int)
    df["c"] = (rng.random(n) < 0.05).astype(int)
    df["rare"] = 0
    df.loc[137, "rare"] = 1
    return df


def test_same_seed_same_subset_different_seed_differs(table):
    a = low_data_subset(table, LABELS, 0.1, seed=42)
    b = low_data_subset(table, LABELS, 0.1, seed=42)
    c = low_data_subset(table, LABELS, 0.1, seed=43)
    pd.testing.assert_frame_equal(a, b)
    assert set(a["Path"]) != set(c["Path"])


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.1, 0.5])
def test_size_and_one_positive_per_label(table, fraction):
    sub = low_data_subset(table, LABELS, fraction, seed=1)
    n = int(len(table) * fraction)
    assert len(sub) == (n if n >= len(LABELS) else len(LABELS) + 1)
    assert sub["Path"].is_unique and list(sub.index) == list(range(len(sub)))
    for label in LABELS:
        assert sub[label].sum() >= 1
    assert "img137.png" in set(sub["Path"])  # the only "rare" positive


def test_subset_size_rule():
    assert subset_size(200, 4, 0.1) == 20
    assert subset_size(200, 4, 0.01) == 5  # int(2) < 4 labels -> labels + 1
    assert subset_size(199, 4, 0.1) == 19  # floored
    assert subset_size(3, 5, 0.5) == 3  # never more than the table
    assert subset_size(200, 4, 0.02) == 4  # int(4) is not below 4 labels: kept
    assert subset_size(200, 4, 0.015) == 5  # int(3) is


def test_the_positive_per_label_is_drawn_at_random(table):
    """Step 2 draws one positive per label at random: over seeds, the first positive of "c" is not always in
    the subset."""
    first_c = table["Path"][int(np.flatnonzero(table["c"] == 1)[0])]
    assert not all(first_c in set(low_data_subset(table, LABELS, 0.01, seed=s)["Path"]) for s in range(20))


def test_only_a_value_of_one_is_a_positive(table):
    """An uncertain (-1) row is not a positive: the only 1 of the column is in every subset."""
    table["u"] = -1
    table.loc[[0, 1], "u"] = 0
    table.loc[42, "u"] = 1
    for seed in range(5):
        assert "img042.png" in set(low_data_subset(table, [*LABELS, "u"], 0.01, seed=seed)["Path"])


def test_fraction_one_returns_all_rows(table):
    sub = low_data_subset(table, LABELS, 1.0, seed=0)
    pd.testing.assert_frame_equal(sub, table.reset_index(drop=True))


def test_label_without_positives_is_logged_not_fatal(table, caplog):
    table["none"] = 0
    sub = low_data_subset(table, [*LABELS, "none"], 0.1, seed=0)
    assert len(sub) == 20 and "'none' has no positive" in caplog.text


def test_global_rng_state_untouched(table):
    random.seed(123)
    np.random.seed(123)
    py_state, np_state = random.getstate(), np.random.get_state()
    low_data_subset(table, LABELS, 0.1, seed=42)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


def test_non_range_index_is_positional(table):
    shifted = table.set_index(table.index + 1000)
    pd.testing.assert_frame_equal(low_data_subset(shifted, LABELS, 0.1, 5),
                                  low_data_subset(table, LABELS, 0.1, 5))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_bad_fraction(table, fraction):
    with pytest.raises(ValueError, match="fraction"):
        low_data_subset(table, LABELS, fraction, seed=0)


def test_missing_label_column_is_named(table):
    with pytest.raises(KeyError, match="'Cardiomegaly'"):
        low_data_subset(table, ["a", "Cardiomegaly"], 0.1, seed=0)


def test_indicator_columns_give_one_row_per_class():
    df = pd.DataFrame({"Path": [f"{i}.png" for i in range(100)], "Label": [0] * 90 + [1] * 8 + [2] * 2})
    wide, names = indicator_columns(df, "Label", 3)
    assert names == ["Label==0", "Label==1", "Label==2"]
    assert (wide[names].sum(axis=1) == 1).all() and wide["Label==2"].sum() == 2
    sub = low_data_subset(wide, names, 0.02, seed=0)  # int(2) < 3 classes -> 4 rows
    assert len(sub) == 4 and set(sub["Label"]) == {0, 1, 2}
    with pytest.raises(ValueError, match="row 0: Label=5"):
        indicator_columns(df.assign(Label=[5] + [0] * 99), "Label", 3)
