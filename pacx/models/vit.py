"""The shared ViT encoder of every pacx stage.

A plain ``nn.Module`` (no Lightning) built from timm ``Block``s with a *fixed* 2-D sin-cos position
embedding, as in the MAE paper (He et al., 2022) and docs/method.md#backbone. Its state-dict keys are
exactly those of timm's ``vit_*_patch*_224`` with ``num_classes=0`` (and of the official MAE release
encoders), so weights move between timm, the MAE release and pacx with ``strict=True``.

The sin-cos construction follows the public MAE reference (``util/pos_embed.py``, Meta, CC BY-NC 4.0),
re-written here in torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

# --------------------------------------------------------------------------------------------------
# Position embedding


def sincos_pos_embed_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, embed_dim]: first half sin(pos·ω), second half cos(pos·ω), ω_i = 10000^(-2i/D)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # [D/2]
    out = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]  # [M, D/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """[(1 +) G*G, D] fixed 2-D embedding; half the channels encode the row, half the column.

    Row-major over the patch grid (the order ``PatchEmbed`` flattens in); the CLS position is zeros.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_h, grid_w = torch.meshgrid(coords, coords, indexing="ij")  # [G, G] each
    # MAE convention: the first half encodes the column (w), the second half the row (h).
    emb = torch.cat(
        [sincos_pos_embed_1d(embed_dim // 2, grid_w), sincos_pos_embed_1d(embed_dim // 2, grid_h)], dim=1
    )  # [G*G, D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


# --------------------------------------------------------------------------------------------------
# Architecture description


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


# Named size variants. ``test`` is tiny for CPU unit tests; ``demo`` is the
# built-in demo's encoder (docs/method.md#demo-scale).
VIT_ARCHS: dict[str, dict] = {
    "vit_test": dict(embed_dim=32, depth=2, num_heads=2, patch_size=8),
    "vit_demo": dict(embed_dim=128, depth=4, num_heads=4, patch_size=8),
    "vit_tiny_patch16": dict(embed_dim=192, depth=12, num_heads=3, timm_model="vit_tiny_patch16_224"),
    "vit_small_patch16": dict(embed_dim=384, depth=12, num_heads=6, timm_model="vit_small_patch16_224"),
    "vit_base_patch16": dict(embed_dim=768, depth=12, num_heads=12, timm_model="vit_base_patch16_224"),
    "vit_large_patch16": dict(embed_dim=1024, depth=24, num_heads=16, timm_model="vit_large_patch16_224"),
}


def vit_config(arch: str, img_size: int = 224, patch_size: int | None = None, **overrides) -> ViTConfig:
    """Resolve a named architecture (plus image/patch size and explicit overrides) to a ``ViTConfig``."""
    if arch not in VIT_ARCHS:
        raise KeyError(f"unknown ViT architecture {arch!r}; known: {sorted(VIT_ARCHS)}")
    kwargs = {**VIT_ARCHS[arch], "img_size": img_size, **overrides}
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    return ViTConfig(**kwargs)


# --------------------------------------------------------------------------------------------------
# Encoder


# How the tokens after the final norm [B, 1 + L, D] become the feature [B, D]: the CLS token (the paper's
# feature), or the mean of the patch tokens (MAE's ``global_pool``; timm ``global_pool="avg", fc_norm=False``).
POOLS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "cls": lambda tokens: tokens[:, 0],
    "avg": lambda tokens: tokens[:, 1:].mean(dim=1),
}


class ViTEncoder(nn.Module):
    """ViT encoder: patch embed → [CLS] + fixed sin-cos positions → blocks → LayerNorm.

    ``forward_features(x) -> [B, 1 + L, D]`` (all tokens after the final norm);
    ``forward(x) -> [B, D]``: the pooled feature, by default (``pool="cls"``) the CLS token after the final
    norm. ``pool`` is not part of the weights: set it with :meth:`set_pool`.
    """

    def __init__(self, cfg: ViTConfig, pool: str = "cls") -> None:
        super().__init__()
        self.cfg = cfg
        self.set_pool(pool)
        self.embed_dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        # Fixed: a non-trainable parameter so that it sits in the state dict under timm's key.
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.embed_dim), requires_grad=False)
        norm_layer = layer_norm(cfg.norm_eps)
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, norm_layer=norm_layer)
            for _ in range(cfg.depth)
        )
        self.norm = norm_layer(cfg.embed_dim)
        self.init_weights()

    def init_weights(self) -> None:
        """MAE initialisation: sin-cos positions, xavier-uniform linears, patch conv as a linear."""
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.embed_dim, self.cfg.grid_size)[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_linear_and_norm)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> patch tokens with positions added, [B, L, D] (no CLS yet)."""
        return self.patch_embed(x) + self.pos_embed[:, 1:, :]

    def cls_with_pos(self, batch: int) -> torch.Tensor:
        return (self.cls_token + self.pos_embed[:, :1, :]).expand(batch, -1, -1)  # [B, 1, D]

    def forward_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.prepare_tokens(x)  # [B, L, D]
        tokens = torch.cat([self.cls_with_pos(tokens.shape[0]), tokens], dim=1)  # [B, 1 + L, D]
        return self.forward_blocks(tokens)

    def set_pool(self, pool: str) -> ViTEncoder:
        if pool not in POOLS:
            raise KeyError(f"unknown pool {pool!r}; known: {sorted(POOLS)}")
        self.pool = pool
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return POOLS[self.pool](self.forward_features(x))  # [B, D]


def layer_norm(eps: float):
    return partial(nn.LayerNorm, eps=eps)


def init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def create_vit(arch: str = "vit_base_patch16", img_size: int = 224, patch_size: int | None = None, **overrides):
    """Factory: ``create_vit("vit_base_patch16")`` is the paper's ViT-B/16 at 224 px."""
    return ViTEncoder(vit_config(arch, img_size, patch_size, **overrides))


def config_from_state_dict(state: dict[str, torch.Tensor], **overrides) -> ViTConfig:
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
