"""Zero-shot 1-of-G retrieval (docs/datasets.md#alignment): a CXR against the teacher features of its
``label_hadm_id`` group, both through a Stage 2 run's own projection heads.

:func:`load_stage2_heads` and :func:`stage2_pool` read the run; :func:`retrieval_groups`,
:func:`zero_shot_accuracy` and :func:`zero_shot_retrieval` score a retrieval split (``test``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pacx.constants import STAGE_PACX
from pacx.data.symile_files import SymileFileError
from pacx.eval.alignment import SymileSplit, extract_cxr_features
from pacx.eval.retrieval import expected_hits
from pacx.models.heads import FeatureNorm, ProjectionHead, TeacherNorm, upgrade_head_keys
from pacx.teachers import resolve_teachers
from pacx.weights.checkpoint import (
    CheckpointError,
    checkpoint_file,
    load_state_checked,
    safe_torch_load,
    strip_prefix,
)

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ Stage 2 heads


def load_stage2_heads(path: str | Path, which: str = "last") -> dict[str, nn.Sequential]:
    """The Stage 2 embedding heads ``{"cxr", <each teacher of the run>}`` of a run directory or ``.ckpt``,
    eval mode: each is its input normalisation (the CXR ``head_norm``; the teacher's ``teacher_norm``
    statistics; identity when the run used none) followed by the projection head ``proj.<name>``.

    Heads are rebuilt from tensor shapes (``proj.<name>.1.weight`` [out, in]) and loaded strictly (an earlier
    layout through :func:`~pacx.models.heads.upgrade_head_keys`); a file that is not a pacx ``stage2_pacx``
    checkpoint is an error naming it. :func:`stage2_pool` gives the CXR feature the heads were trained on.
    """
    obj, ckpt = _stage2_object(path, which)
    # an earlier run's: its ablated heads never trained
    ablate = obj.get("hyper_parameters", {}).get("ablate")
    state = upgrade_head_keys(obj["state_dict"], resolve_teachers(None, ablate) if ablate else None)
    names = list(dict.fromkeys(k.split(".")[1] for k in state
                               if k.startswith("proj.") and k.endswith(".1.weight")))
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
    ckpt = checkpoint_file(path, which)
    obj = safe_torch_load(ckpt)
    meta = obj.get("pacx") if isinstance(obj, Mapping) else None
    stage = meta.get("stage") if isinstance(meta, Mapping) else None
    if stage != STAGE_PACX or not isinstance(obj.get("state_dict"), Mapping):
        raise CheckpointError(f"{ckpt}: zero-shot retrieval needs a pacx {STAGE_PACX!r} checkpoint with its "
                              f"projection heads, but its stage stamp is {stage!r}")
    return obj, ckpt


# ------------------------------------------------------------------------------------------ retrieval


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
        raise SymileFileError(f"{source}: label_hadm_id groups differ in size "
                              f"({sorted(set(sizes.tolist()))}); 1-of-G retrieval needs one G")
    query_of_group = np.empty(len(groups), int)
    query_of_group[inverse[label == 1]] = np.arange(len(groups))  # queries in file order of their positive
    order = np.lexsort((np.arange(len(ids)), label != 1, query_of_group[inverse]))
    return order.reshape(len(groups), sizes[0])


def zero_shot_accuracy(query: torch.Tensor, candidates: torch.Tensor) -> float:
    """Fraction of queries [Q, D] whose positive (candidate 0 of [Q, G, D]) has the highest cosine
    among its G candidates; ties with negatives count as a random order of the tied candidates
    (:func:`pacx.eval.retrieval.expected_hits`)."""
    q = nn.functional.normalize(query.double(), dim=-1)
    c = nn.functional.normalize(candidates.double(), dim=-1)
    sim = torch.einsum("qd,qgd->qg", q, c)  # [Q, G]
    return float(expected_hits(sim, 0, (1,))[1].mean())


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
    """1-of-G retrieval on a retrieval split (``test``): each positive row's CXR (encoder →
    ``heads["cxr"]``) against the teacher features of its group (``heads[t]``), by cosine, for every teacher
    ``t`` of ``heads`` (the split must hold its features).

    Returns ``cxr_<t>_acc`` per teacher (fractions), ``chance`` = 1 / G, ``n_queries``, ``group_size``.
    """
    teachers = [t for t in heads if t != "cxr"]
    missing = [t for t in teachers if t not in split.targets]
    if missing:
        raise ValueError(f"split {split.name!r} was loaded without the features of teacher(s) {missing}, "
                         f"which the Stage 2 heads cover: load_split(..., teachers={teachers})")
    for key in ("label", "label_hadm_id"):
        if key not in split.arrays:
            raise SymileFileError(f"split {split.name!r} has no {key} file: zero-shot retrieval needs a "
                                  "retrieval split (test)")
    groups = retrieval_groups(split.arrays["label"], split.arrays["label_hadm_id"],
                              source=f"{split.paths['label']} / {split.paths['label_hadm_id']}")
    n_queries, group_size = groups.shape
    feats = extract_cxr_features(encoder, split.arrays["cxr"], img_size, batch_size, device,
                                 rows=groups[:, 0], source=str(split.paths["cxr"]))
    _check_width(feats.shape[1], heads["cxr"], f"the encoder's feature ({encoder.__class__.__name__})")
    query = heads["cxr"](torch.from_numpy(feats))  # [Q, S]
    out = {"n_queries": n_queries, "group_size": group_size, "chance": 1.0 / group_size}
    for target in teachers:
        key = split.targets[target]
        arr = split.arrays[key]
        _check_width(arr.shape[1], heads[target], f"{split.paths[key]} (shape {list(arr.shape)})")
        cand = torch.from_numpy(np.asarray(arr[groups.ravel()], np.float32))  # [Q * G, T]
        cand = heads[target](cand).reshape(n_queries, group_size, -1)  # [Q, G, S]
        out[f"cxr_{target}_acc"] = zero_shot_accuracy(query, cand)
        log.info("zero-shot CXR→%s: %.4f (chance %.4f, %d queries)", target, out[f"cxr_{target}_acc"],
                 out["chance"], n_queries)
    return out
