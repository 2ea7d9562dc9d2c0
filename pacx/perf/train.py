"""Training-throughput benchmark pieces: analytic MAE FLOPs, the Hugging Face ViTMAE twin, step timing.

``scripts/benchmark_train.py`` times one MAE training step of pacx's model against ``transformers``'
``ViTMAEForPreTraining`` at the same configuration and with the same weights (``transformers`` is the optional
``bench`` extra, imported only inside the functions that need it). The FLOP count behind MFU, and how it was
checked: docs/design.md#throughput.
"""

from __future__ import annotations

import contextlib
import logging
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from pacx.models.flops import mae_forward_flops, mae_train_flops  # noqa: F401  (the public names of old)
from pacx.models.mae import MaskedAutoencoderViT
from pacx.models.tuning import count_parameters

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# MFU (the analytic FLOPs: pacx.models.flops)


def mfu(flops_per_step: float, seconds_per_step: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved analytic FLOP/s over the device's peak FLOP/s."""
    return flops_per_step / seconds_per_step / (peak_tflops * 1e12)


# --------------------------------------------------------------------------------------------------
# The Hugging Face twin


def hf_vitmae_config(model: MaskedAutoencoderViT, attn_implementation: str = "sdpa"):
    """A ``transformers.ViTMAEConfig`` describing exactly the architecture of ``model``.

    Everything is derived from ``model.cfg`` / ``model.dec``; HF's defaults that differ from MAE's
    (LayerNorm eps 1e-12, mask ratio 0.75) are overridden. Dropout is 0 in both.
    """
    from transformers import ViTMAEConfig  # optional dependency (the `bench` extra)

    cfg, dec = model.cfg, model.dec
    return ViTMAEConfig(
        hidden_size=cfg.embed_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio),
        hidden_act="gelu",  # exact erf GELU, as timm's nn.GELU
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=cfg.norm_eps,
        image_size=cfg.img_size,
        patch_size=cfg.patch_size,
        num_channels=cfg.in_chans,
        qkv_bias=cfg.qkv_bias,
        decoder_num_attention_heads=dec.decoder_num_heads,
        decoder_hidden_size=dec.decoder_embed_dim,
        decoder_num_hidden_layers=dec.decoder_depth,
        decoder_intermediate_size=int(dec.decoder_embed_dim * cfg.mlp_ratio),
        mask_ratio=model.mask_ratio,
        norm_pix_loss=model.norm_pix_loss,
        attn_implementation=attn_implementation,
    )


def create_hf_twin(model: MaskedAutoencoderViT, attn_implementation: str = "sdpa") -> nn.Module:
    """``ViTMAEForPreTraining`` at ``model``'s configuration, holding ``model``'s weights (strict load)."""
    from transformers import ViTMAEForPreTraining  # optional dependency (the `bench` extra)

    hf = ViTMAEForPreTraining(hf_vitmae_config(model, attn_implementation))
    legacy = "vit.encoder.layer.0.layernorm_before.weight" in hf.state_dict()
    hf.load_state_dict(hf_state_dict_from_mae(model.state_dict(), legacy=legacy), strict=True)
    return hf.to(next(model.parameters()).device)


_BLOCK_RENAMES = {
    "norm1.": "layernorm_before.",
    "norm2.": "layernorm_after.",
    "attn.proj.": "attention.o_proj.",
    "mlp.": "mlp.",
}
_TOP_RENAMES = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.": "vit.embeddings.patch_embeddings.projection.",
    "norm.": "vit.layernorm.",
}
# Older transformers releases name the same tensors BERT-style
# (``vit.encoder.layer.{i}.attention.attention.query``).
_LEGACY_RENAMES = (
    ("vit.layers.", "vit.encoder.layer."),
    (".attention.q_proj.", ".attention.attention.query."),
    (".attention.k_proj.", ".attention.attention.key."),
    (".attention.v_proj.", ".attention.attention.value."),
    (".attention.o_proj.", ".attention.output.dense."),
    (".mlp.fc1.", ".intermediate.dense."),
    (".mlp.fc2.", ".output.dense."),
)
_BLOCK_KEY = re.compile(r"^(decoder_blocks|blocks)\.(\d+)\.(.+)$")


def hf_key(key: str) -> str:
    """Map one pacx MAE state-dict key (not ``attn.qkv.*``) to its ``ViTMAEForPreTraining`` key."""
    if m := _BLOCK_KEY.match(key):
        stack, index, rest = m.groups()
        prefix = "decoder.decoder_layers" if stack == "decoder_blocks" else "vit.layers"
        for ours, theirs in _BLOCK_RENAMES.items():
            if rest.startswith(ours):
                return f"{prefix}.{index}.{theirs}{rest[len(ours):]}"
        raise KeyError(f"no ViTMAE counterpart for block key {key!r}")
    if key.startswith(("mask_token", "decoder_")):
        return f"decoder.{key}"
    for ours, theirs in _TOP_RENAMES.items():
        if key == ours or (ours.endswith(".") and key.startswith(ours)):
            return theirs + key[len(ours):]
    raise KeyError(f"no ViTMAE counterpart for key {key!r}")


def hf_state_dict_from_mae(state: dict[str, torch.Tensor], legacy: bool = False) -> dict[str, torch.Tensor]:
    """pacx MAE state dict -> ``ViTMAEForPreTraining`` state dict (pure; the fused qkv is split in three).

    ``legacy``: the key names of older ``transformers`` releases (``vit.encoder.layer.{i}...``).
    """
    out = {}
    for key, value in state.items():
        if ".attn.qkv." in key:
            stack_and_index, kind = key.split(".attn.qkv.")
            base = hf_key(f"{stack_and_index}.norm1.weight").rsplit(".layernorm_before.", 1)[0]
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{base}.attention.{name}.{kind}"] = chunk
        else:
            out[hf_key(key)] = value
    if legacy:
        out = {_legacy_key(k): v for k, v in out.items()}
    return out


def _legacy_key(key: str) -> str:
    for new, old in _LEGACY_RENAMES:
        key = key.replace(new, old)
    return key


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter element counts (:func:`pacx.models.tuning.count_parameters`)."""
    trainable, total = count_parameters(model)
    return trainable, total - trainable


def frozen_parameter_names(model: nn.Module) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if not p.requires_grad)


# --------------------------------------------------------------------------------------------------
# Timing


def pacx_loss(model: nn.Module, imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return model(imgs, noise=noise)[0]


def hf_loss(model: nn.Module, imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=imgs, noise=noise).loss


@dataclass
class TrainRunner:
    """One model's training step on a fixed rotation of inputs: forward, backward, AdamW, zero_grad."""

    model: nn.Module
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    inputs: list[tuple[torch.Tensor, torch.Tensor]]  # (imgs [B, C, H, W], noise [B, L]) per step
    autocast: Callable[[], contextlib.AbstractContextManager]
    step_index: int = 0

    def step(self) -> torch.Tensor:
        imgs, noise = self.inputs[self.step_index % len(self.inputs)]
        self.step_index += 1
        with self.autocast():
            loss = self.loss_fn(self.model, imgs, noise)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


@dataclass
class ForwardRunner:
    """One model's inference pass on a fixed rotation of inputs: no gradients, as feature extraction runs
    it."""

    model: nn.Module
    inputs: list[torch.Tensor]  # imgs [B, C, H, W] per step
    autocast: Callable[[], contextlib.AbstractContextManager]
    step_index: int = 0

    def step(self) -> torch.Tensor:
        imgs = self.inputs[self.step_index % len(self.inputs)]
        self.step_index += 1
        with torch.no_grad(), self.autocast():
            return self.model(imgs)


def adamw_settings(stage1_config: dict) -> dict:
    """``lr``, ``betas``, ``weight_decay`` of a Stage 1 config's ``model`` section (its single source)."""
    model = stage1_config["model"]
    return {"lr": float(model["lr"]), "betas": tuple(model["betas"]),
            "weight_decay": float(model["weight_decay"])}


def make_adamw(model: nn.Module, settings: dict) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **settings)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepTimes:
    """Per-step seconds of one runner: wall clock, and CPU time of the whole process (all threads)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def time_interleaved(
    runners: dict[str, TrainRunner | ForwardRunner], warmup: int, steps: int, device: torch.device
) -> dict[str, StepTimes]:
    """Times of every timed step per runner, the runners interleaved step by step.

    ``warmup`` untimed steps per runner first (optimizer state allocation, ``torch.compile``, the
    allocator's caches), then ``steps`` timed steps per runner in the order A B, B A, A B, ... so
    neither model systematically runs first, and a burst of load from elsewhere on the machine hits
    both alike. Step ``i`` of A and step ``i`` of B are adjacent in time (see :func:`paired_ratio`).
    """
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name].step()
    _sync(device)
    times = {name: StepTimes() for name in names}
    for i in range(steps):
        for name in names if i % 2 == 0 else names[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            runners[name].step()
            _sync(device)
            times[name].wall.append(time.perf_counter() - wall)
            times[name].cpu.append(time.process_time() - cpu)
    log.debug("step times: %s", times)
    return times


def summarize(times: StepTimes, stat: str = "median") -> dict[str, float]:
    """Median and best wall time per step, median CPU time, and steps/s from ``stat`` (median | best).

    ``median`` is the default: robust to a stray slow step, and unlike ``best`` not flattered by a
    lucky quiet moment on a machine that other processes share.
    """
    out = {
        "step_s_median": statistics.median(times.wall),
        "step_s_best": min(times.wall),
        "cpu_s_median": statistics.median(times.cpu),
    }
    out["steps_per_s"] = 1.0 / out[f"step_s_{stat}"]
    return out


def paired_ratio(ours: list[float], theirs: list[float]) -> float:
    """Median over adjacent step pairs of ``theirs[i] / ours[i]`` (> 1: ours is faster).

    Load from other processes that lasts longer than a step pair slows both members alike and cancels
    in the ratio, which makes this the steadiest speed ratio on a busy machine.
    """
    return statistics.median(t / o for o, t in zip(ours, theirs, strict=True))
