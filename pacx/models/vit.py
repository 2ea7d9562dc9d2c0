"""The shared ViT encoder of every pacx stage (docs/method.md#backbone).

A plain ``nn.Module`` (no Lightning) of timm ``Block``s with a fixed 2-D sin-cos position embedding (He et
al., 2022). Its state-dict keys are those of timm's ``vit_*_patch*_224`` with ``num_classes=0`` and of the MAE
release encoders, so weights move between timm, MAE and pacx with ``strict=True``. The sin-cos code follows
the MAE reference ``util/pos_embed.py`` (Meta, CC BY-NC 4.0), re-written here in torch.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from pacx.weights.layout import ViTConfig

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
# Architecture description (the record itself, ViTConfig, is pacx.weights.layout's)


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
# feature), or the mean of the patch tokens (MAE's ``global_pool``; timm
# ``global_pool="avg", fc_norm=False``).
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


def create_vit(arch: str = "vit_base_patch16", img_size: int = 224, patch_size: int | None = None,
               **overrides):
    """Factory: ``create_vit("vit_base_patch16")`` is the paper's ViT-B/16 at 224 px."""
    return ViTEncoder(vit_config(arch, img_size, patch_size, **overrides))
