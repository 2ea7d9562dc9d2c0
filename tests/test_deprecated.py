"""Old module paths and commands kept for one release (:mod:`pacx.deprecated`): each
warns and gives the very same module objects as its new path; ``Stage2_PACX.py``
runs a teacher config through ``pacx.teachers`` with a warning."""

from __future__ import annotations

import contextlib
import importlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pacx.teacher_cli import main as main_of_teacher_cli
from pacx.teacher_cli import names_teacher

REPO = Path(__file__).resolve().parents[1]

MOVED = [  # old name, new name, a name the module defines
    ("pacx.benchmark", "pacx.perf.train", "mae_forward_flops"),
    ("pacx.data.benchmark_dm", "pacx.data.stage3", "BenchmarkDataModule"),
    ("pacx.data.benchmarks", "pacx.data.converters", None),
    ("pacx.data.benchmarks.medmod", "pacx.data.converters.medmod", "OverlapPolicyError"),
    ("pacx.data.phantom", "pacx.demo.phantom", "generate_phantom"),
    ("pacx.data.phantom.cxr", "pacx.demo.phantom.cxr", "render_cxr"),
    ("pacx.checkpoint", "pacx.weights.checkpoint", "CheckpointError"),
]


@pytest.mark.parametrize(("old", "new", "name"), MOVED, ids=[m[0] for m in MOVED])
def test_old_module_path_warns_and_is_the_new_module(old, new, name):
    package = old.split(".")
    for i in range(len(package), 1, -1):  # import the old names afresh so their warning fires in this test
        sys.modules.pop(".".join(package[:i]), None)
    with pytest.warns(DeprecationWarning, match=r"has moved to pacx\.(perf|data|demo|weights)\."):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    if name:
        assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_old_teachers_train_path_warns_and_is_the_teacher_cli(monkeypatch):
    """pacx.teachers.train (the plans' old ``stage: pacx/teachers/train.py``) -> pacx.teacher_cli, with a
    warning; only the leaf is imported afresh, so the teacher registry stays the one every module holds."""
    monkeypatch.delitem(sys.modules, "pacx.teachers.train", raising=False)
    with pytest.warns(DeprecationWarning, match=r"has moved to pacx\.teacher_cli"):
        module = importlib.import_module("pacx.teachers.train")
    assert module is importlib.import_module("pacx.teacher_cli")
    assert module.main is main_of_teacher_cli


ENCODERS_MOVED = [  # a name of the old pacx.encoders, the module that holds it now
    ("read_encoder_weights", "pacx.weights.formats"),
    ("EncoderWeights", "pacx.weights.formats"),
    ("read_mae_state", "pacx.weights.formats"),
    ("HEAD_KEY_PREFIXES", "pacx.weights.layout"),
    ("build_encoder", "pacx.models.load"),
    ("load_encoder", "pacx.models.load"),
    ("export_encoder", "pacx.share"),
]


@pytest.mark.parametrize(("name", "new"), ENCODERS_MOVED, ids=[m[0] for m in ENCODERS_MOVED])
def test_old_encoders_names_warn_and_are_the_new_objects(name, new):
    import pacx.encoders

    with pytest.warns(DeprecationWarning, match=rf"pacx\.encoders\.{name} has moved to {new}\.{name}"):
        old = getattr(pacx.encoders, name)
    assert old is getattr(importlib.import_module(new), name)


def test_old_encoders_module_refuses_a_name_it_never_had():
    import pacx.encoders

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pacx.encoders.nope  # noqa: B018


def test_old_phantom_command_still_runs():
    out = subprocess.run([sys.executable, "-m", "pacx.data.phantom", "--help"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert "--out" in out and "--preset" in out


@pytest.mark.parametrize(("args", "teacher"), [
    (["fit", "--config", "configs/teachers/labs_dae.yaml"], True),
    (["fit", "--config=configs/demo/ecg_teacher.yaml"], True),
    (["fit", "--config", "configs/stage2/pacx_vitb_symile.yaml"], False),
    (["fit", "--config", "configs/stage2/pacx_vitb_symile.yaml", "--model", "LabsDAEModule"], True),
    (["fit", "--config", "configs/teachers/labs_dae.yaml", "--model.class_path", "pacx.lit.pacx.PaCXModule"],
     False),
    (["fit", "--data.root", "x"], False),
])
def test_names_teacher_reads_configs_and_model_arguments(monkeypatch, args, teacher):
    monkeypatch.chdir(REPO)
    assert names_teacher(args) is teacher


def _print_config(main, args: list[str]) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main([*args, "--print_config"])
    return yaml.safe_load(buf.getvalue())


def test_stage2_runs_a_teacher_config_through_the_teachers_entry_with_a_warning(tmp_path):
    import Stage2_PACX

    args = ["fit", "--config", str(REPO / "configs/teachers/labs_dae.yaml"), "--data.root", str(tmp_path)]
    with pytest.warns(FutureWarning, match="python -m pacx.teachers"):
        config = _print_config(Stage2_PACX.main, args)
    assert config["model"]["class_path"] == "pacx.lit.labs_dae.LabsDAEModule"


def test_teachers_entry_refuses_a_stage2_model(tmp_path, capsys):
    from pacx.teacher_cli import main

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs/stage2/pacx_vitb_symile.yaml"), "--data.root",
              str(tmp_path)])
    assert "PaCXModule" in capsys.readouterr().err
