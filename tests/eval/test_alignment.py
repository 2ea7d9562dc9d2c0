"""pacx/eval/alignment.py and scripts/eval_alignment.py (docs/datasets.md#alignment): metrics against explicit
loops, the ridge probe against a closed form, zero-shot retrieval on hand-built groups, layout errors,
and the script end to end on a synthetic release with random, Stage 1 and Stage 2 backbones."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from pacx.data.symile_files import SymileFileError
from pacx.eval.alignment import (
    CV_ALPHAS,
    alignment_metrics,
    centred_cosine,
    cosine_rows,
    duplicate_rows,
    extract_cxr_features,
    fit_indices,
    load_split,
    permutation_baseline,
    probe_encoder,
    recall_at_k,
    ridge_probe,
)
from pacx.eval.zero_shot import (
    load_stage2_heads,
    retrieval_groups,
    zero_shot_accuracy,
    zero_shot_retrieval,
)
from pacx.models.heads import ProjectionHead
from pacx.models.vit import create_vit
from pacx.weights.checkpoint import CheckpointError
from tests.helpers import PAPER_STAGE2, load_script, stage2_args

REPO = Path(__file__).resolve().parents[2]
RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    from pacx.testing.symile import write_symile_release

    return write_symile_release(tmp_path_factory.mktemp("symile") / "data_npy", n_train=30, n_val=12,
                                n_test_queries=10, cxr_size=40, write_teacher_features=True)


@pytest.fixture(scope="module")
def stage2_run(tmp_path_factory, release, stage1_run) -> Path:
    """A finished 2-step Stage 2 run (vit_test, 32 px, 16-d shared space) from the Stage 1 run."""
    from Stage2_PACX import main

    run = tmp_path_factory.mktemp("runs") / "stage2"
    main(stage2_args(run, release, stage1_run, "--trainer.max_steps", "2", "--trainer.val_check_interval",
                     "2", *PAPER_STAGE2))
    return run


# ------------------------------------------------------------------------------------------ metrics


def test_metrics_against_explicit_loops():
    pred, y = RNG.normal(size=(9, 4)), RNG.normal(size=(9, 4)) + 0.5
    m = alignment_metrics(pred, y)
    r2_cols = [1 - ((y[:, j] - pred[:, j]) ** 2).sum() / ((y[:, j] - y[:, j].mean()) ** 2).sum()
               for j in range(4)]
    assert m["r2"] == pytest.approx(np.mean(r2_cols))

    def cos(a, b):
        return sum(x * z for x, z in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(z * z for z in b))

    assert m["cos"] == pytest.approx(np.mean([cos(pred[i], y[i]) for i in range(9)]))
    mu = [sum(y[i, j] for i in range(9)) / 9 for j in range(4)]
    centred = [cos([pred[i, j] - mu[j] for j in range(4)], [y[i, j] - mu[j] for j in range(4)])
               for i in range(9)]
    assert m["cos_centred"] == pytest.approx(np.mean(centred)) == pytest.approx(centred_cosine(pred, y))
    for k in (1, 5, 10):  # rank of the own target among all targets, by cosine
        hits = [sorted(range(9), key=lambda j, i=i: -cos(pred[i], y[j])).index(i) < k for i in range(9)]
        assert m[f"recall@{k}"] == pytest.approx(100 * np.mean(hits))
    assert m["recall@10"] == 100.0 and m["n_test"] == 9 and m["duplicate_rows"] == 0


def test_recall_is_100_and_cosine_1_when_prediction_equals_target():
    y = RNG.normal(size=(30, 6))
    assert recall_at_k(y, y) == {1: 100.0, 5: 100.0, 10: 100.0}
    m = alignment_metrics(y.copy(), y)
    assert (m["r2"] == pytest.approx(1.0) and m["cos"] == pytest.approx(1.0)
            and m["cos_centred"] == pytest.approx(1.0))
    # predicting each row's neighbour puts the neighbour, not the own row, first
    shuffled = y[np.roll(np.arange(30), 1)]
    assert recall_at_k(shuffled, y)[1] == 0.0


def test_permutation_baseline_and_duplicates_by_hand():
    y = RNG.normal(size=(12, 5)) + 1.0
    perm = np.random.default_rng(0).permutation(12)
    raw = np.mean([y[i] @ y[perm[i]] / (np.linalg.norm(y[i]) * np.linalg.norm(y[perm[i]]))
                   for i in range(12)])
    yc = y - y.mean(axis=0)
    cen = np.mean([yc[i] @ yc[perm[i]] / (np.linalg.norm(yc[i]) * np.linalg.norm(yc[perm[i]]))
                   for i in range(12)])
    assert permutation_baseline(y) == pytest.approx({"baseline_cos": raw, "baseline_cos_centred": cen})
    assert cosine_rows(y, y) == pytest.approx(np.ones(12))
    dup = np.concatenate([y, y[[0, 0, 3]]])  # row 0 three times, row 3 twice
    assert duplicate_rows(dup) == 3 and duplicate_rows(y) == 0


def test_fit_indices_reproduce_the_drop_last_count():
    rows = fit_indices(10_000)
    assert len(rows) == 9_984 and len(np.unique(rows)) == 9_984 and (np.diff(rows) > 0).all()
    assert (np.array_equal(rows, fit_indices(10_000, seed=0))
            and not np.array_equal(rows, fit_indices(10_000, seed=1)))
    assert np.array_equal(fit_indices(7, None), np.arange(7)) and len(fit_indices(30, 8)) == 24
    with pytest.raises(ValueError, match="keeps no rows"):
        fit_indices(100)
    assert len(fit_indices(1000)) == 768  # the default batch is the reference's 256: 3 whole batches


def test_probe_defaults_are_the_protocols():
    """docs/datasets.md#alignment: ridge alpha 10 on the rows of a drop-last loader of batch 256."""
    import inspect

    for fn in (ridge_probe, probe_encoder):
        params = inspect.signature(fn).parameters
        assert params["alpha"].default == 10.0 and params["drop_last_batch"].default == 256, fn.__name__


def test_ridge_probe_matches_closed_form_on_the_fit_rows():
    x, x_test = RNG.normal(size=(40, 6)) * [1, 2, 3, 4, 5, 6] + 3, RNG.normal(size=(7, 6))
    w = RNG.normal(size=(6, 3))
    y, y_test = x @ w + 10 + RNG.normal(size=(40, 3)), x_test @ w + 10
    res = ridge_probe(x, y, x_test, y_test, alpha=10.0, drop_last_batch=16, seed=3)
    rows = np.sort(np.random.default_rng(3).permutation(40)[:32])
    xf, yf = x[rows], y[rows]
    mu, sd = xf.mean(0), xf.std(0)  # StandardScaler: population std of the fit rows; Y left as is
    xs = (xf - mu) / sd
    coef = np.linalg.solve(xs.T @ xs + 10.0 * np.eye(6), xs.T @ (yf - yf.mean(0)))
    expected = (x_test - mu) / sd @ coef + yf.mean(0)
    assert res.n_fit == 32
    np.testing.assert_allclose(res.pred, expected, rtol=1e-6, atol=1e-8)
    assert res.metrics == pytest.approx({**alignment_metrics(expected, y_test), "alpha": 10.0})
    with pytest.raises(ValueError, match=r"\[40, 6\] and \[39, 3\]"):
        ridge_probe(x, y[:39], x_test, y_test, drop_last_batch=None)


def test_cv_alpha_is_the_leave_one_out_minimum_over_the_grid():
    """``alpha="cv"``: the penalty of CV_ALPHAS with the least leave-one-out squared error on the fit rows
    (brute force: each row predicted by the ridge, intercept unpenalised, fitted on the other rows, X
    standardised with all fit rows' statistics as in the pipeline), then the probe at that penalty; a weak
    signal in many features picks a larger penalty than the paper's 10."""
    x, x_test = RNG.normal(size=(30, 12)), RNG.normal(size=(9, 12))
    w = np.zeros((12, 3))
    w[0] = [0.3, -0.2, 0.1]  # one feature carries a little of the targets, the other 11 nothing
    y, y_test = x @ w + RNG.normal(size=(30, 3)), x_test @ w + RNG.normal(size=(9, 3))
    xs = (x - x.mean(0)) / x.std(0)

    def fit(xa, ya, alpha):
        xc, yc = xa - xa.mean(0), ya - ya.mean(0)
        coef = np.linalg.solve(xc.T @ xc + alpha * np.eye(xa.shape[1]), xc.T @ yc)
        return coef, ya.mean(0) - xa.mean(0) @ coef

    def loo_error(alpha):
        errors = []
        for i in range(len(xs)):
            keep = np.arange(len(xs)) != i
            coef, b = fit(xs[keep], y[keep], alpha)
            errors.append(((xs[i] @ coef + b - y[i]) ** 2).mean())
        return np.mean(errors)

    best = min(CV_ALPHAS, key=loo_error)
    assert best > 10.0
    res = ridge_probe(x, y, x_test, y_test, alpha="cv", drop_last_batch=None)
    assert res.metrics["alpha"] == best
    coef, b = fit(xs, y, best)
    expected = (x_test - x.mean(0)) / x.std(0) @ coef + b
    np.testing.assert_allclose(res.pred, expected, rtol=1e-6, atol=1e-8)
    assert res.metrics == pytest.approx({**alignment_metrics(expected, y_test), "alpha": best})
    with pytest.raises(ValueError, match="positive number or 'cv'"):
        ridge_probe(x, y, x_test, y_test, alpha="loo", drop_last_batch=None)


# ------------------------------------------------------------------------------------------ zero-shot


def _groups_layout():
    """3 queries (label_hadm_id 7, 5, 9), groups of 4, positives first, negatives interleaved."""
    label_hadm_id = np.array([7, 5, 9, 5, 9, 7, 7, 9, 5, 5, 7, 9])
    label = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    return label, label_hadm_id


def test_retrieval_groups_and_accuracy_on_a_hand_built_layout():
    label, ids = _groups_layout()
    groups = retrieval_groups(label, ids)
    assert groups.tolist() == [[0, 5, 6, 10], [1, 3, 8, 9], [2, 4, 7, 11]]
    # features: query q points along axis q; row r's candidate feature along axis r's group, except the
    # positive of query 1, which points elsewhere (so query 1 fails; queries 0 and 2 succeed)
    feats = torch.zeros(12, 4)
    feats[:, 3] = 0.1
    for q, rows in enumerate(groups):
        feats[rows[1:], 3] = 1.0  # negatives: mostly off-axis
        feats[rows[0], q] = 1.0
    feats[1] = torch.tensor([0.0, -1.0, 0.0, 0.0])
    query = torch.eye(4)[:3] + 0.05
    cands = feats[torch.from_numpy(groups)]  # [3, 4, 4]
    assert zero_shot_accuracy(query, cands) == pytest.approx(2 / 3)
    similarity = torch.nn.functional.cosine_similarity
    expected = np.mean([int(torch.argmax(similarity(query[q][None], cands[q])) == 0) for q in range(3)])
    assert zero_shot_accuracy(query, cands) == pytest.approx(expected)
    # a tie with a negative (same direction, another length) is half a hit: the two in a random order
    tie = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [3.0, 0.0], [1.0, 1.0]]])
    assert zero_shot_accuracy(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), tie) == pytest.approx(0.25)
    # a dead (all-zero) CXR embedding ties every candidate: chance, 1 / G, not a perfect score
    assert zero_shot_accuracy(torch.zeros(3, 4), cands) == pytest.approx(1 / 4)


def test_zero_shot_retrieval_on_a_hand_built_split():
    """:func:`zero_shot_retrieval` on a 3-query split of groups of 4 held in memory, against loops over the
    rows: the positive's cosine through the heads must not be beaten by a negative of its group. The labs
    head's LayerNorm gains are uneven, so the candidates' norms differ and only cosines rank them (with these
    seeds a dot product scores 0, cosines 2 / 3)."""
    from pacx.eval.alignment import SymileSplit

    label, ids = _groups_layout()
    g = torch.Generator().manual_seed(0)
    cxr = torch.randn(12, 3, 32, 32, generator=g).numpy()
    labs = torch.randn(12, 6, generator=g).numpy()
    names = ("cxr", "label", "label_hadm_id", "labs_features")
    split = SymileSplit("test", {k: Path(f"{k}.npy") for k in names},
                        {"cxr": cxr, "label": label, "label_hadm_id": ids, "hadm_id": ids,
                         "labs_features": labs}, {"labs": "labs_features"})
    torch.manual_seed(3)
    enc = create_vit("vit_test", img_size=32).eval()
    heads = {"cxr": ProjectionHead(32, 8).eval(), "labs": ProjectionHead(6, 8).eval()}
    with torch.no_grad():
        heads["labs"][2].weight.copy_(torch.tensor([8.0, 4.0, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]))
    out = zero_shot_retrieval(enc, heads, split, img_size=32)
    hits = []
    with torch.no_grad():
        for q in np.flatnonzero(label == 1):
            query = heads["cxr"](enc(torch.from_numpy(cxr[q:q + 1])))
            rows = [r for r in range(12) if ids[r] == ids[q]]
            sims = torch.nn.functional.cosine_similarity(query, heads["labs"](torch.from_numpy(labs[rows])))
            hits.append(bool((sims[[r != q for r in rows]] <= sims[rows.index(q)]).all()))
    assert 0 < sum(hits) < len(hits)  # neither all nor none: the count tells cosine from a dot product
    assert out == pytest.approx({"n_queries": 3, "group_size": 4, "chance": 0.25,
                                 "cxr_labs_acc": sum(hits) / len(hits)})


@pytest.mark.parametrize("change,match", [
    (lambda label, ids: label.__setitem__(3, 1), r"exactly one positive.*label_hadm_id 5 has 2"),
    (lambda label, ids: label.__setitem__(0, 0), r"exactly one positive.*label_hadm_id 7 has 0"),
    (lambda label, ids: ids.__setitem__(3, 9), r"differ in size"),
])
def test_group_validation_names_the_file(change, match):
    label, ids = _groups_layout()
    change(label, ids)
    with pytest.raises(SymileFileError, match=r"label_test\.npy.*" + match):
        retrieval_groups(label, ids, source="data_npy/test/label_test.npy")


def test_zero_shot_width_mismatches_name_what_differs(release):
    test = load_split(release, "test")
    enc = create_vit("vit_test", img_size=32)  # 32-d features
    heads = {"cxr": ProjectionHead(64, 16), "ecg": ProjectionHead(1024, 16), "labs": ProjectionHead(256, 16)}
    with pytest.raises(ValueError, match="32-wide but the Stage 2 head expects 64"):
        zero_shot_retrieval(enc, heads, test, img_size=32)
    heads["cxr"], heads["ecg"] = ProjectionHead(32, 16), ProjectionHead(512, 16)
    with pytest.raises(ValueError,
                       match=r"test/ecg_features\.npy \(shape \[100, 1024\]\) is 1024-wide.*expects 512"):
        zero_shot_retrieval(enc, heads, test, img_size=32)
    with pytest.raises(SymileFileError, match="no label file"):
        zero_shot_retrieval(enc, heads, load_split(release, "test_uni"), img_size=32)


# ------------------------------------------------------------------------------------------ data + features


def test_feature_extraction_is_a_plain_resize_then_the_cls_token():
    enc = create_vit("vit_test", img_size=32).eval()
    cxr = RNG.normal(size=(5, 3, 40, 40)).astype(np.float32)
    feats = extract_cxr_features(enc, cxr, img_size=32, batch_size=2, rows=np.array([4, 0, 2]))
    with torch.no_grad():
        ref = torch.cat([enc(TF.resize(torch.from_numpy(cxr[i])[None], [32, 32], antialias=True))
                         for i in (4, 0, 2)])
    assert feats.dtype == np.float32 and feats.shape == (3, 32)
    np.testing.assert_allclose(feats, ref.numpy(), atol=1e-5)
    # an encoder that returns tokens [B, T, D]: its CLS token (index 0)
    tokens = torch.nn.Module()
    tokens.forward = enc.forward_features
    from_tokens = extract_cxr_features(tokens, cxr, img_size=32, batch_size=2, rows=np.array([4, 0, 2]))
    np.testing.assert_allclose(from_tokens, ref.numpy(), atol=1e-5)
    with pytest.raises(SymileFileError, match=r"my\.npy.*\[5, 40, 40\]"):
        extract_cxr_features(enc, cxr[:, 0], img_size=32, source="my.npy")


def _mini_test_uni(root: Path, n_ecg: int = 4, ecg_width: int = 1024) -> Path:
    d = root / "test_uni"
    d.mkdir(parents=True)
    np.save(d / "cxr_test_uni.npy", np.zeros((4, 3, 8, 8), np.float32))
    np.save(d / "ecg_features.npy", np.zeros((n_ecg, ecg_width), np.float32))
    np.save(d / "labs_features.npy", np.zeros((4, 256), np.float32))
    np.save(d / "hadm_id_test.npy", np.arange(4))
    return root


def test_split_layout_errors_name_the_files(tmp_path):
    assert len(load_split(_mini_test_uni(tmp_path / "ok"), "test_uni")) == 4
    with pytest.raises(SymileFileError, match=r"ecg_features\.npy has N=3 but .*hadm_id_test\.npy has N=4"):
        load_split(_mini_test_uni(tmp_path / "n", n_ecg=3), "test_uni")
    # any teacher width loads (the demo's small teachers); probing checks train against test widths
    wide = load_split(_mini_test_uni(tmp_path / "w", ecg_width=768), "test_uni")
    assert wide.arrays["ecg_features"].shape == (4, 768)
    (tmp_path / "ok" / "test_uni" / "labs_features.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"test_uni/labs_features\.npy"):
        load_split(tmp_path / "ok", "test_uni")


# ------------------------------------------------------------------------------------------ script


def test_backbone_specs():
    parse = load_script("eval_alignment").parse_backbone
    assert (parse("mae=runs/s1/run").name, parse("mae=runs/s1/run").source) == ("mae", "runs/s1/run")
    assert (parse("runs/s1/last.ckpt").name, parse("runs/s1/last.ckpt").source) == ("last",
                                                                                    "runs/s1/last.ckpt")
    assert (parse("random=random:vit_test").random_arch == "vit_test"
            and parse("random:vit_test").name == "random:vit_test")
    assert parse("runs/a=b/x.ckpt").source == "runs/a=b/x.ckpt"  # '=' inside a path is not a name


def _finite(tree) -> bool:
    return all(_finite(v) if isinstance(v, dict) else math.isfinite(v) for v in tree.values())


def test_script_random_and_stage1_backbones(tmp_path, release, stage1_run, capsys):
    out = tmp_path / "alignment.json"
    assert load_script("eval_alignment").main(["--data-root", str(release), "--backbone",
                                               "random=random:vit_test",
                           "--backbone", str(stage1_run), "--img-size", "32", "--batch-size", "7",
                           "--drop-last-batch", "8", "--device", "cpu", "--cv-alpha", "--json",
                           str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results) == {"random", "stage1"}
    for res in results.values():
        assert set(res) == {"ecg", "labs"} and _finite(res)
        for m in res.values():
            assert m["n_fit"] == 24 and m["n_test"] == 10 and -1 <= m["cos"] <= 1 and m["alpha"] == 10.0
            assert {"r2", "cos_centred", "recall@1", "recall@5", "recall@10", "baseline_cos",
                    "baseline_cos_centred", "duplicate_rows"} <= set(m)
            assert m["cv"]["alpha"] in CV_ALPHAS and set(m) - {"cv", "n_fit"} == set(m["cv"])
    table = capsys.readouterr().out
    assert "| random | ECG |" in table and "| stage1 | labs |" in table and "baseline (permutation" in table
    assert results["random"]["ecg"] != results["stage1"]["ecg"]


def test_script_zero_shot_matches_the_stage2_module(tmp_path, release, stage2_run, stage1_run, capsys):
    from pacx.lit.pacx import PaCXModule

    out = tmp_path / "zs.json"
    load_script("eval_alignment").main(["--data-root", str(release), "--backbone", f"pacx={stage2_run}",
                                        "--img-size", "32",
                    "--drop-last-batch", "0", "--device", "cpu", "--zero-shot", "--json", str(out)])
    zs = json.loads(out.read_text())["pacx"]["zero_shot"]
    assert zs["chance"] == pytest.approx(0.1) and zs["n_queries"] == 10 and zs["group_size"] == 10
    assert "| pacx |" in capsys.readouterr().out.split("CXR→ECG")[1]
    # independent: the unmerged LoRA module from the checkpoint, group rows found by loops
    ckpt = torch.load(stage2_run / "checkpoints" / "last.ckpt", weights_only=True)
    module = PaCXModule(encoder_arch="vit_test", img_size=32, shared_dim=16).eval()
    module.load_state_dict(ckpt["state_dict"], strict=True)
    d = release / "test"
    label, ids = np.load(d / "label_test.npy"), np.load(d / "label_hadm_id_test.npy")
    cxr = torch.from_numpy(np.load(d / "cxr_test.npy"))
    for target in ("ecg", "labs"):
        feats = torch.from_numpy(np.load(d / f"{target}_features.npy"))
        hits = []
        with torch.no_grad():
            for q in np.flatnonzero(label == 1):
                query = module.proj["cxr"](module(TF.resize(cxr[q:q + 1], [32, 32], antialias=True)))
                rows = [r for r in range(len(ids)) if ids[r] == ids[q]]
                sims = torch.nn.functional.cosine_similarity(query, module.proj[target](feats[rows]))
                hits.append(bool((sims[[r != q for r in rows]] < sims[rows.index(q)]).all()))
        assert zs[f"cxr_{target}_acc"] == pytest.approx(np.mean(hits))
    # the heads themselves: strict, eval mode, right shapes
    heads = load_stage2_heads(stage2_run)
    assert {k: (type(h[0]).__name__, h[1][1].in_features, h[1][1].out_features, h.training)
            for k, h in heads.items()} == {"cxr": ("Identity", 32, 16, False),
                                           "ecg": ("TeacherNorm", 1024, 16, False),
                                           "labs": ("TeacherNorm", 256, 16, False)}
    x = torch.randn(4, 256)  # teacher_norm raw: the teacher norms stay the identity
    torch.testing.assert_close(heads["labs"][0](x), x)


def test_zero_shot_refuses_backbones_without_stage2_heads(release, stage1_run):
    script = load_script("eval_alignment")
    with pytest.raises(CheckpointError, match=r"last\.ckpt.*stage2_pacx.*'stage1_mae'"):
        script.main(["--data-root", str(release), "--backbone", str(stage1_run), "--zero-shot"])
    with pytest.raises(SystemExit):
        script.main(["--data-root", str(release), "--backbone", "random:vit_test", "--zero-shot"])


def test_zero_shot_table_covers_runs_with_different_teachers():
    """A labs-only Stage 2 run beside a two-teacher run: each teacher gets a column, a missing head a dash."""
    table = load_script("eval_alignment").zero_shot_table({
        "labs_only": {"zero_shot": {"cxr_labs_acc": 0.25, "chance": 0.1, "n_queries": 100, "group_size": 10}},
        "both": {"zero_shot": {"cxr_ecg_acc": 0.125, "cxr_labs_acc": 0.5, "chance": 0.1, "n_queries": 100,
                               "group_size": 10}},
    })
    rows = table.splitlines()
    assert rows[0] == "| backbone | CXR→labs | CXR→ECG | chance | queries |"
    assert rows[2:] == ["| labs_only | 0.2500 | – | 0.1000 | 100 |",
                        "| both | 0.5000 | 0.1250 | 0.1000 | 100 |"]
