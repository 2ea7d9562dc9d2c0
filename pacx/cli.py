"""The LightningCLI shared by ``Stage1_MAE.py``, ``Stage2_PACX.py`` and ``Stage3_eval.py``.

Adds, in one place: the run directory (``trainer.default_root_dir``, required) with its resolved config, logs,
checkpoints and ``run.json``; history kept across attempts; debug-run marking; ``--ckpt_path last`` and
checked checkpoint loading; no silent overwrite of a run; exact resumes and SLURM requeue; the image size set
once as ``data.img_size``. Each point in detail: docs/design.md#cli.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import yaml
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.plugins.io import CheckpointIO

from pacx.data.leakage import check_stage3_overlap
from pacx.debug import FROM_DEBUG_RUN, allow_debug_runs
from pacx.lit.callbacks import EmbeddingWriter, RunRecord
from pacx.lit.common import check_checkpoint_stage
from pacx.lit.history import HistoryCSVLogger, log_location, next_attempt
from pacx.lit.resilience import (
    AtomicCheckpointIO,
    LastCheckpoint,
    RunRequeued,
    SlurmRequeue,
    StepSeeds,
    slurm_allocation,
    slurm_managed,
    slurm_restart_count,
)
from pacx.run_record import fit_lock
from pacx.weights.checkpoint import CheckpointError, safe_torch_load

log = logging.getLogger(__name__)

WandbMode = Literal["offline", "online", "disabled"]

# Third-party warnings that say nothing about a pacx run; cli_main silences them (by message, for its run).
QUIET_WARNINGS = (
    # Lightning's hint to prepend srun, given wherever srun is installed: pacx submits its own Slurm jobs
    # (scripts/slurm, the plan driver) and runs outside a Slurm job by design when started from a shell.
    r"The `srun` command is available on your system but is not used",
    # torch 2.14 deprecates an isinstance check inside Lightning's own pytree helper: nothing to change here.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # frozen backbones and teachers stay in eval mode on purpose (docs/design.md#cli)
    r"Found \d+ module\(s\) in eval mode at the start of training",
)


class RunConfig(SaveConfigCallback):
    """Saves the resolved config where the run's CSV history goes, whatever the loggers:
    ``<run_dir>/config.yaml`` for ``fit`` (what a resume compares against),
    ``<run_dir>/<subcommand>/config.yaml`` for ``validate`` / ``test`` / ``predict``. (Lightning's own
    callback writes to the trainer's log_dir, which without a logger is the run directory: a ``validate``
    then overwrote the fit's config.)"""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})

    def save_config(self, trainer, pl_module, stage: str) -> None:  # rank zero only (Lightning's setup)
        folder = Path(trainer.default_root_dir) / log_location(trainer.state.fn.value)
        folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(folder / self.config_filename), skip_none=False, overwrite=True,
                         multifile=self.multifile)


class PacxCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_callback", RunConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--wandb", type=WandbMode, default="offline",
                            help="wandb logging: offline (default), online, or disabled")
        parser.add_argument("--checkpoint_every_n_steps", type=int | None, default=None,
                            help="also save checkpoints/last.ckpt every N optimizer steps (a hard kill then "
                                 "loses at most N steps); default: at validation / epoch ends only")
        parser.add_argument("--allow_debug", type=bool, default=False,
                            help="accept weights of a debug run (fast_dev_run / overfit_batches / limit_*) "
                                 "as init_encoder or backbone; this run is then marked as a debug run too")
        self.link_image_size(parser)

    def link_image_size(self, parser) -> None:
        """The image size is set once, as ``data.img_size``; the model's follows it (Stage 1
        ``model.img_size``, Stage 2 ``model.init_args.img_size``, ignored by a module without one such as the
        Labs DAE)."""
        target = "model.init_args.img_size" if self.subclass_mode_model else "model.img_size"
        parser.link_arguments("data.img_size", target)

    # ---- debug runs -------------------------------------------------------------------------------

    def _allow_debug(self) -> bool:
        return bool(self._get(self.config, "allow_debug", default=False))

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; a debug input let through by ``--allow_debug`` marks the module, and
        a refused one is raised as itself (jsonargparse would bury it in a "does not validate" error)."""
        with allow_debug_runs(self._allow_debug()) as seen:
            try:
                super().instantiate_classes()
            except Exception as err:
                if seen.refused:
                    raise seen.refused[-1] from err
                raise
        if seen.let_through and hasattr(self.model, "inherited_debug_flags"):
            self.model.inherited_debug_flags = {FROM_DEBUG_RUN: 1}

    def _run_subcommand(self, subcommand: str) -> None:
        # one fit per run directory at a time (rank zero holds the lock; other ranks share its run)
        locked = subcommand == "fit" and self.trainer.global_rank == 0
        with allow_debug_runs(self._allow_debug()) as seen, \
                (fit_lock(self.run_dir) if locked else contextlib.nullcontext()):
            if hasattr(self.model, "debug_inputs"):  # inputs loaded in setup mark the run as well
                self.model.debug_inputs = seen
            super()._run_subcommand(subcommand)

    # ---- run directory, loggers, checkpoints --------------------------------------------------

    @property
    def run_dir(self) -> Path:
        root = self._get(self.config_init, "trainer", default={}).get("default_root_dir")
        if not root:
            raise ValueError("set trainer.default_root_dir: it is the run directory "
                             "(checkpoints, logs, run.json)")
        return Path(root)

    def _loggers(self, run_dir: Path, attempt: int) -> list:
        loggers = [HistoryCSVLogger(run_dir, version=log_location(self.subcommand), attempt=attempt)]
        mode = self._get(self.config_init, "wandb", default="offline")
        if mode != "disabled":
            loggers.append(WandbLogger(project="pacx", name=run_dir.name, save_dir=str(run_dir),
                                       offline=mode == "offline", group=self.model.stage))
        return loggers

    def instantiate_trainer(self, **kwargs):
        config = dict(self._get(self.config_init, "trainer", default={}))
        run_dir = self.run_dir
        ckpt_dir = run_dir / "checkpoints"
        attempt = next_attempt(run_dir) if self.subcommand == "fit" else 1
        if config.get("logger") in (None, True):
            config["logger"] = self._loggers(run_dir, attempt)
        metric, mode = self.model.monitor
        callbacks = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        every = self._get(self.config_init, "checkpoint_every_n_steps") or 0
        self.best_checkpoint = ModelCheckpoint(
            dirpath=str(ckpt_dir), filename="best-{epoch:03d}-{step}", monitor=metric, mode=mode,
            save_last=False, save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False)
        callbacks += [
            self.best_checkpoint,
            LastCheckpoint(ckpt_dir, every_n_train_steps=every),
            RunRecord(run_dir, self.model.stage, config_path=str(run_dir / "config.yaml"), command=sys.argv,
                      final_status=self.fit_status, attempt=attempt, subcommand=self.subcommand),
            StepSeeds(),
            *self.extra_callbacks(),
        ]
        plugins = list(config.get("plugins") or [])
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        if slurm_managed():
            nodes, tasks = slurm_allocation()
            if (config.get("num_nodes"), config.get("devices")) != (nodes, tasks):
                log.info("SLURM allocation: trainer.num_nodes=%d, trainer.devices=%d (config: %s, %s)", nodes,
                         tasks, config.get("num_nodes"), config.get("devices"))
            config["num_nodes"], config["devices"] = nodes, tasks
            plugins.append(SLURMEnvironment(auto_requeue=False))
            if self.subcommand == "fit":
                callbacks.append(SlurmRequeue(ckpt_dir / "last.ckpt"))
        config["plugins"] = plugins
        return self._instantiate_trainer({**config, **kwargs}, callbacks)

    #: run.json status when ``fit`` ends (Stage 3 writes "completed" only after its test).
    fit_status = "completed"

    def extra_callbacks(self) -> list:
        """Callbacks a subclass adds for its subcommands."""
        return []

    # ---- checkpoint handling --------------------------------------------------------------------

    def _expected_stage(self, sub: str) -> str:
        model_cfg = self.config[sub].get("model")
        class_path = model_cfg.get("class_path") if hasattr(model_cfg, "get") else None
        if class_path:
            module, _, name = class_path.rpartition(".")
            return getattr(importlib.import_module(module), name).stage
        return self._model_class.stage

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path`` (``last`` = this run's last.ckpt), open it safely and check its stage
        before Lightning reads its hyperparameters (also with ``weights_only=True``)."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        ckpt = self.config[sub].get("ckpt_path")
        root = self.config[sub].get("trainer", {}).get("default_root_dir")
        if ckpt != "last" and sub == "fit" and root and slurm_restart_count() > 0 \
                and (Path(root) / "checkpoints" / "last.ckpt").is_file():
            # the requeued job reruns the first job's command line: a --ckpt_path there (another run's
            # checkpoint this run started from) would throw away this run's steps
            log.info("requeued SLURM job (restart %d): resuming from last.ckpt%s", slurm_restart_count(),
                     f" (not --ckpt_path {ckpt}, where the first job started)" if ckpt else "")
            ckpt = "last"
        if ckpt:
            if ckpt == "last":
                if not root:
                    raise ValueError("--ckpt_path last needs trainer.default_root_dir (the run to resume)")
                path = Path(root) / "checkpoints" / "last.ckpt"
                if not path.is_file():
                    raise FileNotFoundError(f"--ckpt_path last: no {path} to resume from")
            else:
                path = Path(ckpt)
            check_checkpoint_stage(safe_torch_load(path), self._expected_stage(sub), str(path))
            self.config[sub]["ckpt_path"] = str(path)
            log.info("%s from checkpoint %s", sub, path)
        given = model_arguments(self.config[sub].get("model"))
        super()._parse_ckpt_path()  # Lightning: the model's hyperparameters come from the checkpoint
        if ckpt:
            used = model_arguments(self.config[sub].get("model"))
            replaced = [f"model.{k}: given {given[k]!r}, checkpoint {used[k]!r}"
                        for k in sorted(given.keys() & used.keys()) if given[k] != used[k]]
            if replaced:
                warnings.warn(f"{sub} --ckpt_path {self.config[sub]['ckpt_path']}: the model is built with "
                              "the checkpoint's hyperparameters, not the given ones (" + "; ".join(replaced)
                              + "); to change them, start a new run (init_from / init_encoder)", UserWarning,
                              stacklevel=2)

    def _prepare_subcommand(self, subcommand: str) -> None:
        cfg = self.config_init[subcommand]
        if cfg.get("weights_only") is False:
            raise ValueError("pacx checkpoints never need weights_only=False; it stays True")
        cfg["weights_only"] = True
        ckpt_dir = self.run_dir / "checkpoints"
        if subcommand == "fit" and ckpt_dir.is_dir() and any(ckpt_dir.glob("*.ckpt")):
            ckpt = cfg.get("ckpt_path")
            if ckpt is None:
                raise FileExistsError(
                    f"{ckpt_dir} already holds checkpoints: pass --ckpt_path last to resume, or set "
                    "another trainer.default_root_dir"
                )
            if Path(ckpt).resolve().parent != ckpt_dir.resolve():
                raise FileExistsError(
                    f"{ckpt_dir} already holds checkpoints of its own run, and --ckpt_path {ckpt} is not one "
                    "of them: resuming from it would overwrite that run. Set another "
                    "trainer.default_root_dir to continue from it, or pass --ckpt_path last to resume this "
                    "run"
                )

    #: data arguments that place the data rather than choose it: free to change when a run resumes
    PLACEMENT_ARGUMENTS = frozenset({"root", "num_workers", "pin_memory", "train_cache", "val_cache"})

    def _check_resumed_config(self) -> None:
        """Warn when a resumed ``fit`` changes the seed or the data arguments of the config the run was
        started with (``<run_dir>/config.yaml``, about to be overwritten): a resume is exact only with the
        same ones."""
        saved_path = self.run_dir / "config.yaml"
        if not self.config["fit"].get("ckpt_path") or not saved_path.is_file():
            return
        try:
            saved = yaml.safe_load(saved_path.read_text()) or {}
        except yaml.YAMLError:
            return
        now = yaml.safe_load(self._parser("fit").dump(self.config["fit"], skip_none=False))

        def chosen(cfg: dict) -> dict:
            data = {f"data.{k}": v for k, v in model_arguments(cfg.get("data") or {}).items()
                    if k.rpartition(".")[2] not in self.PLACEMENT_ARGUMENTS}
            return {"seed_everything": cfg.get("seed_everything"), **data}

        before, after = chosen(saved), chosen(now)
        changed = [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(before.keys() | after.keys())
                   if before.get(k) != after.get(k)]
        if changed:
            warnings.warn(f"resuming {self.run_dir} with another seed or data than it was started with "
                          f"({saved_path}): " + "; ".join(changed) + ". The resumed steps differ from an "
                          "uninterrupted run's; config.yaml now records the new values", UserWarning,
                          stacklevel=2)

    def before_fit(self) -> None:
        self._prepare_subcommand("fit")
        self._check_resumed_config()

    def before_validate(self) -> None:
        self._prepare_subcommand("validate")

    def before_test(self) -> None:
        self._prepare_subcommand("test")

    def before_predict(self) -> None:
        self._prepare_subcommand("predict")


class EvalCLI(PacxCLI):
    """Stage 3: model and data are any :class:`~pacx.lit.common.BenchmarkEvalModule` /
    :class:`~pacx.data.stage3.SplitsDataModule` pair named by ``class_path`` in the config (classification or
    segmentation). The benchmark and the image size are set once on the data side (``data.benchmark`` →
    ``model.benchmark``, ``data.img_size`` → ``model.backbone.img_size``). Before ``fit`` and ``test`` the
    test split is checked against the backbone's Stage 2 admissions (an error on shared training admissions
    unless ``--allow_overlap true``; :mod:`pacx.data.leakage`). ``fit`` ends by testing its best checkpoint,
    so one command trains and evaluates. ``predict`` writes the backbone's CLS embeddings of ``data.manifest``
    to ``--embeddings_out`` (default ``<default_root_dir>/embeddings.npy``), in manifest row order. Under
    ``fast_dev_run`` (which saves no checkpoint) the test after ``fit`` runs on the weights in memory; the
    results row is marked debug."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--embeddings_out", type=str | None, default=None,
                            help="predict: output .npy (default <trainer.default_root_dir>/embeddings.npy)")
        parser.add_argument("--test_table", type=bool, default=True,
                            help="fit: print Lightning's table of the test metrics at the end (false: one "
                                 "log line; the metrics go to metrics.csv and results.csv either way)")
        parser.add_argument("--allow_overlap", type=bool, default=False,
                            help="evaluate even when the test split shares admissions with the backbone's "
                                 "Stage 2 training admissions (warned about and recorded in the results row)")
        parser.link_arguments("data.init_args.benchmark", "model.init_args.benchmark")

    def link_image_size(self, parser) -> None:
        parser.link_arguments("data.init_args.img_size", "model.init_args.backbone.img_size")

    def extra_callbacks(self) -> list:
        if self.subcommand != "predict":
            return []
        out = self._get(self.config_init, "embeddings_out") or str(self.run_dir / "embeddings.npy")
        return [EmbeddingWriter(out)]

    fit_status = "trained"

    def _prepare_subcommand(self, subcommand: str) -> None:
        super()._prepare_subcommand(subcommand)
        if subcommand in ("fit", "test"):
            self._check_overlap()

    def _check_overlap(self) -> None:
        """Refuse a backbone whose Stage 2 admissions overlap the test split (:mod:`pacx.data.leakage`); the
        outcome goes into the results row."""
        manifest_dir = getattr(self.datamodule, "hparams", {}).get("manifest_dir")
        spec, backbone = getattr(self.datamodule, "spec", None), getattr(self.model, "backbone_cfg", None)
        if not (manifest_dir and spec and backbone):
            return
        allow = bool(self._get(self.config, "allow_overlap", default=False))
        self.model.leakage_fields = check_stage3_overlap(
            backbone.kind, backbone.weights, Path(manifest_dir) / spec.manifest_files["test"], allow)

    def after_fit(self) -> None:
        # The best checkpoint on the module's monitor metric, named rather than "best": Lightning's "best" is
        # the first ModelCheckpoint among the callbacks, which a config's own trainer.callbacks could be.
        # fast_dev_run writes no checkpoint to test.
        ckpt = None if self.trainer.fast_dev_run else (self.best_checkpoint.best_model_path or "best")
        table = bool(self._get(self.config, "test_table", default=True))
        results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt, weights_only=True,
                                    verbose=table)
        if not table and self.trainer.is_global_zero:
            log.info("%s: %s", self.run_dir, ", ".join(
                f"{k} {v:.4f}" for metrics in results for k, v in sorted(metrics.items())))
        for cb in self.trainer.callbacks:
            if isinstance(cb, RunRecord):
                cb.write(self.trainer, "completed")


def model_arguments(model) -> dict:
    """A parsed ``model`` config as flat ``{"dotted.key": value}``: a subclass config's ``init_args`` and
    ``dict_kwargs`` (where Lightning puts a checkpoint's hyperparameters) merged, tuples as lists."""
    if model is None:
        return {}
    tree = model.as_dict() if hasattr(model, "as_dict") else dict(model)
    if "class_path" in tree:
        tree = {"class_path": tree["class_path"], **(tree.get("init_args") or {}),
                **(tree.get("dict_kwargs") or {})}
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = list(value) if isinstance(value, tuple) else value

    walk("", tree)
    return flat


@contextlib.contextmanager
def as_script(program: str | Path, args: list[str]) -> Iterator[None]:
    """Within the block, this process looks as if started by ``python <program> <args...>`` (a ``.py``
    file) or ``python -m <program> <args...>`` (a module name): ``sys.argv[1:]`` is ``args``, and
    ``__main__``'s module spec is none or the module's. Lightning's DDP launcher starts ranks > 0 by
    re-running that command line, and ``run.json`` records ``sys.argv``. Without this, a Stage run called in
    process (the plan executor, the demo, a notebook) would record its caller's command line and, with
    ``trainer.devices`` > 1 outside Slurm, start its other ranks by re-running the caller: the demo or the
    whole plan driver. Both are restored on exit."""
    if str(program).endswith(".py"):
        argv0, spec = os.path.abspath(program), None
    else:
        try:
            spec = importlib.util.find_spec(f"{program}.__main__")
        except ModuleNotFoundError:
            spec = None
        if spec is None or spec.origin is None:
            raise ValueError(f"{program!r} is neither a .py script nor a module runnable with python -m")
        argv0 = spec.origin
    main = sys.modules.get("__main__")
    saved_argv, saved_spec = sys.argv, getattr(main, "__spec__", None)
    sys.argv = [argv0, *args]
    if main is not None:
        main.__spec__ = spec
    try:
        yield
    finally:
        sys.argv = saved_argv
        if main is not None:
            main.__spec__ = saved_spec


def cli_main(model_class, datamodule_class, args: list[str] | None = None, cli_class: type[PacxCLI] = PacxCLI,
             program: str | Path | None = None, **kwargs) -> PacxCLI:
    """Entry point of every Stage script. ``program``: what runs this entry point from a shell, a script file
    (the Stage scripts pass their ``__file__``) or a module for ``python -m`` (``pacx.teachers``); with
    ``args`` given, the run then behaves exactly as that command line would (:func:`as_script`)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    scope = contextlib.nullcontext()
    if args is not None and program is not None:
        scope, args = as_script(program, list(args)), None  # LightningCLI then parses sys.argv[1:] = args
    try:
        with scope, warnings.catch_warnings():
            for message in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            return cli_class(model_class, datamodule_class, args=args, **kwargs)
    except RunRequeued as stop:  # checkpoint saved and job requeued: a clean exit, not a crash
        log.info("%s; the requeued job resumes from last.ckpt", stop)
        raise SystemExit(0) from None


__all__ = ["CheckpointError", "EvalCLI", "PacxCLI", "as_script", "cli_main"]
