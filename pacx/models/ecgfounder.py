"""ECGFounder, the frozen ECG teacher of Stage 2 (docs/method.md#teachers; docs/ecgfounder.md).

ECGFounder (Li et al., NEJM AI 2025, arXiv 2410.04133; code MIT, PKUDigitalHealth), re-implemented from our
written description in docs/ecgfounder.md; no code is taken from the official repository. Keys equal the
release, so ``12_lead_ECGFounder.pth`` loads strictly; ``forward(x: [B, 12, 5000]) -> [B, 1024]`` on input
from :func:`preprocess_ecg`. Pickles and conversion: docs/design.md#ecgfounder-loading.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pacx.models.ecg_preprocess import (
    ECG_LAYOUTS,
    MIMIC_LEAD_ORDER,
    STANDARD_LEAD_ORDER,
    SYMILE_LAYOUT,
    preprocess_ecg,
)
from pacx.weights.checkpoint import (
    CheckpointError,
    PickleRefused,
    drop_keys,
    is_safetensors_file,
    load_safetensors,
    load_state_checked,
    safe_torch_load,
    save_safetensors,
    strip_prefix,
)

log = logging.getLogger(__name__)

__all__ = [
    "ECGFOUNDER_CONFIGS", "ECG_LAYOUTS", "MIMIC_LEAD_ORDER", "STANDARD_LEAD_ORDER", "SYMILE_LAYOUT",
    "ECGFounder", "ECGFounderConfig", "convert_ecgfounder", "create_ecgfounder", "load_ecgfounder",
    "preprocess_ecg", "read_ecgfounder_state", "strip_dataparallel_prefix",
]

# --------------------------------------------------------------------------------------------------
# Blocks (docs/ecgfounder.md#blocks)


def same_padding(length: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" zero padding (left, right) so that the output length is ceil(L / stride).

    An odd padding unit goes to the right: kernel 16 gives 7+8 at stride 1, 7+7 at stride 2 on an even
    length and 7+8 on an odd one.
    """
    out = math.ceil(length / stride)
    total = max(0, (out - 1) * stride + kernel_size - length)
    return total // 2, total - total // 2


class SamePadConv1d(nn.Module):
    """Zero "same" padding then ``Conv1d`` (with bias); the child is named ``conv`` as in the release."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, Cin, L] -> [B, Cout, ceil(L / stride)]
        k, s = self.conv.kernel_size[0], self.conv.stride[0]
        return self.conv(F.pad(x, same_padding(x.shape[-1], k, s)))


class SamePadMaxPool1d(nn.Module):
    """Max-pool with kernel = stride, after padding kernel−1 **zeros** (not −inf), odd unit on the right.

    For kernel 2 and an odd length the last output is max(last sample, 0); this matters because the
    shortcut sees the odd lengths 625, 313, 157 and 79 on a 5000-sample input.
    """

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, L] -> [B, C, ceil(L / k)]
        left = (self.kernel_size - 1) // 2
        x = F.pad(x, (left, self.kernel_size - 1 - left))
        return F.max_pool1d(x, self.kernel_size)


class BasicBlock(nn.Module):
    """Pre-activation bottleneck block with squeeze-excitation and a parameter-free shortcut.

    Branch: Swish → 1×1 conv (Cin→C) → Swish → grouped kernel-k conv (stride ``stride`` when
    ``downsample``) → Swish → 1×1 conv, gated channel-wise by SE (reduction 2). The very first block of
    the network skips the first Swish, because the stem has just applied one. Shortcut: the input,
    max-pooled when ``downsample``, widened with zero channels split on both sides (old channels in
    the middle). No activation or norm after the add. ``bn1..3`` exist only for the release's keys.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int,
                 downsample: bool, is_first_block: bool = False) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.downsample, self.is_first_block = downsample, is_first_block
        # Registration order = official state-dict key order (docs/ecgfounder.md#keys).
        self.bn1 = nn.BatchNorm1d(in_channels)  # never called (use_bn=False in the release)
        self.conv1 = SamePadConv1d(in_channels, out_channels, 1)
        self.bn2 = nn.BatchNorm1d(out_channels)  # never called
        self.conv2 = SamePadConv1d(out_channels, out_channels, kernel_size,
                                   stride=stride if downsample else 1, groups=groups)
        self.bn3 = nn.BatchNorm1d(out_channels)  # never called
        self.conv3 = SamePadConv1d(out_channels, out_channels, 1)
        self.se_fc1 = nn.Linear(out_channels, out_channels // 2)
        self.se_fc2 = nn.Linear(out_channels // 2, out_channels)
        self.act = nn.SiLU()  # Swish, x·sigmoid(x)
        self.max_pool = SamePadMaxPool1d(stride) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, Cin, L] -> [B, C, L or ceil(L / s)]
        out = x if self.is_first_block else self.act(x)
        out = self.conv1(out)  # [B, C, L]
        out = self.conv2(self.act(out))  # [B, C, L']
        out = self.conv3(self.act(out))
        gate = torch.sigmoid(self.se_fc2(self.act(self.se_fc1(out.mean(-1)))))  # [B, C]
        out = out * gate[:, :, None]

        shortcut = self.max_pool(x) if self.max_pool is not None else x  # [B, Cin, L']
        extra = self.out_channels - self.in_channels
        if extra:
            shortcut = F.pad(shortcut, (0, 0, extra // 2, extra - extra // 2))  # zero channels both sides
        return out + shortcut


class BasicStage(nn.Module):
    """``block_list`` of blocks; block 0 downsamples and changes the width, the rest keep both."""

    def __init__(self, in_channels: int, out_channels: int, n_blocks: int, kernel_size: int, stride: int,
                 groups: int, is_first_stage: bool) -> None:
        super().__init__()
        self.block_list = nn.ModuleList(
            BasicBlock(in_channels if i == 0 else out_channels, out_channels, kernel_size, stride, groups,
                       downsample=i == 0, is_first_block=is_first_stage and i == 0)
            for i in range(n_blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block_list:
            x = block(x)
        return x


# --------------------------------------------------------------------------------------------------
# Network (docs/ecgfounder.md#configuration)


@dataclass(frozen=True)
class ECGFounderConfig:
    """Everything that fixes the network's tensors. Defaults are the released 12-lead model."""

    in_channels: int = 12
    base_filters: int = 64
    filter_list: tuple[int, ...] = (64, 160, 160, 400, 400, 1024, 1024)
    m_blocks_list: tuple[int, ...] = (2, 2, 2, 3, 3, 4, 4)
    kernel_size: int = 16
    stride: int = 2
    groups_width: int = 16  # channels per group of the grouped conv
    n_classes: int = 150  # head outputs (lines of tasks.txt); 0 = no head

    def __post_init__(self) -> None:
        if len(self.filter_list) != len(self.m_blocks_list):
            raise ValueError(f"filter_list {self.filter_list} and m_blocks_list {self.m_blocks_list} "
                             "must have one entry per stage")
        bad = [c for c in self.filter_list if c % self.groups_width or c < 2]
        if bad:
            raise ValueError(f"stage widths {bad} are not multiples of groups_width {self.groups_width}")
        if any(b < 1 for b in self.m_blocks_list):
            raise ValueError(f"every stage needs at least one block, got {self.m_blocks_list}")

    @property
    def embed_dim(self) -> int:
        return self.filter_list[-1]

    def to_dict(self) -> dict:
        return asdict(self)


# Named configurations. ``demo_small`` is the same code at reduced width for the
# built-in demo and CPU tests; its feature dim is its last width (128).
ECGFOUNDER_CONFIGS: dict[str, ECGFounderConfig] = {
    "12_lead": ECGFounderConfig(),
    "1_lead": ECGFounderConfig(in_channels=1),
    "demo_small": ECGFounderConfig(base_filters=16, filter_list=(16, 32, 32, 64, 64, 128, 128),
                                   m_blocks_list=(1, 1, 1, 1, 1, 1, 1)),
}


class ECGFounder(nn.Module):
    """Net1D: same-padded stem conv (stride 2) → Swish → stages → time mean (→ ``dense`` head).

    ``forward_features(x) -> [B, embed_dim, T / 2^(1+stages)]`` (the raw residual stream);
    ``forward(x) -> [B, embed_dim]`` (its time mean, the teacher embedding);
    ``forward_head(features) -> [B, n_classes]`` and ``logits(x)`` when the head is present
    (multi-label: apply a sigmoid for probabilities).
    """

    def __init__(self, cfg: ECGFounderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_dim = cfg.embed_dim
        self.first_conv = SamePadConv1d(cfg.in_channels, cfg.base_filters, cfg.kernel_size, stride=cfg.stride)
        self.first_bn = nn.BatchNorm1d(cfg.base_filters)  # never called (use_bn=False in the release)
        self.act = nn.SiLU()
        widths = (cfg.base_filters, *cfg.filter_list)
        self.stage_list = nn.ModuleList(
            BasicStage(widths[i], widths[i + 1], n, cfg.kernel_size, cfg.stride,
                       groups=widths[i + 1] // cfg.groups_width, is_first_stage=i == 0)
            for i, n in enumerate(cfg.m_blocks_list)
        )
        self.dense = nn.Linear(cfg.embed_dim, cfg.n_classes) if cfg.n_classes else None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"ECGFounder expects [B, {self.cfg.in_channels}, T], got {list(x.shape)}")
        x = self.act(self.first_conv(x))  # [B, base, T/2]
        for stage in self.stage_list:
            x = stage(x)  # each stage halves T
        return x  # [B, D, T']

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(-1)  # [B, D]

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        if self.dense is None:
            raise RuntimeError("this ECGFounder has no classification head (it was dropped on load)")
        return self.dense(features)  # [B, n_classes]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward(x))


def create_ecgfounder(config: str = "12_lead", head: bool = True) -> ECGFounder:
    """A freshly initialised network of a named configuration, with or without the ``dense`` head."""
    if config not in ECGFOUNDER_CONFIGS:
        raise KeyError(f"unknown ECGFounder config {config!r}; known: {sorted(ECGFOUNDER_CONFIGS)}")
    cfg = ECGFOUNDER_CONFIGS[config]
    return ECGFounder(cfg if head else replace(cfg, n_classes=0))


# --------------------------------------------------------------------------------------------------
# Checkpoints (docs/ecgfounder.md#checkpoint)

HEAD_PREFIX = "dense."


def strip_dataparallel_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove a ``module.`` prefix when every key has one (a DataParallel save); otherwise a copy."""
    if state and all(k.startswith("module.") for k in state):
        return strip_prefix(state, "module.")
    return dict(state)


def _load_pickle(path: Path, trust_pickle: bool) -> object:
    """``weights_only=True``; when that refuses the file and ``trust_pickle`` is set, a full unpickle. A file
    that is unreadable either way (truncated, not a checkpoint) is a :class:`CheckpointError` naming it."""
    try:
        return safe_torch_load(path)
    except PickleRefused as err:
        if not trust_pickle:
            raise PickleRefused(
                f"{err} If this is the official ECGFounder release, pass trust_pickle=True once, or "
                "convert it to safetensors with scripts/convert_ecgfounder.py --trust-pickle."
            ) from None
    log.warning("%s: weights_only=True refused this file; trust_pickle=True, so it is unpickled in full "
                "(this can run code the file carries). Convert it to safetensors once.", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # the one opt-in (trust_pickle)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint, also when unpickled in full "
                              f"({type(err).__name__}: {err})") from err


def _unwrap_state_dict(obj: object, path: Path) -> Mapping[str, torch.Tensor]:
    """The official ``{'state_dict': ..., ...}`` layout, or a bare state dict."""
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if isinstance(state, Mapping) and state is not obj:  # under 'state_dict': name an entry that is no tensor
        odd = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
        if odd is not None:
            kind = type(state[odd]).__name__
            raise CheckpointError(f"{path}: 'state_dict' entry {str(odd)!r} is a {kind}, not a tensor")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        top = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path}: expected the weights under 'state_dict' (official ECGFounder "
                              f"format) or a bare state dict of tensors; found {top}")
    return state


def read_ecgfounder_state(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of an official ``.pth`` (weights under ``'state_dict'``) or of a ``.safetensors``
    file, with a DataParallel ``module.`` prefix removed."""
    path = Path(path)
    if path.suffix == ".safetensors" or is_safetensors_file(path):  # by content too, whatever the name
        state, _ = load_safetensors(path)
    else:
        state = _unwrap_state_dict(_load_pickle(path, trust_pickle), path)
    return strip_dataparallel_prefix(state)


def load_ecgfounder(path: str | Path, config: str = "12_lead", trust_pickle: bool = False,
                    head: bool = False) -> ECGFounder:
    """The teacher in eval mode with the checkpoint loaded strictly.

    Every backbone key (including the unused BatchNorm entries) must match in name and shape; the
    ``dense.*`` head is dropped unless ``head=True`` (then it must be present, e.g. for zero-shot
    150-class logits). Anything else raises :class:`CheckpointError` naming the keys.
    """
    state = read_ecgfounder_state(path, trust_pickle=trust_pickle)
    if not head:
        state, dropped = drop_keys(state, (HEAD_PREFIX,))
        log.info("%s: dropped the classification head (%d keys)", path, len(dropped))
    model = create_ecgfounder(config, head=head)
    load_state_checked(model, state, source=str(path))
    log.info("loaded ECGFounder %r from %s (%d parameters, embed_dim %d)", config, path,
             sum(p.numel() for p in model.parameters()), model.embed_dim)
    return model.eval()


def convert_ecgfounder(src: str | Path, out: str | Path, config: str = "12_lead",
                       trust_pickle: bool = False) -> Path:
    """Write a checkpoint's state dict (head included, optimizer etc. dropped) as safetensors.

    The tensors are checked against ``config`` first (strictly, head included when present), so a
    file that would not load is never written.
    """
    src, out = Path(src), Path(out)
    state = read_ecgfounder_state(src, trust_pickle=trust_pickle)
    has_head = any(k.startswith(HEAD_PREFIX) for k in state)
    load_state_checked(create_ecgfounder(config, head=has_head), state, source=str(src))
    save_safetensors(state, out, {"format": "ecgfounder", "config": config, "source": src.name})
    log.info("wrote %s (%d tensors from %s)", out, len(state), src)
    return out
