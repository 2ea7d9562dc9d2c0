"""What a plan costs in GPU-hours, from measured per-GPU rates (docs/performance.md#estimate).

    python scripts/reproduce_paper.py plans/paper.yaml --estimate rates.json [--profile authors] [--json est.json]

**Rates file.** One JSON object: rate key → entry, each entry at least ``{"img_per_s": <images per second on
one GPU>}`` plus what was measured (device, precision, batch, ...). ``scripts/benchmark_train.py ... --rates
FILE`` measures the keys of :data:`RATE_COMMANDS` and merges them into the file (:func:`merge_rates`), so
one file collects Stage 1, Stage 2 and Stage 3 measurements made by separate runs.

**Cost of one point.** Each Stage node's point is resolved to its settings exactly as its command line gives
them (the ``--config`` files merged in order, the ``--trainer`` fragment, then every ``--key value``
argument: :func:`point_settings`), and its LightningModule class picks a cost model (:data:`COST_MODELS`),
which says how many images the point pushes through the GPU and at which rate:

* Stage 1 MAE (``stage1``): ``trainer.max_epochs`` × CheXpert train images (× ``data.fraction``). A rate
  measured at another mask ratio, architecture or image size is rescaled by the analytic MAE FLOPs
  (:func:`pacx.perf.train.mae_forward_flops`) and the note says so.
* Stage 2 PaCX (``stage2_<tuning>``: ``stage2_lora``, ``stage2_full``): epochs × Symile train rows.
* Stage 3 linear probe with the feature cache (``probe_features``, a frozen-encoder forward): one pass over
  the train split (twice with the flip-aware cache: image and flipped image), the validation and the test
  split; the head's training on cached features is negligible. Without the cache: epochs × (train + val)
  + test forwards. A 1 % point uses the low-data subset's size (:func:`pacx.data.lowdata.subset_size`).
* Stage 3 segmentation (``seg``): epochs × train images at the segmentation training step's rate.

``GPU-hours = images / rate / 3600``, rate per GPU: the node's GPUs are assumed to scale linearly, so the
GPU-hours do not depend on the allocation, and ``wall-hours = GPU-hours / (nodes × gpus_per_node)`` of the node's
resources (a grid's points one after another; array tasks running side by side divide it). Validation passes
of the training nodes are not counted (forward only, and small: CheXpert's 234 images, Symile's 750), nor
``drop_last`` (under one batch per epoch). Every grid point counts its own feature extraction, an upper bound:
points of the same benchmark and backbone that run after one another reuse the shared cache. Split sizes are the
documented ones (:attr:`pacx.data.registry.BenchmarkSpec.split_sizes`, :data:`pacx.constants.CHEXPERT_SPLIT_SIZES`,
:data:`pacx.constants.SYMILE_SPLIT_SIZES`); where the documentation gives none the node says "size unknown"
instead of guessing. Script nodes (converters, exports, feature extraction, tables) are not estimated.
"""

from __future__ import annotations

import ast
import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pacx.reproduce.plan import REPO, Node, Plan
from pacx.reproduce.profiles import flatten, merge

_ON_GPU = "--device cuda --precision bf16 --fused-adamw"  # on the kind of GPU the plan will run on
#: rate key -> the command that measures it
RATE_COMMANDS: dict[str, str] = {
    "stage1": f"scripts/benchmark_train.py {_ON_GPU} --compile --batch-size 256",
    "stage2_lora": f"scripts/benchmark_train.py --stage2 {_ON_GPU} --batch-size 128",
    "stage2_full": f"scripts/benchmark_train.py --stage2 {_ON_GPU} --batch-size 128",
    "seg": f"scripts/benchmark_train.py --stage3 {_ON_GPU} --batch-size 256",
    "probe_features": f"scripts/benchmark_train.py --stage3 {_ON_GPU} --batch-size 256",
}
SECONDS_PER_HOUR = 3600


# ---- the rates file ----------------------------------------------------------------------------------------------


def _check_entry(key: str, entry, where: str) -> None:
    rate = entry.get("img_per_s") if isinstance(entry, Mapping) else None
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"{where}: rate {key!r} needs a positive number img_per_s, got {entry!r}")


def read_rates(path: str | Path) -> dict[str, dict]:
    """The rates file at ``path``, checked: an object of entries, each with a positive ``img_per_s``."""
    path = Path(path)
    try:
        rates = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(rates, dict):
        raise ValueError(f"{path}: expected a JSON object of rate key -> {{\"img_per_s\": ...}}")
    for key, entry in rates.items():
        _check_entry(key, entry, str(path))
    return rates


def merge_rates(path: str | Path, entries: Mapping[str, Mapping]) -> dict[str, dict]:
    """Add ``entries`` to the rates file at ``path`` (created if missing), replacing those keys' entries and
    keeping every other key; written atomically. Returns the merged rates."""
    from pacx.utils import write_json_atomic

    path = Path(path)
    for key, entry in entries.items():
        _check_entry(key, entry, "new rates")
    rates = read_rates(path) if path.is_file() else {}
    rates.update({key: dict(entry) for key, entry in entries.items()})
    write_json_atomic(path, rates)
    return rates


# ---- the settings of one Stage command ---------------------------------------------------------------------------


def _lift_init_args(tree):
    """jsonargparse's ``{class_path, init_args: {...}}`` as one level (``model.init_args.lr`` → ``model.lr``)."""
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
    """A command-line value as the CLI reads it (``0.01`` a float, ``true`` a bool); non-YAML text stays text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def point_settings(argv: Sequence[str]) -> dict[str, object]:
    """The flat settings (``trainer.max_epochs``, ``model.tuning``, ``data.benchmark``, ...) of a Stage command
    ``fit --config A --config B --trainer T --key value ...``: in argument order, each ``--config`` file merged in,
    the ``--trainer`` fragment under ``trainer``, each ``--key value`` set; ``init_args`` levels lifted."""
    args = list(argv[1:] if argv and not str(argv[0]).startswith("--") else argv)
    tree: dict = {}
    for i in range(0, len(args), 2):
        flag = str(args[i])
        if not flag.startswith("--") or i + 1 >= len(args):
            raise ValueError(f"expected --key value pairs after the subcommand, got {args[i:]}")
        name, value = flag[2:], str(args[i + 1])
        if name == "config":
            update = yaml.safe_load(Path(value).read_text()) or {}
        elif name == "trainer" and value.endswith((".yaml", ".yml")):
            update = {"trainer": yaml.safe_load(Path(value).read_text()) or {}}
        else:
            update = _nested(name, _cli_value(value))
        tree = merge(tree, _lift_init_args(update))
    return flatten(tree)


# ---- cost models -------------------------------------------------------------------------------------------------


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

    ``images`` None: a dataset size the documentation does not give (``note`` says which). ``rate_scale``: given
    the rate's entry, the factor its ``img_per_s`` is multiplied by for this point and a note (rates measured at
    another configuration)."""

    rate_key: str | None
    images: int | None
    note: str = ""
    rate_scale: Callable[[Mapping], tuple[float, str]] | None = None


def _same_config(**wanted) -> Callable[[Mapping], tuple[float, str]]:
    """A ``rate_scale`` that keeps the rate and notes where it was measured at another configuration (the note
    marks the node's figure as unreliable: only the MAE is rescaled, by its analytic FLOPs)."""
    def check(entry: Mapping) -> tuple[float, str]:
        diff = [f"{k} {entry[k]} -> {v}" for k, v in wanted.items() if v is not None and entry.get(k, v) != v]
        return 1.0, f"rate measured at another configuration ({', '.join(diff)}), not rescaled" if diff else ""

    return check


def _mae_flops_scale(arch: str, img_size: int, mask_ratio: float) -> Callable[[Mapping], tuple[float, str]]:
    def scale(entry: Mapping) -> tuple[float, str]:
        measured = {"arch": entry.get("arch", arch), "img_size": entry.get("img_size", img_size),
                    "mask_ratio": entry.get("mask_ratio", mask_ratio)}
        wanted = {"arch": arch, "img_size": img_size, "mask_ratio": mask_ratio}
        if measured == wanted:
            return 1.0, ""
        from pacx.models.mae import MAE_ARCHS
        from pacx.models.vit import vit_config
        from pacx.perf.train import mae_forward_flops

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
    from pacx.constants import CHEXPERT_SPLIT_SIZES

    epochs = _epochs(s)
    if _need(s, "data.frontal_only"):
        return Work("stage1", None, "CheXpert frontal-only: size unknown (the frontal count is not documented)")
    train = round(CHEXPERT_SPLIT_SIZES["train"] * float(_need(s, "data.fraction")))  # as DataFrame.sample(frac=)
    # the image size is set once, as data.img_size (the CLI links it to the model's)
    scale = _mae_flops_scale(str(_need(s, "model.arch")), int(_need(s, "data.img_size")),
                             float(_need(s, "model.mask_ratio")))
    return Work("stage1", epochs * train, rate_scale=scale)


def _symile_train(s: Mapping[str, object]) -> int | None:
    from pacx.constants import SYMILE_SPLIT_SIZES

    return SYMILE_SPLIT_SIZES.get(str(_need(s, "data.train_split")))


def _pacx_work(s: Mapping[str, object]) -> Work:
    key = f"stage2_{_need(s, 'model.tuning')}"
    train = _symile_train(s)
    if train is None:
        return Work(key, None, f"Symile split {s['data.train_split']!r}: size unknown")
    return Work(key, _epochs(s) * train,
                rate_scale=_same_config(arch=_need(s, "model.encoder_arch"), img_size=_need(s, "data.img_size")))


def _labs_dae_work(s: Mapping[str, object]) -> Work:
    train = _symile_train(s)
    images = None if train is None else _epochs(s) * train
    return Work(None, images, "Labs DAE (an MLP on 100 lab values): not timed")


def _frozen_encoder_config(s: Mapping[str, object]) -> Callable[[Mapping], tuple[float, str]]:
    """Stage 3: the image size, and the backbone's architecture where the config forces one (else the weights'
    own, unknown before the run)."""
    return _same_config(arch=s.get("model.backbone.arch"), img_size=_need(s, "data.img_size"))


def _benchmark_sizes(s: Mapping[str, object]):
    from pacx.data.registry import SPLITS, get_benchmark

    spec = get_benchmark(str(_need(s, "data.benchmark")))
    sizes = spec.split_sizes
    return spec, (sizes if set(SPLITS) <= set(sizes) else None)


def _classify_work(s: Mapping[str, object]) -> Work:
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
    """The LightningModule a Stage script builds when its config names no ``model.class_path``: the first argument
    of the script's ``cli_main(...)`` call, read from its source (importing it would need the whole CLI stack)."""
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


# ---- the estimate ------------------------------------------------------------------------------------------------


@dataclass
class NodeEstimate:
    """One node's cost. ``gpu_hours`` covers the points that could be estimated (None: none could);
    ``complete`` is False when some point has no size, no rate or no timing (``notes`` say which)."""

    node: str
    kind: str
    points: int
    gpus: int  # per job: nodes × gpus_per_node
    rate_keys: list[str] = field(default_factory=list)
    images: int | None = None
    gpu_hours: float | None = None
    wall_hours: float | None = None
    complete: bool = False
    notes: list[str] = field(default_factory=list)


def missing_rate_note(key: str, rates_path: str | Path) -> str:
    command = RATE_COMMANDS.get(key)
    if command is None:
        return f"no rate for {key} (no benchmark measures it)"
    return f"no rate for {key}: run {command} --rates {rates_path}"


def estimate_node(node: Node, rates: Mapping[str, Mapping], rates_path: str | Path = "RATES.json") -> NodeEstimate:
    r = node.resources
    est = NodeEstimate(node.name, node.kind, len(node.points), r.nodes * r.gpus_per_node)
    if node.kind != "stage":
        est.notes.append("script on GPU: not estimated" if est.gpus else "script (CPU): no GPU time")
        est.complete = not est.gpus
        return est
    notes: Counter[str] = Counter()
    missing: list[str] = []  # rate keys without a rate, noted once per node
    images, hours, counted = 0, 0.0, False
    for point in node.points:
        work = point_work(node, point.argv)
        if work.rate_key and work.rate_key not in est.rate_keys:
            est.rate_keys.append(work.rate_key)
        entry = rates.get(work.rate_key) if work.rate_key else None
        if work.rate_key and entry is None and work.rate_key not in missing:
            missing.append(work.rate_key)
        if work.images is None or work.rate_key is None:
            notes[work.note] += 1
        if work.images is None:
            continue
        images += work.images
        if entry is None:
            continue
        rate = float(entry["img_per_s"])
        if work.rate_scale is not None:
            factor, note = work.rate_scale(entry)
            rate *= factor
            if note:
                notes[note] += 1
        hours += work.images / rate / SECONDS_PER_HOUR
        counted = True
    est.images = images if images or not notes else None
    if counted:
        est.gpu_hours = hours
        est.wall_hours = hours / est.gpus if est.gpus else None
    if counted and not est.gpus:
        notes["no GPU asked (resources.gpus_per_node 0): wall-hours not computed"] += 1
    est.complete = counted and not missing and not any(_is_gap(n) for n in notes)
    est.notes = [n if count == est.points or est.points == 1 else f"{n} ({count} of {est.points} points)"
                 for n, count in notes.items()] + [missing_rate_note(key, rates_path) for key in missing]
    return est


def _is_gap(note: str) -> bool:
    """Notes that leave a node's figure short of its true cost (the rest only explain it)."""
    return not note.startswith("rate scaled")


def estimate_plan(plan: Plan, rates: Mapping[str, Mapping],
                  rates_path: str | Path = "RATES.json") -> list[NodeEstimate]:
    return [estimate_node(node, rates, rates_path) for node in plan.nodes.values()]


def format_hours(hours: float | None) -> str:
    if hours is None:
        return "-"
    return f"{hours:,.1f}" if hours >= 10 else f"{hours:.3g}"


def format_estimate(plan: Plan, rows: list[NodeEstimate], rates: Mapping[str, Mapping],
                    rates_path: str | Path) -> str:
    """The table (node, points, images, rate key, GPU-hours, GPUs per job, wall-hours, notes) and the total."""
    profile = f" (profile {plan.profile})" if plan.profile else ""
    lines = [f"# GPU-hour estimate of plan {plan.name}{profile} from {rates_path} (docs/performance.md#estimate)"]
    for key in sorted({k for row in rows for k in row.rate_keys if k in rates}):
        e = rates[key]
        what = ", ".join(str(e[k]) for k in ("device_name", "precision") if e.get(k))
        batch = f", batch {e['batch']}" if e.get("batch") else ""
        rate = float(e["img_per_s"])
        lines.append(f"# {key}: {rate:,.1f} images/s per GPU ({what or 'unspecified device'}{batch})")
    header = ("node", "points", "images", "rate", "GPU-h", "GPUs", "wall-h", "note")
    cells = [header] + [(row.node, str(row.points), "-" if row.images is None else f"{row.images:,}",
                         ",".join(row.rate_keys) or "-", format_hours(row.gpu_hours), str(row.gpus),
                         format_hours(row.wall_hours), "; ".join(row.notes)) for row in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header) - 1)]
    for c in cells:
        row = "  ".join(v.ljust(w) if i in (0, 3) else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths)))
        lines.append(row + ("  " + c[-1] if c[-1] else ""))
    total = sum(row.gpu_hours or 0.0 for row in rows)
    short = [row.node for row in rows if not row.complete]
    lines.append(f"total: {format_hours(total)} GPU-hours"
                 + (f" (without what is missing for {', '.join(short)})" if short else ""))
    return "\n".join(lines) + "\n"


def estimate_json(plan: Plan, rows: list[NodeEstimate], rates_path: str | Path) -> dict:
    return {"plan": str(plan.path), "name": plan.name, "profile": plan.profile, "rates": str(rates_path),
            "nodes": {row.node: {k: v for k, v in vars(row).items() if k != "node"} for row in rows},
            "total_gpu_hours": sum(row.gpu_hours or 0.0 for row in rows),
            "complete": all(row.complete for row in rows)}
