"""Labs denoising autoencoder: the frozen lab-value teacher of Stage 2 (docs/method.md#teachers).

Input: 50 lab percentiles and their 50 observed flags (100); the 256-d encoder output is the labs embedding,
the decoder reconstructs the percentiles. The ``encoder`` / ``decoder`` layout keeps the authors' key names,
so their Lightning checkpoints (``model.encoder.*``) load strictly. :func:`corrupt` / :func:`masked_mse` train
it; extraction encodes the uncorrupted input (``zero_missing=False``; docs/datasets.md#teacher-features).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from pacx.debug import check_not_debug
from pacx.weights.checkpoint import (
    CheckpointError,
    checkpoint_file,
    load_any,
    load_state_checked,
    strip_prefix,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabsDAEConfig:
    n_labs: int = 50
    hidden_dim: int = 512
    latent_dim: int = 256


class LabsDAE(nn.Module):
    """``encode(percentiles, missingness) -> [N, latent]``; ``forward(...) -> reconstruction [N, n_labs]``."""

    def __init__(self, cfg: LabsDAEConfig = LabsDAEConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_dim = cfg.latent_dim
        self.encoder = nn.Sequential(
            nn.Linear(2 * cfg.n_labs, cfg.hidden_dim), nn.LayerNorm(cfg.hidden_dim), nn.GELU(),
            nn.Linear(cfg.hidden_dim, cfg.latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(cfg.latent_dim, cfg.hidden_dim), nn.GELU(), nn.Linear(cfg.hidden_dim, cfg.n_labs),
            nn.Sigmoid(),
        )

    def encode(self, percentiles: torch.Tensor, missingness: torch.Tensor,
               zero_missing: bool = False) -> torch.Tensor:
        """[N, L] values and [N, L] observed flags -> [N, latent]. ``zero_missing`` zeroes placeholders
        first."""
        if percentiles.shape != missingness.shape or percentiles.shape[-1] != self.cfg.n_labs:
            raise ValueError(f"labs DAE expects percentiles and missingness of shape [N, {self.cfg.n_labs}], "
                             f"got {tuple(percentiles.shape)} and {tuple(missingness.shape)}")
        m = missingness.to(percentiles.dtype)
        x = percentiles * m if zero_missing else percentiles
        return self.encoder(torch.cat([x, m], dim=-1))

    def forward(self, percentiles: torch.Tensor,
                missingness: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (reconstruction [N, L], latent [N, latent]) for an (already corrupted) input."""
        z = self.encode(percentiles, missingness)
        return self.decoder(z), z


def corrupt(
    percentiles: torch.Tensor, missingness: torch.Tensor, drop_prob: float,
    generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked corruption -> (values, flags, hidden [N, L] bool).

    Missing placeholders are zeroed; each *observed* entry is hidden with probability ``drop_prob``
    (its value and flag set to 0). Missing entries are never "hidden": they stay missing.
    """
    observed = missingness > 0.5
    draw = torch.rand(percentiles.shape, generator=generator, device="cpu").to(percentiles.device)
    hidden = observed & (draw < drop_prob)
    keep = (observed & ~hidden).to(percentiles.dtype)
    return percentiles * keep, keep, hidden


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the entries where ``mask`` is true (sum / count; 0 when empty)."""
    mask = mask.to(torch.promote_types(pred.dtype, torch.float32))  # a bf16 count would be rounded
    return ((pred - target) ** 2 * mask).sum() / mask.sum().clamp(min=1)


def read_labs_dae_state(path: str | Path) -> tuple[dict[str, torch.Tensor], LabsDAEConfig]:
    """DAE tensors of a pacx run/checkpoint/export or an authors' Lightning checkpoint, plus its config."""
    path = checkpoint_file(path)
    obj, meta = load_any(path)
    if meta:  # safetensors: the DAE's own keys, config in the metadata when we wrote it
        return dict(obj), LabsDAEConfig(**json.loads(meta.get("labs_dae_config", "{}")))
    state = obj.get("state_dict") if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping):
        state = obj if isinstance(obj, Mapping) else None
    if not state:
        raise CheckpointError(f"{path}: no state_dict with labs DAE weights")
    if any(k.startswith("model.") for k in state):
        state = strip_prefix(state, "model.")
    pacx_meta = obj.get("pacx", {}) if isinstance(obj, Mapping) else {}
    check_not_debug(pacx_meta.get("debug"), f"labs DAE checkpoint {path}")  # as the ECG teacher's export
    if "labs_dae_config" in pacx_meta:
        return dict(state), LabsDAEConfig(**pacx_meta["labs_dae_config"])
    try:  # third-party file: the widths follow from the shapes
        cfg = LabsDAEConfig(
            n_labs=state["decoder.2.weight"].shape[0], hidden_dim=state["encoder.0.weight"].shape[0],
            latent_dim=state["encoder.3.weight"].shape[0],
        )
    except KeyError as err:
        raise CheckpointError(f"{path}: not a labs DAE checkpoint (missing {err})") from None
    return dict(state), cfg


def load_labs_dae(path: str | Path) -> LabsDAE:
    """The frozen labs teacher in eval mode, loaded strictly from any supported file."""
    state, cfg = read_labs_dae_state(path)
    model = LabsDAE(cfg)
    load_state_checked(model, state, source=str(path))
    return model.eval()


def labs_dae_config_dict(model: LabsDAE) -> dict:
    return asdict(model.cfg)
