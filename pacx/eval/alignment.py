"""Alignment evaluation (docs/datasets.md#alignment; docs/method.md#stage-3): how much ECG / labs information a CXR
encoder carries, measured by ridge probes onto the frozen teacher embeddings, and zero-shot 1-of-10
retrieval through a Stage 2 run's own projection heads. Any registered teacher (``pacx.teachers.TEACHERS``)
is a target: ``load_split(..., teachers=...)`` names the feature files read (default ECG and labs).

Plain functions on arrays and encoders (no LightningModule), in pipeline order:

- :func:`load_split` memory-maps one Symile-MIMIC split after checking its layout
  (:func:`pacx.data.symile_files.validate_split`: missing files, row counts and widths are errors naming
  the files); :func:`extract_cxr_features` runs an encoder over ``cxr_<split>.npy`` in batches.
- :func:`ridge_probe`: ``StandardScaler`` on X (fitted on the fit rows) → ``Ridge(alpha=10, solver="svd")``,
  multi-output, Y not standardised; fitted on the rows :func:`fit_indices` keeps.
- :func:`alignment_metrics`: R², raw and centred cosine, permutation baselines, R@1/5/10, duplicate rows.
- :func:`load_stage2_heads`, :func:`stage2_pool`, :func:`retrieval_groups`, :func:`zero_shot_accuracy`,
  :func:`zero_shot_retrieval`: CXR→teacher retrieval among each query's candidates on ``test``, for each
  teacher the Stage 2 run has heads of.

Fit set: the reference fits on what a ``shuffle=True, drop_last=True`` loader with batch 256 yields,
9,984 of the 10,000 train rows. :func:`fit_indices` reproduces that count, and the random choice of the
dropped rows, with a seeded NumPy permutation; the very rows the reference dropped depended on its torch
RNG state and cannot be recovered (a 0.16 % difference in the fit set).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from pacx.checkpoint import (
    CheckpointError,
    load_state_checked,
    resolve_run_checkpoint,
    safe_torch_load,
    strip_prefix,
)
from pacx.constants import STAGE_PACX
from pacx.data.symile import resize_normalized
from pacx.data.symile_files import SymileFileError, open_npy, validate_split
from pacx.models.heads import FeatureNorm, ProjectionHead, TeacherNorm, upgrade_head_keys
from pacx.teachers import DEFAULT_TEACHERS, resolve_teachers, teacher_spec

log = logging.getLogger(__name__)

EVAL_ITEM = "cxr"  # the item kind whose files (CXR, ids, labels) the evaluation reads, beside the teachers'
RECALL_KS = (1, 5, 10)
FIT_BATCH = 256  # the reference's probe loader batch (shuffle=True, drop_last=True)

# ------------------------------------------------------------------------------------------ data + features


@dataclass(frozen=True)
class SymileSplit:
    """Memory maps of one split, keyed as in ``pacx.data.symile_files.FILES``: ``cxr`` [N, 3, H, W],
    ``hadm_id`` [N], for retrieval splits ``label`` / ``label_hadm_id`` [N], and each teacher's features
    (``ecg_features`` [N, 1024], ``labs_features`` [N, 256], ...). ``targets`` maps teacher -> file key."""

    name: str
    paths: dict[str, Path]
    arrays: dict[str, np.ndarray]
    targets: dict[str, str]

    def __len__(self) -> int:
        return len(self.arrays["hadm_id"])


def load_split(
    root: str | Path, split: str, check_values: bool = False, teachers: Sequence[str] = DEFAULT_TEACHERS
) -> SymileSplit:
    """Validate and memory-map ``<root>/<split>/`` for the evaluation: the CXRs and the feature files of
    ``teachers`` (registered names).

    Layout is always checked (each file present, one N across files; teacher features of any width, 1024 /
    256 for the release teachers); ``check_values`` also scans for NaN/inf and non-binary labels (slow on the multi-GB CXR arrays).
    """
    if not Path(root).is_dir():
        raise FileNotFoundError(f"Symile-MIMIC root is not a directory: {root}")
    specs = [teacher_spec(t) for t in resolve_teachers(teachers)]
    paths = validate_split(root, split, EVAL_ITEM, check_values=check_values, extra=[s.feature_spec for s in specs])
    return SymileSplit(split, paths, {key: open_npy(path) for key, path in paths.items()},
                       {s.name: s.feature_key for s in specs})


@torch.inference_mode()
def extract_cxr_features(
    encoder: nn.Module,
    cxr: np.ndarray,
    img_size: int = 224,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    rows: np.ndarray | None = None,
    source: str = "cxr array",
) -> np.ndarray:
    """CLS features, float32 [N, D], of ImageNet-normalised CXRs ``cxr`` [N, 3, H, W] (e.g. a memmap).

    docs/datasets.md#alignment: each image is only resized to ``img_size`` with antialias (``resize_normalized``), with no
    augmentation and no renormalisation; the encoder runs in eval mode without gradients. ``rows``
    selects rows (in the given order) instead of all of them; if the encoder returns tokens
    [B, T, D], the CLS token (index 0) is taken. ``source`` names the array in errors.
    """
    if cxr.ndim != 4 or cxr.shape[1] != 3:
        raise SymileFileError(f"{source}: expected CXRs of shape [N, 3, H, W], got {list(cxr.shape)}")
    n = len(cxr) if rows is None else len(rows)
    resize = resize_normalized(img_size)
    was_training = encoder.training
    encoder.eval().to(device)
    out: list[torch.Tensor] = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        picked = cxr[start:stop] if rows is None else cxr[np.asarray(rows[start:stop])]  # slices read contiguously
        batch = np.array(picked, dtype=np.float32)  # a copy out of the memmap
        feats = encoder(resize(torch.from_numpy(batch).to(device)))  # [B, D] (or [B, T, D])
        out.append((feats[:, 0] if feats.ndim == 3 else feats).float().cpu())
        if (start // batch_size) % 50 == 0:
            log.info("%s: features of %d / %d images", source, stop, n)
    encoder.train(was_training)
    if not out:
        return np.zeros((0, getattr(encoder, "embed_dim", 0)), np.float32)
    return torch.cat(out).numpy()


# ------------------------------------------------------------------------------------------ ridge probe


def fit_indices(n: int, drop_last_batch: int | None = FIT_BATCH, seed: int = 0) -> np.ndarray:
    """Sorted rows [n_fit] of an ``n``-row fit split that the probe is fitted on.

    ``drop_last_batch=b`` keeps ``(n // b) * b`` rows drawn by a seeded permutation, as the reference's
    shuffled ``drop_last`` loader of batch ``b`` does (9,984 of 10,000 for b = 256); ``None`` keeps all.
    """
    if drop_last_batch is None:
        return np.arange(n)
    if drop_last_batch < 1:
        raise ValueError(f"drop_last_batch must be a positive batch size or None, got {drop_last_batch}")
    keep = n // drop_last_batch * drop_last_batch
    if keep == 0:
        raise ValueError(f"drop_last_batch={drop_last_batch} keeps no rows of a {n}-row fit split; "
                         "use a smaller batch or None (all rows)")
    return np.sort(np.random.default_rng(seed).permutation(n)[:keep])


@dataclass(frozen=True)
class ProbeResult:
    """Ridge predictions ``pred`` [N_test, T], their :func:`alignment_metrics` and the fit-row count."""

    pred: np.ndarray
    metrics: dict[str, float]
    n_fit: int


def _check_pair(x: np.ndarray, y: np.ndarray, what: str) -> None:
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"{what}: expected features [N, D] and targets [N, T] with one N, "
                         f"got {list(x.shape)} and {list(y.shape)}")


def ridge_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    alpha: float = 10.0,
    drop_last_batch: int | None = FIT_BATCH,
    seed: int = 0,
) -> ProbeResult:
    """Fit ``StandardScaler → Ridge(alpha, solver="svd")`` from X [N, D] to Y [N, T], score on test.

    X is standardised with the fit rows' mean and std; Y is not standardised. The fit rows are
    :func:`fit_indices` ``(len(train_x), drop_last_batch, seed)``.
    """
    _check_pair(train_x, train_y, "train")
    _check_pair(test_x, test_y, "test")
    if train_x.shape[1] != test_x.shape[1] or train_y.shape[1] != test_y.shape[1]:
        raise ValueError(f"train and test widths differ: X {train_x.shape[1]} vs {test_x.shape[1]}, "
                         f"Y {train_y.shape[1]} vs {test_y.shape[1]}")
    rows = fit_indices(len(train_x), drop_last_batch, seed)
    probe = make_pipeline(StandardScaler(), Ridge(alpha=alpha, solver="svd"))
    probe.fit(train_x[rows], train_y[rows])
    pred = np.asarray(probe.predict(test_x))
    return ProbeResult(pred, alignment_metrics(pred, test_y), len(rows))


# ------------------------------------------------------------------------------------------ metrics


def cosine_rows(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Cosine of matching rows of ``a`` and ``b`` [N, T] -> [N] (float64; norms clamped at ``eps``)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.maximum(np.linalg.norm(a, axis=1), eps) * np.maximum(np.linalg.norm(b, axis=1), eps)
    return (a * b).sum(axis=1) / norms


def centred_cosine(pred: np.ndarray, y: np.ndarray) -> float:
    """Mean cosine after subtracting the mean of ``y`` [N, T] (the test-set mean) from both."""
    mu = np.asarray(y, np.float64).mean(axis=0)
    return float(cosine_rows(pred - mu, y - mu).mean())


def permutation_baseline(y: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Mean cosine between ``y`` [N, T] and its rows under one ``default_rng(seed)`` permutation,
    raw and centred (both with the same permutation): what an uninformative probe would score."""
    perm = np.random.default_rng(seed).permutation(len(y))
    yc = np.asarray(y, np.float64) - np.asarray(y, np.float64).mean(axis=0)
    return {"baseline_cos": float(cosine_rows(y, y[perm]).mean()),
            "baseline_cos_centred": float(cosine_rows(yc, yc[perm]).mean())}


def _unit(a: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), eps)


def recall_at_k(pred: np.ndarray, y: np.ndarray, ks: tuple[int, ...] = RECALL_KS) -> dict[int, float]:
    """R@k in percent: query i hits if its own row is among the k most cosine-similar rows of ``y``.

    Similarity = L2-normalised ``pred`` [N, T] times L2-normalised ``y``ᵀ, [N, N]; top-k by
    ``argpartition`` (ties broken arbitrarily, as the reference); k is capped at N.
    """
    p = np.asarray(pred, np.float64)
    t = np.asarray(y, np.float64)
    sim = _unit(p) @ _unit(t).T  # [N, N]
    n = len(sim)
    out = {}
    for k in ks:
        k_eff = min(k, n)
        top = np.argpartition(-sim, k_eff - 1, axis=1)[:, :k_eff]  # [N, k]
        out[k] = float(100.0 * (top == np.arange(n)[:, None]).any(axis=1).mean())
    return out


def duplicate_rows(y: np.ndarray) -> int:
    """How many rows of ``y`` [N, T] repeat an earlier row exactly (N minus the unique-row count)."""
    return int(len(y) - len(np.unique(np.asarray(y), axis=0)))


def alignment_metrics(pred: np.ndarray, y: np.ndarray, seed: int = 0) -> dict[str, float]:
    """All docs/datasets.md#alignment numbers for predictions ``pred`` of targets ``y`` [N, T]; R@k in percent."""
    metrics = {
        "r2": float(r2_score(y, pred, multioutput="uniform_average")),
        "cos": float(cosine_rows(pred, y).mean()),
        "cos_centred": centred_cosine(pred, y),
        **{f"recall@{k}": v for k, v in recall_at_k(pred, y).items()},
        **permutation_baseline(y, seed),
        "duplicate_rows": duplicate_rows(y),
        "n_test": len(y),
    }
    return metrics


def probe_encoder(
    encoder: nn.Module,
    fit: SymileSplit,
    test: SymileSplit,
    img_size: int = 224,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    alpha: float = 10.0,
    drop_last_batch: int | None = FIT_BATCH,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """docs/datasets.md#alignment for one encoder: features of both splits once, then one ridge probe per target.

    Returns ``{target: metrics + n_fit}`` for every teacher of the splits (``fit.targets`` = ``test.targets``).
    """
    if fit.targets != test.targets:
        raise ValueError(f"the fit and test splits hold different teachers: {list(fit.targets)} vs {list(test.targets)}")
    feats = {s.name: extract_cxr_features(encoder, s.arrays["cxr"], img_size, batch_size, device,
                                          source=str(s.paths["cxr"])) for s in (fit, test)}
    results = {}
    for target, key in fit.targets.items():
        res = ridge_probe(feats[fit.name], np.asarray(fit.arrays[key], np.float32), feats[test.name],
                          np.asarray(test.arrays[key], np.float32), alpha, drop_last_batch, seed)
        results[target] = {**res.metrics, "n_fit": res.n_fit}
        log.info("%s probe: R² %.4f, cos %.4f, centred cos %.4f, R@1 %.2f%%", target, res.metrics["r2"],
                 res.metrics["cos"], res.metrics["cos_centred"], res.metrics["recall@1"])
    return results


# ------------------------------------------------------------------------------------------ zero-shot retrieval


def stage2_checkpoint(path: str | Path, which: str = "last") -> Path:
    """The Lightning checkpoint of a Stage 2 run directory (via its ``run.json``), or ``path`` itself."""
    path = Path(path)
    return resolve_run_checkpoint(path, which) if path.is_dir() else path


def load_stage2_heads(path: str | Path, which: str = "last") -> dict[str, nn.Sequential]:
    """The Stage 2 embedding heads ``{"cxr", <each teacher of the run>}`` of a run directory or ``.ckpt``, eval
    mode: each is its input normalisation (the CXR ``head_norm``; the teacher's ``teacher_norm`` statistics;
    identity when the run used none) followed by the projection head ``proj.<name>``.

    Heads are rebuilt from tensor shapes (``proj.<name>.1.weight`` [out, in]) and loaded strictly (an earlier
    layout through :func:`~pacx.models.heads.upgrade_head_keys`); a file that is not a pacx ``stage2_pacx``
    checkpoint is an error naming it. :func:`stage2_pool` gives the CXR feature the heads were trained on.
    """
    obj, ckpt = _stage2_object(path, which)
    ablate = obj.get("hyper_parameters", {}).get("ablate")  # an earlier run's: its ablated heads never trained
    state = upgrade_head_keys(obj["state_dict"], resolve_teachers(None, ablate) if ablate else None)
    names = list(dict.fromkeys(k.split(".")[1] for k in state if k.startswith("proj.") and k.endswith(".1.weight")))
    if "cxr" not in names:
        raise CheckpointError(f"{ckpt}: no proj.cxr head (key proj.cxr.1.weight) in the state dict")
    heads = {}
    for name in ["cxr", *(n for n in names if n != "cxr")]:
        proj = strip_prefix(state, f"proj.{name}.")
        out_dim, in_dim = proj["1.weight"].shape
        head = ProjectionHead(in_dim, out_dim)
        load_state_checked(head, proj, source=f"{ckpt} (proj.{name})")
        prefix = "feat_norm." if name == "cxr" else f"teacher_norms.{name}."
        norm_state = strip_prefix(state, prefix)
        norm: nn.Module = nn.Identity()
        if norm_state:
            norm = FeatureNorm(in_dim) if name == "cxr" else TeacherNorm(*norm_state["proj"].shape)
            load_state_checked(norm, norm_state, source=f"{ckpt} ({prefix.rstrip('.')})")
        heads[name] = nn.Sequential(norm, head).eval()
    return heads


def stage2_pool(path: str | Path, which: str = "last") -> str:
    """The CXR feature (``pool``) a Stage 2 run's heads read: ``cls`` unless the run set ``avg``."""
    obj, _ = _stage2_object(path, which)
    return str(obj.get("hyper_parameters", {}).get("pool", "cls"))


def _stage2_object(path: str | Path, which: str) -> tuple[Mapping, Path]:
    ckpt = stage2_checkpoint(path, which)
    obj = safe_torch_load(ckpt)
    meta = obj.get("pacx") if isinstance(obj, Mapping) else None
    stage = meta.get("stage") if isinstance(meta, Mapping) else None
    if stage != STAGE_PACX or not isinstance(obj.get("state_dict"), Mapping):
        raise CheckpointError(f"{ckpt}: zero-shot retrieval needs a pacx {STAGE_PACX!r} checkpoint with its "
                              f"projection heads, but its stage stamp is {stage!r}")
    return obj, ckpt


def retrieval_groups(label: np.ndarray, label_hadm_id: np.ndarray, source: str = "label file") -> np.ndarray:
    """Candidate rows per query, [Q, G]: row q lists the G rows sharing query q's ``label_hadm_id``,
    its positive (label 1) in column 0, then the negatives in file order; queries in file order.

    Every group must hold exactly one positive and all groups the same G, else a ``SymileFileError``
    naming ``source`` (the label / label_hadm_id files).
    """
    label, ids = np.asarray(label), np.asarray(label_hadm_id)
    if label.shape != ids.shape or label.ndim != 1:
        raise SymileFileError(f"{source}: label {list(label.shape)} and label_hadm_id {list(ids.shape)} "
                              "must be [N] each")
    groups, inverse = np.unique(ids, return_inverse=True)
    positives = np.bincount(inverse, weights=label == 1, minlength=len(groups)).astype(int)
    bad = np.flatnonzero(positives != 1)
    if bad.size:
        raise SymileFileError(f"{source}: each label_hadm_id group needs exactly one positive (label 1); "
                              f"{bad.size} group(s) do not, e.g. label_hadm_id {groups[bad[0]]} has "
                              f"{positives[bad[0]]}")
    sizes = np.bincount(inverse)
    if (sizes != sizes[0]).any():
        raise SymileFileError(f"{source}: label_hadm_id groups differ in size ({sorted(set(sizes.tolist()))}); "
                              "1-of-G retrieval needs one G")
    query_of_group = np.empty(len(groups), int)
    query_of_group[inverse[label == 1]] = np.arange(len(groups))  # queries in file order of their positive
    order = np.lexsort((np.arange(len(ids)), label != 1, query_of_group[inverse]))
    return order.reshape(len(groups), sizes[0])


def zero_shot_accuracy(query: torch.Tensor, candidates: torch.Tensor) -> float:
    """Fraction of queries [Q, D] whose positive (candidate 0 of [Q, G, D]) has the highest cosine
    among its G candidates; a tie with a negative counts for the positive (as Stage 2 validation)."""
    q = nn.functional.normalize(query.double(), dim=-1)
    c = nn.functional.normalize(candidates.double(), dim=-1)
    sim = torch.einsum("qd,qgd->qg", q, c)  # [Q, G]
    return float(((sim[:, 1:] > sim[:, :1]).sum(dim=1) == 0).double().mean())


def input_width(head: nn.Module) -> int:
    """The input width of a bare :class:`ProjectionHead` or of ``Sequential(norm, ProjectionHead)``."""
    if isinstance(head, ProjectionHead):
        return head[1].in_features
    norm, proj = head
    return norm.mean.shape[0] if isinstance(norm, TeacherNorm) else proj[1].in_features


def _check_width(got: int, head: nn.Module, what: str) -> None:
    want = input_width(head)
    if got != want:
        raise ValueError(f"{what} is {got}-wide but the Stage 2 head expects {want}")


@torch.inference_mode()
def zero_shot_retrieval(
    encoder: nn.Module,
    heads: Mapping[str, ProjectionHead],
    split: SymileSplit,
    img_size: int = 224,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """1-of-G retrieval on a retrieval split (``test``): each positive row's CXR (encoder → ``heads["cxr"]``)
    against the teacher features of its group (``heads[t]``), by cosine, for every teacher ``t`` of ``heads``
    (the split must hold its features).

    Returns ``cxr_<t>_acc`` per teacher (fractions), ``chance`` = 1 / G, ``n_queries``, ``group_size``.
    """
    teachers = [t for t in heads if t != "cxr"]
    missing = [t for t in teachers if t not in split.targets]
    if missing:
        raise ValueError(f"split {split.name!r} was loaded without the features of teacher(s) {missing}, which the "
                         f"Stage 2 heads cover: load_split(..., teachers={teachers})")
    for key in ("label", "label_hadm_id"):
        if key not in split.arrays:
            raise SymileFileError(f"split {split.name!r} has no {key} file: zero-shot retrieval needs a retrieval "
                                  "split (test)")
    groups = retrieval_groups(split.arrays["label"], split.arrays["label_hadm_id"],
                              source=f"{split.paths['label']} / {split.paths['label_hadm_id']}")
    n_queries, group_size = groups.shape
    feats = extract_cxr_features(encoder, split.arrays["cxr"], img_size, batch_size, device, rows=groups[:, 0],
                                 source=str(split.paths["cxr"]))
    _check_width(feats.shape[1], heads["cxr"], f"the encoder's feature ({encoder.__class__.__name__})")
    query = heads["cxr"](torch.from_numpy(feats))  # [Q, S]
    out = {"n_queries": n_queries, "group_size": group_size, "chance": 1.0 / group_size}
    for target in teachers:
        key = split.targets[target]
        arr = split.arrays[key]
        _check_width(arr.shape[1], heads[target], f"{split.paths[key]} (shape {list(arr.shape)})")
        cand = torch.from_numpy(np.asarray(arr[groups.ravel()], np.float32))  # [Q * G, T]
        out[f"cxr_{target}_acc"] = zero_shot_accuracy(query, heads[target](cand).reshape(n_queries, group_size, -1))
        log.info("zero-shot CXR→%s: %.4f (chance %.4f, %d queries)", target, out[f"cxr_{target}_acc"],
                 out["chance"], n_queries)
    return out
