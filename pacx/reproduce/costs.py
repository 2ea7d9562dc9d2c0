"""What one Stage point pushes through the GPU: its settings resolved from its command line
(:func:`point_settings`) and the cost model of its LightningModule (:data:`COST_MODELS`, :func:`point_work`).

:mod:`pacx.reproduce.estimate` turns this work into GPU-hours with measured rates; the rules are in
docs/performance.md#estimate.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from pacx.constants import CHEXPERT_SPLIT_SIZES, SYMILE_SPLIT_SIZES
from pacx.data.registry import SPLITS, get_benchmark
from pacx.reproduce.plan import REPO, Node
from pacx.reproduce.profiles import flatten, merge

# ---- the settings of one Stage command -------------------------------------------------------------------


def _lift_init_args(tree):
    """jsonargparse's ``{class_path, init_args: {...}}`` as one level (``model.init_args.lr`` →
    ``model.lr``)."""
    if not isinstance(tree, Mapping):
        return tree
    out = {}
    for key, value in tree.items():
        if key == "init_args" and isinstance(value, Mapping):
            out = merge(out, _lift_init_args(value))
        else:
            out = merge(out, {key: _lift_init_args(value)})
    return out


def _nested(dotted: str, value) -> dict:
    tree = value
    for part in reversed(dotted.split(".")):
        tree = {part: tree}
    return tree


def _cli_value(text: str):
    """A command-line value as the CLI reads it (``0.01`` a float, ``true`` a bool); non-YAML text stays
    text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def point_settings(argv: Sequence[str]) -> dict[str, object]:
    """The flat settings (``trainer.max_epochs``, ``model.tuning``, ``data.benchmark``, ...) of a Stage
    command ``fit --config A --config B --trainer T --key value ...``: in argument order, each ``--config``
    file merged in, the ``--trainer`` fragment under ``trainer``, each ``--key value`` set; ``init_args``
    levels lifted."""
    args = list(argv[1:] if argv and not str(argv[0]).startswith("--") else argv)
    tree: dict = {}
    i = 0
    while i < len(args):
        flag = str(args[i])
        if not flag.startswith("--") or ("=" not in flag and i + 1 >= len(args)):
            raise ValueError(f"expected --key value pairs after the subcommand, got {args[i:]}")
        if "=" in flag:  # --key=value, and jsonargparse's append --key+=value
            name, value = flag[2:].split("=", 1)
            i += 1
        else:
            name, value = flag[2:], str(args[i + 1])
            i += 2
        if name.endswith("+"):
            name = name[:-1]
            current = flatten(tree).get(name)
            update = _nested(name, [*(current if isinstance(current, list) else []), _cli_value(value)])
        elif name == "config":
            update = yaml.safe_load(Path(value).read_text()) or {}
        elif name == "trainer" and value.endswith((".yaml", ".yml")):
            update = {"trainer": yaml.safe_load(Path(value).read_text()) or {}}
        else:
            update = _nested(name, _cli_value(value))
        tree = merge(tree, _lift_init_args(update))
    return flatten(tree)


# ---- cost models -----------------------------------------------------------------------------------------


class _Unset(Exception):
    """A setting the cost model needs is absent from the point's configs and arguments."""


def _need(settings: Mapping[str, object], key: str):
    if key not in settings:
        raise _Unset(f"{key} is not set")
    return settings[key]


def _epochs(settings: Mapping[str, object]) -> int:
    epochs = _need(settings, "trainer.max_epochs")
    if not isinstance(epochs, int) or epochs < 1:
        raise _Unset(f"trainer.max_epochs is {epochs!r}, not a number of epochs")
    return epochs


@dataclass(frozen=True)
class Work:
    """One point's GPU work: ``images`` through the GPU at the rate ``rate_key`` (None: not timed).

    ``images`` None: a dataset size the documentation does not give (``note`` says which). ``rate_scale``:
    given the rate's entry, the factor its ``img_per_s`` is multiplied by for this point and a note (rates
    measured at another configuration)."""

    rate_key: str | None
    images: int | None
    note: str = ""
    rate_scale: Callable[[Mapping], tuple[float, str]] | None = None


def _same_config(**wanted) -> Callable[[Mapping], tuple[float, str]]:
    """A ``rate_scale`` that keeps the rate and notes where it was measured at another configuration (the
    note marks the node's figure as unreliable: only the MAE is rescaled, by its analytic FLOPs)."""
    def check(entry: Mapping) -> tuple[float, str]:
        diff = [f"{k} {entry[k]} -> {v}" for k, v in wanted.items() if v is not None and entry.get(k, v) != v]
        if not diff:
            return 1.0, ""
        return 1.0, f"rate measured at another configuration ({', '.join(diff)}), not rescaled"

    return check


def _mae_flops_scale(arch: str, img_size: int, mask_ratio: float) -> Callable[[Mapping], tuple[float, str]]:
    def scale(entry: Mapping) -> tuple[float, str]:
        measured = {"arch": entry.get("arch", arch), "img_size": entry.get("img_size", img_size),
                    "mask_ratio": entry.get("mask_ratio", mask_ratio)}
        wanted = {"arch": arch, "img_size": img_size, "mask_ratio": mask_ratio}
        if measured == wanted:
            return 1.0, ""
        # torch-heavy imports; only a rate measured at another MAE configuration needs them
        from pacx.models.flops import mae_forward_flops
        from pacx.models.mae import MAE_ARCHS
        from pacx.models.vit import vit_config

        def flops(arch: str, img_size: int, mask_ratio: float) -> int:
            vit_arch, dec = MAE_ARCHS[arch]
            return mae_forward_flops(vit_config(vit_arch, img_size), dec, mask_ratio)["total"]

        diff = ", ".join(f"{k} {measured[k]} -> {wanted[k]}" for k in wanted if measured[k] != wanted[k])
        factor = flops(**measured) / flops(**wanted)
        if measured["arch"] == arch and measured["img_size"] == img_size:  # same model, other token counts
            return factor, f"rate scaled by analytic FLOPs ({diff})"
        return factor, f"rate measured at another configuration ({diff}), scaled by analytic FLOPs"

    return scale


def _mae_work(s: Mapping[str, object]) -> Work:
    epochs = _epochs(s)
    if _need(s, "data.frontal_only"):
        return Work("stage1", None,
                    "CheXpert frontal-only: size unknown (the frontal count is not documented)")
    # as DataFrame.sample(frac=)
    train = round(CHEXPERT_SPLIT_SIZES["train"] * float(_need(s, "data.fraction")))
    # the image size is set once, as data.img_size (the CLI links it to the model's)
    scale = _mae_flops_scale(str(_need(s, "model.arch")), int(_need(s, "data.img_size")),
                             float(_need(s, "model.mask_ratio")))
    return Work("stage1", epochs * train, rate_scale=scale)


def _symile_train(s: Mapping[str, object]) -> int | None:
    return SYMILE_SPLIT_SIZES.get(str(_need(s, "data.train_split")))


def _pacx_work(s: Mapping[str, object]) -> Work:
    key = f"stage2_{_need(s, 'model.tuning')}"
    train = _symile_train(s)
    if train is None:
        return Work(key, None, f"Symile split {s['data.train_split']!r}: size unknown")
    config = _same_config(arch=_need(s, "model.encoder_arch"), img_size=_need(s, "data.img_size"))
    return Work(key, _epochs(s) * train, rate_scale=config)


def _labs_dae_work(s: Mapping[str, object]) -> Work:
    train = _symile_train(s)
    images = None if train is None else _epochs(s) * train
    return Work(None, images, "Labs DAE (an MLP on 100 lab values): not timed")


def _frozen_encoder_config(s: Mapping[str, object]) -> Callable[[Mapping], tuple[float, str]]:
    """Stage 3: the image size, and the backbone's architecture where the config forces one (else the
    weights' own, unknown before the run)."""
    return _same_config(arch=s.get("model.backbone.arch"), img_size=_need(s, "data.img_size"))


def _benchmark_sizes(s: Mapping[str, object]):
    spec = get_benchmark(str(_need(s, "data.benchmark")))
    sizes = spec.split_sizes
    return spec, (sizes if set(SPLITS) <= set(sizes) else None)


def _classify_work(s: Mapping[str, object]) -> Work:
    # pandas, torch and Lightning on import: only --estimate needs them, so --help stays fast
    from pacx.data.lowdata import subset_size
    from pacx.lit.classify import FEATURE_CACHE_MODES

    spec, sizes = _benchmark_sizes(s)
    mode = _need(s, "model.mode")
    key = "probe_features" if mode == "linear_probe" else f"classify_{mode}"
    if sizes is None:
        return Work(key, None, f"{spec.name}: size unknown (split sizes not documented)")
    fraction = float(_need(s, "data.train_fraction"))
    train = sizes["train"] if fraction >= 1.0 else subset_size(sizes["train"], len(spec.labels), fraction)
    config = _frozen_encoder_config(s)
    if mode != "linear_probe":
        return Work(key, _epochs(s) * train, rate_scale=config)
    cache = FEATURE_CACHE_MODES[_need(s, "model.feature_cache")]
    if cache is None:  # the frozen backbone runs on every batch of every epoch
        return Work(key, _epochs(s) * (train + sizes["val"]) + sizes["test"], rate_scale=config)
    pairs = 2 if cache == "flip" and _need(s, "data.train_augment") else 1
    return Work(key, pairs * train + sizes["val"] + sizes["test"], rate_scale=config)


def _segment_work(s: Mapping[str, object]) -> Work:
    spec, sizes = _benchmark_sizes(s)
    if sizes is None:
        return Work("seg", None, f"{spec.name}: size unknown (split sizes not documented)")
    return Work("seg", _epochs(s) * sizes["train"], rate_scale=_frozen_encoder_config(s))


#: LightningModule class -> its cost model (settings of one point -> Work)
COST_MODELS: dict[str, Callable[[Mapping[str, object]], Work]] = {
    "pacx.lit.mae.MAEModule": _mae_work,
    "pacx.lit.pacx.PaCXModule": _pacx_work,
    "pacx.lit.labs_dae.LabsDAEModule": _labs_dae_work,
    "pacx.lit.classify.ClassificationModule": _classify_work,
    "pacx.lit.segment.SegmentationModule": _segment_work,
}


def _stage_module_class(stage: str) -> str:
    """The LightningModule a Stage script builds when its config names no ``model.class_path``: the first
    argument of the script's ``cli_main(...)`` call, read from its source (importing it would need the whole
    CLI stack)."""
    tree = ast.parse((REPO / f"{stage.replace('.', '/')}.py").read_text())
    imported = {alias.asname or alias.name: f"{node.module}.{alias.name}" for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) for alias in node.names}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "cli_main"
                and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in imported):
            return imported[node.args[0].id]
    raise _Unset(f"{stage}.py: no cli_main(<LightningModule>, ...) call to read the module from")


def point_work(node: Node, argv: Sequence[str]) -> Work:
    """The GPU work of one Stage point; a point that cannot be estimated gets ``images`` None and a note."""
    settings = point_settings(argv)
    try:
        class_path = str(settings.get("model.class_path") or _stage_module_class(str(node.target)))
        if class_path not in COST_MODELS:
            return Work(None, None, f"no cost model for {class_path}")
        return COST_MODELS[class_path](settings)
    except _Unset as err:
        return Work(None, None, str(err))
