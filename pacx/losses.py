"""Stage 2 distillation loss (docs/method.md#stage-2): symmetric InfoNCE + cosine regression.

``loss = clip_weight · mean(CLIP terms) + regression_weight · mean(regression terms)`` over the pairs
CXR–teacher, one per teacher the inputs name. Keys are gathered from all ranks with gradients
(:func:`pacx.dist.gather_with_grad`). The terms, the logit-scale clamp, the float32 computation and the DDP
equivalence: docs/design.md#stage-2-loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pacx.dist import gather_with_grad, rank_offset_targets

LOGIT_SCALE_MIN = 1.0
LOGIT_SCALE_MAX = 100.0
PAIR_TEACHERS = ("ecg", "labs")  # the seven-tensor call's teachers, and what ablate may name
DICT_ARGS = ("teacher_shared", "cxr_to_teacher", "teacher_target")
PAIR_ARGS = ("ecg_shared", "labs_shared", "cxr_to_ecg", "cxr_to_labs", "ecg_target", "labs_target")


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Half precision -> float32; float32/float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def info_nce(
    query: torch.Tensor,
    keys: torch.Tensor,
    logit_scale: torch.Tensor | float,
    label_smoothing: float = 0.0,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``logit_scale · query @ keys.T`` against ``targets`` (default: the diagonal).

    query: [n, D], keys: [M, D] (expected L2-normalised; this function does not normalise);
    targets: [n] column of each query's positive (default ``arange(n)``). Returns the mean over queries.
    """
    logits = logit_scale * query @ keys.t()  # [n, M]
    if targets is None:
        targets = torch.arange(query.shape[0], device=query.device)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def symmetric_clip_loss(
    a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean of ``a→b`` and ``b→a`` InfoNCE; a, b: [n, D] local, row ``i`` of ``a`` pairs with row ``i`` of
    ``b``.

    Normalises both, gathers keys from all ranks (identity when not distributed) and offsets targets by
    rank, so local row ``i`` matches gathered column ``rank·n + i``.
    """
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    all_a, all_b = gather_with_grad(a), gather_with_grad(b)  # [W·n, D]
    targets = rank_offset_targets(a.shape[0], a.device)
    return 0.5 * (
        info_nce(a, all_b, logit_scale, label_smoothing, targets)
        + info_nce(b, all_a, logit_scale, label_smoothing, targets)
    )


def cosine_regression(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean(1 − cos(pred, target))`` over the batch; pred, target: [n, D]. No gradient into ``target``."""
    return (1.0 - F.cosine_similarity(pred, target.detach(), dim=-1)).mean()


class DistillationLoss(nn.Module):
    """The Stage 2 objective. Holds the one learnable ``logit_scale`` (a 0-dim parameter, log space).

    Args:
        clip_weight: weight of the mean CLIP term.
        regression_weight: weight of the mean regression term.
        temperature: initial temperature; the parameter starts at ``log(1/temperature)``.
        label_smoothing: of the InfoNCE cross-entropies.
        ablate: ``ecg`` | ``labs`` | ``None``: a teacher whose terms are left out (both of them).

    The teachers are the keys of the dicts given to :meth:`forward`, in their order. :meth:`forward` also
    takes the paper's two teachers as seven tensors, ``(cxr_shared, ecg_shared, labs_shared, cxr_to_ecg,
    cxr_to_labs, ecg_target, labs_target)``, positional or by name (an ablated teacher's may be ``None``).
    """

    def __init__(
        self,
        clip_weight: float = 0.5,
        regression_weight: float = 1.0,
        temperature: float = 0.07,
        label_smoothing: float = 0.02,
        ablate: str | None = None,
    ) -> None:
        super().__init__()
        if ablate not in (None, *PAIR_TEACHERS):
            raise ValueError(f"ablate must be one of {PAIR_TEACHERS} or None, got {ablate!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.clip_weight = clip_weight
        self.regression_weight = regression_weight
        self.label_smoothing = label_smoothing
        self.ablate = ablate
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def scale(self) -> torch.Tensor:
        """The scale used in the logits: ``exp(logit_scale)`` clamped to [1, 100] (differentiable inside)."""
        return _upcast(self.logit_scale).exp().clamp(LOGIT_SCALE_MIN, LOGIT_SCALE_MAX)

    def _teacher_dicts(self, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
        """The three per-teacher dicts from either call form, without the ablated teacher."""
        dict_form = set(kwargs) <= set(DICT_ARGS) and (not args or isinstance(args[0], Mapping))
        names = DICT_ARGS if dict_form else PAIR_ARGS
        if len(args) > len(names) or set(kwargs) & set(names[: len(args)]) or set(kwargs) - set(names):
            raise TypeError(f"DistillationLoss.forward takes cxr_shared and {names} (the per-teacher "
                            "dicts, or the paper's two teachers as tensors), got "
                            f"{len(args)} more positional and {sorted(kwargs)} by name")
        bound = {**dict(zip(names, args)), **kwargs}
        if dict_form:
            if set(bound) != set(DICT_ARGS):
                raise TypeError(f"DistillationLoss.forward needs {DICT_ARGS}, got {sorted(bound)}")
            dicts = tuple(dict(bound[k]) for k in DICT_ARGS)
        else:
            dicts = tuple({t: bound.get(f"{pre}{t}{post}") for t in PAIR_TEACHERS}
                          for pre, post in (("", "_shared"), ("cxr_to_", ""), ("", "_target")))
        dicts = tuple({t: v for t, v in d.items() if t != self.ablate} for d in dicts)
        missing = [t for d in dicts for t, v in d.items() if v is None]
        if missing:
            raise ValueError(f"DistillationLoss got no tensors of teacher {missing[0]!r} "
                             f"(ablate: {self.ablate})")
        return dicts

    def forward(self, cxr_shared: torch.Tensor, *args, **kwargs) -> dict[str, torch.Tensor]:
        """cxr_shared: [n, S] CXR projection; per teacher ``t``: ``teacher_shared[t]`` [n, S] its projection,
        ``cxr_to_teacher[t]`` [n, D_t] the CXR regression prediction, ``teacher_target[t]`` [n, D_t] its
        embedding (or the seven-tensor form, see the class). Returns ``clip_<t>``, ``reg_<t>`` per teacher,
        ``loss`` and ``logit_scale``."""
        teacher_shared, cxr_to_teacher, teacher_target = self._teacher_dicts(args, kwargs)
        teachers = list(teacher_shared)
        if not teachers or set(cxr_to_teacher) != set(teachers) or set(teacher_target) != set(teachers):
            raise ValueError("DistillationLoss needs the same teachers (at least one) in teacher_shared, "
                             f"cxr_to_teacher and teacher_target, got {teachers}, {list(cxr_to_teacher)}, "
                             f"{list(teacher_target)}")

        with torch.autocast(device_type=cxr_shared.device.type, enabled=False):
            scale = self.scale()
            out: dict[str, torch.Tensor] = {}
            for t in teachers:
                shared, pred, target = (_upcast(x)
                                        for x in (teacher_shared[t], cxr_to_teacher[t], teacher_target[t]))
                out[f"clip_{t}"] = symmetric_clip_loss(_upcast(cxr_shared), shared, scale,
                                                       self.label_smoothing)
                out[f"reg_{t}"] = cosine_regression(pred, target)
            clip = torch.stack([out[f"clip_{t}"] for t in teachers]).mean()
            reg = torch.stack([out[f"reg_{t}"] for t in teachers]).mean()
            out["loss"] = self.clip_weight * clip + self.regression_weight * reg
        out["logit_scale"] = scale.detach()
        return out
