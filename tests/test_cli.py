"""The shared Stage CLI (:mod:`pacx.cli`): the image size is set once, as
``data.img_size``, in every stage; a Stage run called in process looks like its own command line."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from pacx.cli import QUIET_WARNINGS, EvalCLI, PacxCLI, as_script, cli_main
from pacx.data.chexpert import CheXpertDataModule
from pacx.data.stage3 import SplitsDataModule
from pacx.data.symile import SymileMIMICDataModule
from pacx.lit.common import BenchmarkEvalModule, StagedModule
from pacx.lit.mae import MAEModule


def _instantiate(cli_class, model, data, args, **kwargs):
    """Model and data of a Stage CLI parse, without a trainer or a subcommand."""

    class Parsed(cli_class):
        def instantiate_trainer(self, **_):
            return None

    return Parsed(model, data, args=[*args, "--wandb", "disabled"], run=False, **kwargs)


def test_stage1_model_takes_the_data_image_size(repo, chexpert_release, tmp_path):
    cli = _instantiate(PacxCLI, MAEModule, CheXpertDataModule, [
        "--config", str(repo / "configs/stage1/mae_vitb_chexpert.yaml"), "--data.root", str(chexpert_release),
        "--model.arch", "mae_vit_test", "--data.img_size", "32", "--trainer.default_root_dir", str(tmp_path)])
    assert cli.model.hparams.img_size == 32 and cli.model.model.patch_embed.img_size == (32, 32)


def test_stage2_model_takes_the_data_image_size(repo, tmp_path):
    cli = _instantiate(PacxCLI, StagedModule, SymileMIMICDataModule, [
        "--config", str(repo / "configs/stage2/pacx_vitb_symile.yaml"), "--data.root", str(tmp_path),
        "--model.init_args.encoder_arch", "vit_test", "--data.img_size", "32",
        "--trainer.default_root_dir", str(tmp_path)], subclass_mode_model=True)
    assert cli.model.hparams.img_size == 32 and cli.model.vit_cfg.img_size == 32


def test_stage2_module_without_an_image_size_ignores_the_link(repo, tmp_path):
    cli = _instantiate(PacxCLI, StagedModule, SymileMIMICDataModule, [
        "--config", str(repo / "configs/teachers/labs_dae.yaml"), "--data.root", str(tmp_path),
        "--data.img_size", "32", "--trainer.default_root_dir", str(tmp_path)], subclass_mode_model=True)
    assert "img_size" not in cli.model.hparams


@pytest.mark.parametrize("configs",
                         [("linear_probe.yaml", "lp/tb.yaml"), ("segmentation.yaml", "seg/qata.yaml")])
def test_stage3_backbone_takes_the_data_image_size(repo, tmp_path, configs):
    args = [a for c in configs for a in ("--config", str(repo / "configs/stage3" / c))]
    cli = _instantiate(EvalCLI, BenchmarkEvalModule, SplitsDataModule, [
        *args, "--model.backbone.kind", "random", "--model.backbone.arch", "vit_test", "--data.img_size",
        "32", "--data.root", str(tmp_path), "--data.manifest_dir", str(tmp_path),
        "--trainer.default_root_dir", str(tmp_path)])
    assert cli.model.backbone_cfg.img_size == 32


def test_teachers_command_runs_as_a_module(repo):
    """``python -m pacx.teachers fit --help``: the package's entry point runs :mod:`pacx.teacher_cli`, the
    shared CLI on any TeacherModule and the Symile data module."""
    out = subprocess.run([sys.executable, "-m", "pacx.teachers", "fit", "--help"], cwd=repo,
                         capture_output=True, text=True, check=True).stdout
    assert "subclass of TeacherModule" in out and "--data.root" in out


def test_as_script_makes_lightning_relaunch_the_program_and_restores_argv_and_the_main_spec(repo):
    """Inside ``as_script``, Lightning's DDP launcher would start ranks > 0 with the program's own command
    line (a script, or ``-m`` for a module); ``sys.argv`` and ``__main__.__spec__`` come back afterwards."""
    from lightning_fabric.strategies.launchers.subprocess_script import _basic_subprocess_cmd

    main = sys.modules["__main__"]
    argv, spec = list(sys.argv), getattr(main, "__spec__", None)
    with as_script(repo / "Stage1_MAE.py", ["fit", "--config", "c.yaml"]):
        assert sys.argv == [str(repo / "Stage1_MAE.py"), "fit", "--config", "c.yaml"]
        assert list(_basic_subprocess_cmd()) == [sys.executable, *sys.argv]
    assert sys.argv == argv and main.__spec__ is spec
    with as_script("pacx.teachers", ["fit", "--config", "t.yaml"]):
        assert sys.argv[0] == str(repo / "pacx" / "teachers" / "__main__.py")
        assert list(_basic_subprocess_cmd()) == [sys.executable, "-m", "pacx.teachers.__main__", "fit",
                                                 "--config", "t.yaml"]
    assert sys.argv == argv and main.__spec__ is spec
    with pytest.raises(ValueError, match="neither a .py script nor a module"):
        with as_script("pacx.no_such_module", []):
            pass
    with pytest.raises(RuntimeError, match="inside"), as_script("x.py", ["a"]):
        raise RuntimeError("inside")
    assert sys.argv == argv and main.__spec__ is spec


def test_cli_main_silences_only_the_listed_third_party_warnings():
    """The warnings of pacx.cli.QUIET_WARNINGS, as Lightning and torch word them, are silenced for the run;
    any other warning still reaches the user, and the filters end with the run."""
    emitted = [
        "The `srun` command is available on your system but is not used. HINT: If your intention is ...",
        "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and ...`",
        "Found 94 module(s) in eval mode at the start of training. This may lead to unexpected behavior ...",
        "something a user should see",
    ]

    class Emitter:
        def __init__(self, model_class, datamodule_class, args=None, **kwargs) -> None:
            for message in emitted:
                warnings.warn(message, UserWarning, stacklevel=1)

    assert len(QUIET_WARNINGS) == 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli_main(None, None, args=[], cli_class=Emitter)
        warnings.warn(emitted[0], UserWarning, stacklevel=1)  # after the run: shown again
    assert [str(w.message) for w in caught] == [emitted[3], emitted[0]]
