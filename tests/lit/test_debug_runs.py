"""Debug runs are debug runs: Lightning's fast_dev_run / overfit_batches / limit_* work in every stage (the
resumable sampler included), mark run.json, checkpoints and results rows, and are refused downstream
(Stage 2 init_encoder, Stage 3 backbones, pacx.load_encoder, make_tables) unless explicitly allowed."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors import safe_open

import pacx
from pacx.data.resumable import ResumableSampler, SeededDataset, derive_seed, train_loader
from pacx.debug import DebugRunError, debug_flags
from pacx.share import export_encoder
from tests.conftest import stage1_args
from tests.helpers import stage2_args
from tests.lit.test_classify import stage3_args

# flag arguments -> the debug flags run.json records
FLAGS = {
    "overfit_batches": (["--trainer.overfit_batches", "1", "--trainer.max_epochs", "2"],
                        {"overfit_batches": 1}),
    "fast_dev_run": (["--trainer.fast_dev_run", "true"], {"fast_dev_run": 1}),
    "limit_batches": (["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                       "--trainer.max_epochs", "1"], {"limit_train_batches": 2, "limit_val_batches": 1}),
}


def _record(run) -> dict:
    return json.loads((run / "run.json").read_text())


@pytest.fixture(scope="module")
def symile_root(tmp_path_factory):
    from pacx.testing.symile import write_symile_release

    return write_symile_release(tmp_path_factory.mktemp("symile") / "data_npy", n_train=16, n_val=10,
                                n_test_queries=10, cxr_size=40, write_teacher_features=True)



@pytest.fixture(scope="module")
def debug_stage1(tmp_path_factory, chexpert_release):
    """A Stage 1 run with limit_train_batches: complete, with checkpoints, and a debug run."""
    from Stage1_MAE import main

    run = tmp_path_factory.mktemp("runs") / "debug_stage1"
    main(stage1_args(run, chexpert_release, "--trainer.max_epochs", "1", "--trainer.limit_train_batches",
                     "2"))
    return run


# ---- each flag in each stage ------------------------------------------------------------------------


@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_stage1_debug_flags_run_and_mark_the_run(flag, tmp_path, chexpert_release):
    from Stage1_MAE import main

    args, expected = FLAGS[flag]
    run = tmp_path / "run"
    main(stage1_args(run, chexpert_release, *args))
    record = _record(run)
    assert record["debug"] == expected and record["status"] == "completed"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["pacx"]["debug"] == expected


@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_stage2_debug_flags_run_and_mark_the_run(flag, tmp_path, symile_root, stage1_run):
    from Stage2_PACX import main

    args, expected = FLAGS[flag]
    run = tmp_path / "run"
    main(stage2_args(run, symile_root, stage1_run, *args))
    assert _record(run)["debug"] == expected
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["pacx"]["debug"] == expected


STAGE3_FLAGS = {
    **FLAGS,
    "limit_test_batches": (["--trainer.limit_test_batches", "1"], {"limit_test_batches": 1}),
    "overfit_per_epoch": (["--trainer.overfit_batches", "1", "--model.feature_cache", "false"],
                          {"overfit_batches": 1}),
}


@pytest.mark.parametrize("flag", sorted(STAGE3_FLAGS))
def test_stage3_debug_flags_run_and_mark_the_results_row(flag, tmp_path, tb, stage1_run):
    """Every flag runs through fit + test (fast_dev_run tests the weights in memory: it saves no best
    checkpoint), with and without cached features; the results row names the flags."""
    from Stage3_eval import main

    args, expected = STAGE3_FLAGS[flag]
    raw, manifests = tb
    run = tmp_path / "run"
    main(stage3_args("tb", raw, manifests, run, stage1_run, *args))
    assert _record(run)["debug"] == expected and _record(run)["status"] == "completed"
    row = pd.read_csv(run / "results.csv").iloc[0]
    assert row["debug"] == ",".join(f"{k}={v}" for k, v in sorted(expected.items()))


def test_a_normal_stage3_row_has_a_blank_debug_cell(tmp_path, tb, stage1_run):
    from Stage3_eval import main

    raw, manifests = tb
    main(stage3_args("tb", raw, manifests, tmp_path / "run", stage1_run))
    assert pd.isna(pd.read_csv(tmp_path / "run" / "results.csv").iloc[0]["debug"])
    assert _record(tmp_path / "run")["debug"] == {}


def test_debug_flags_read_from_a_trainer():
    class T:
        fast_dev_run, overfit_batches = False, 0.0
        limit_train_batches, limit_val_batches = 1.0, 0.25
        limit_test_batches, limit_predict_batches = 1.0, 1.0

    assert debug_flags(T()) == {"limit_val_batches": 0.25}
    T.fast_dev_run, T.limit_val_batches = 3, 3  # fast_dev_run sets the limits itself: not repeated
    assert debug_flags(T()) == {"fast_dev_run": 3}


def test_overfit_batches_keeps_the_test_and_predict_limits_it_does_not_set():
    """Lightning's overfit_batches sets only the train and val limits: a test / predict limit beside it is
    still recorded (it shortens the test that writes the results row)."""
    import pytorch_lightning as pl

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, overfit_batches=2, limit_test_batches=5,
                         limit_predict_batches=0.5)
    assert (trainer.limit_train_batches, trainer.limit_val_batches) == (2, 2)  # what overfit_batches sets
    assert debug_flags(trainer) == {"overfit_batches": 2, "limit_test_batches": 5,
                                    "limit_predict_batches": 0.5}
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, fast_dev_run=2, limit_test_batches=5)
    assert debug_flags(trainer) == {"fast_dev_run": 2}  # fast_dev_run sets all four limits


def test_sampler_with_lightnings_overfit_indices():
    """overfit_batches replaces the sampler by a sequential one: plain int keys, seeded from (seed, index)."""
    data = list(range(10))
    ds = SeededDataset(data, seed=5)
    assert ds[3] == 3 and ds[(4, derive_seed(5, 0, 0, 4))] == 4
    loader = train_loader(data, batch_size=2, seed=5)
    assert isinstance(loader.sampler, ResumableSampler)
    assert loader.state_dict() == {} and hasattr(loader, "load_state_dict")  # Lightning's resumable protocol


# ---- refusal downstream ----------------------------------------------------------------------------


def test_a_debug_input_loaded_while_the_run_runs_marks_the_run(tmp_path, chexpert_release):
    """An input checked during the subcommand (in setup, as on-the-fly teachers are), not at construction:
    refused without --allow_debug; let through with it, the run records from_debug_run in run.json and in
    its checkpoints, as one built on debug init weights does."""
    from pacx.weights.checkpoint import safe_torch_load
    from Stage1_MAE import main
    from tests.conftest import stage1_args

    args = ("--trainer.max_steps", "1", "--trainer.callbacks+=tests.callbacks.LoadsADebugInput")
    with pytest.raises(DebugRunError, match="a teacher loaded in setup comes from a debug run"):
        main(stage1_args(tmp_path / "refused", chexpert_release, *args))
    run = tmp_path / "allowed"
    main(stage1_args(run, chexpert_release, *args, "--allow_debug", "true"))
    assert _record(run)["debug"] == {"from_debug_run": 1}
    assert safe_torch_load(run / "checkpoints" / "last.ckpt")["pacx"]["debug"] == {"from_debug_run": 1}


@pytest.mark.bad_input
def test_stage2_refuses_a_debug_run_as_init_encoder(tmp_path, symile_root, debug_stage1):
    """Stage 2 init_encoder = a debug run (fast_dev_run / overfit_batches / limit_*) → DebugRunError naming
    the run and its flags, unless --allow_debug true."""
    from Stage2_PACX import main

    with pytest.raises(DebugRunError, match=r"debug_stage1 comes from a debug run \(limit_train_batches=2\)"):
        main(stage2_args(tmp_path / "refused", symile_root, debug_stage1, "--trainer.max_steps", "1"))
    run = tmp_path / "allowed"
    main(stage2_args(run, symile_root, debug_stage1, "--trainer.max_steps", "1", "--allow_debug", "true"))
    assert _record(run)["debug"] == {"from_debug_run": 1}  # built on a debug run: a debug run itself


@pytest.mark.bad_input
def test_stage3_refuses_a_debug_backbone(tmp_path, tb, debug_stage1):
    """Stage 3 backbone weights = a debug run → DebugRunError, unless --allow_debug true (the results row is
    then marked from_debug_run)."""
    from Stage3_eval import main

    raw, manifests = tb
    with pytest.raises(DebugRunError, match="comes from a debug run"):
        main(stage3_args("tb", raw, manifests, tmp_path / "refused", debug_stage1))
    run = tmp_path / "allowed"
    main(stage3_args("tb", raw, manifests, run, debug_stage1, "--allow_debug", "true"))
    assert pd.read_csv(run / "results.csv").iloc[0]["debug"] == "from_debug_run=1"


@pytest.mark.bad_input
def test_load_encoder_and_exports_refuse_debug_runs(tmp_path, debug_stage1):
    """pacx.load_encoder / export of a debug run, checkpoint or export → DebugRunError, unless allow_debug."""
    with pytest.raises(DebugRunError):
        pacx.load_encoder(debug_stage1)
    with pytest.raises(DebugRunError):
        pacx.load_encoder(debug_stage1 / "checkpoints" / "last.ckpt")
    assert pacx.load_encoder(debug_stage1, allow_debug=True).embed_dim == 32
    out = export_encoder(debug_stage1, tmp_path / "e.safetensors", allow_debug=True)
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["debug"]) == {"limit_train_batches": 2}
    with pytest.raises(DebugRunError, match="encoder export"):
        pacx.load_encoder(out)


@pytest.mark.bad_input
def test_make_tables_refuses_debug_rows(tmp_path, repo):
    """make_tables.py on results rows of debug runs → error listing them, unless --allow-debug."""
    rows = [{"benchmark": "tb", "task": "binary", "metric": "auroc", "backbone_kind": kind,
             "mode": "linear_probe", "train_fraction": 1.0, "seed": 0, "test/auroc": 0.7, "metric_value": 0.7,
             "run_dir": f"runs/{kind}",
             "debug": debug} for kind, debug in (("mae", ""), ("pacx", "limit_test_batches=1"))]
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    cmd = [sys.executable, str(repo / "scripts/make_tables.py"), str(tmp_path / "results.csv"),
           "--backbones", "mae", "pacx"]
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode != 0
    assert ("1 results row(s) come from debug runs" in refused.stderr
            and "limit_test_batches=1" in refused.stderr)
    allowed = subprocess.run([*cmd, "--allow-debug"], capture_output=True, text=True, check=True)
    assert "tb" in allowed.stdout
