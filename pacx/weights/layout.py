"""The tensor layout of a ViT encoder in timm keys (docs/method.md#backbone): the architecture record
(:class:`ViTConfig`), its inference from shapes, the key prefixes of decoders and heads, and the LoRA merge
that turns peft state dicts into plain weights (``W + (alpha / r) · B · A``). Pure functions on state dicts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

DECODER_KEY_PREFIXES = ("mask_token", "decoder_")  # an MAE's decoder (official MAE names)
HEAD_KEY_PREFIXES = ("head.", "fc_norm.")  # a timm classifier's head
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.(?P<adapter>[^.]+)\.weight$")


@dataclass(frozen=True)
class ViTConfig:
    """Everything that fixes the encoder's tensors; recorded in checkpoints and export metadata."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    timm_model: str = "vit_base_patch16_224"

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(
                f"image size {self.img_size} is not divisible by patch size {self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def to_dict(self) -> dict:
        return asdict(self)

    def timm_kwargs(self) -> dict:
        """Keyword arguments for ``timm.create_model(self.timm_model, num_classes=0, **kwargs)``.

        timm's ViT fixes LayerNorm eps at 1e-6: an encoder with another eps (the authors' Stage 2 used
        1e-5) loads strictly with these kwargs, but timm's features then differ slightly; the exact eps
        is recorded beside them (``norm_eps`` in the export metadata).
        """
        return dict(
            img_size=self.img_size,
            patch_size=self.patch_size,
            in_chans=self.in_chans,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
        )


def config_from_state_dict(state: Mapping[str, torch.Tensor], **overrides) -> ViTConfig:
    """Infer the architecture of timm-layout encoder weights from tensor shapes.

    Depth, width, patch and image size follow from shapes; the head count does not, so it comes from
    the standard ViT family (width → heads) unless given.
    """
    try:
        embed_dim = state["cls_token"].shape[-1]
        patch_size = state["patch_embed.proj.weight"].shape[-1]
        in_chans = state["patch_embed.proj.weight"].shape[1]
        num_patches = state["pos_embed"].shape[1] - 1
        mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise KeyError(f"not a ViT encoder state dict in timm layout: missing key {err}") from None
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"pos_embed holds {num_patches} patch positions, not a square grid")
    heads = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
    timm_names = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224",
                  1024: "vit_large_patch16_224"}
    kwargs = dict(
        img_size=grid * patch_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        mlp_ratio=mlp_hidden / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        timm_model=timm_names.get(embed_dim, "vit_base_patch16_224"),
    )
    overrides = dict(overrides)
    num_heads = overrides.pop("num_heads", None) or heads.get(embed_dim)
    if num_heads is None:
        raise ValueError(f"cannot infer the head count of a {embed_dim}-wide ViT; pass num_heads")
    return ViTConfig(**{**kwargs, "num_heads": num_heads, **overrides})


def merge_lora_state(state: Mapping[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A peft-LoRA state dict (``base_model.model.`` prefix) -> plain weights, W + scaling · B · A.

    ``scaling`` is alpha / r. Keys of non-LoRA modules lose the peft prefix; ``base_layer`` disappears.
    """
    state = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _LORA_KEY.match(key)
        if match:
            lora.setdefault(match["module"], {})[match["which"]] = value
        else:
            out[key.replace(".base_layer.", ".")] = value
    for module, ab in lora.items():
        if set(ab) != {"A", "B"}:
            raise KeyError(f"LoRA module {module} lacks lora_{'B' if 'A' in ab else 'A'}")
        weight = f"{module}.weight"
        if weight not in out:
            raise KeyError(f"LoRA module {module} has no base_layer weight")
        delta = (ab["B"].double() @ ab["A"].double()) * scaling
        out[weight] = (out[weight].double() + delta).to(out[weight].dtype)
    return out
