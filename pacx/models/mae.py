"""Masked autoencoder (Stage 1) on the shared ViT encoder (docs/method.md#stage-1).

Follows He et al., "Masked Autoencoders Are Scalable Vision Learners" (2022) and the public MAE reference
``models_mae.py`` (Meta, CC BY-NC 4.0), re-written here. Decoder keys keep the official names, so MAE
releases and the authors' Stage 1 checkpoints load strictly (docs/design.md#mae-keys). Shapes: ``L`` patches,
``K = int(L * (1 - mask_ratio))`` kept, ``P = patch² · C``; ``mask: [B, L]``, 1 = removed, 0 = visible.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from pacx.constants import MAE_MASK_RATIO
from pacx.models.vit import (
    ViTEncoder,
    init_linear_and_norm,
    layer_norm,
    sincos_pos_embed_2d,
    vit_config,
)
from pacx.weights.layout import DECODER_KEY_PREFIXES, ViTConfig

# --------------------------------------------------------------------------------------------------
# Patch <-> pixel layout


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p*p*C], patches row-major, pixels (row, col, channel) within a patch."""
    b, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not divisible by patch size {p}")
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def patch_pixels(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, C*p*p], patches row-major, pixels (channel, row, col) within a patch.

    The layout of a patch-embedding conv weight ``[D, C, p, p]`` flattened, so
    ``F.linear(patch_pixels(x, p), w.flatten(1), b)`` is ``conv2d(x, w, b, stride=p)`` as tokens.
    """
    b, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not divisible by patch size {p}")
    x = imgs.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # [B, h, w, C, p, p]
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """[B, L, p*p*C] -> [B, C, H, W] for a square grid; exact inverse of :func:`patchify`."""
    b, n, d = x.shape
    p = patch_size
    g = int(round(n**0.5))
    if g * g != n or d != p * p * channels:
        raise ValueError(f"cannot unpatchify [{b}, {n}, {d}] with patch {p} and {channels} channels")
    x = x.reshape(b, g, g, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, g * p, g * p)


def random_masking(
    x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by sorting uniform noise.

    x: [B, L, D] -> (kept [B, K, D], mask [B, L] (1 = removed), ids_restore [B, L]) with
    K = int(L * (1 - mask_ratio)); ``ids_restore`` un-shuffles: ``shuffled.gather(1, ids_restore)``.
    """
    b, n, d = x.shape
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    len_keep = int(n * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(b, n, device=x.device)  # [B, L]
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    kept = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, d))  # [B, K, D]
    mask = torch.ones(b, n, device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # [B, L] in patch order
    return kept, mask, ids_restore


# --------------------------------------------------------------------------------------------------
# Model


@dataclass(frozen=True)
class DecoderConfig:
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16


class MaskedAutoencoderViT(ViTEncoder):
    """ViT encoder + lightweight transformer decoder predicting the pixels of every patch."""

    def __init__(self, cfg: ViTConfig, dec: DecoderConfig = DecoderConfig(), norm_pix_loss: bool = False,
                 mask_ratio: float = MAE_MASK_RATIO) -> None:
        super().__init__(cfg)
        self.dec = dec
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio = mask_ratio
        norm_layer = layer_norm(cfg.norm_eps)
        self.decoder_embed = nn.Linear(cfg.embed_dim, dec.decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, cfg.num_patches + 1, dec.decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(dec.decoder_embed_dim, dec.decoder_num_heads, cfg.mlp_ratio, qkv_bias=True,
                  norm_layer=norm_layer)
            for _ in range(dec.decoder_depth)
        )
        self.decoder_norm = norm_layer(dec.decoder_embed_dim)
        self.decoder_pred = nn.Linear(dec.decoder_embed_dim, cfg.patch_size**2 * cfg.in_chans, bias=True)
        self.initialize_decoder()

    def initialize_decoder(self) -> None:
        self.decoder_pos_embed.data.copy_(
            sincos_pos_embed_2d(self.dec.decoder_embed_dim, self.cfg.grid_size)[None]
        )
        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_linear_and_norm)

    # ---- encoder / decoder / loss -------------------------------------------------------------

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs [B, C, H, W] -> (latent [B, 1 + K, D], mask [B, L], ids_restore [B, L]).

        Masks *before* embedding. The patch embedding is a per-patch linear map (a stride-p conv), so
        embedding only the K kept patches yields the same tokens as the reference order (embed all L,
        add positions, then mask) without embedding the L - K patches the encoder drops: 90 % of the
        patch embedding's work and its backward at r = 0.9.
        """
        pixels = patch_pixels(imgs, self.cfg.patch_size)  # [B, L, C*p*p]
        if pixels.shape[1] != self.cfg.num_patches:
            raise ValueError(f"{tuple(imgs.shape[-2:])} images give {pixels.shape[1]} patches; the model "
                             f"has positions for {self.cfg.num_patches} ({self.cfg.img_size} px)")
        kept_pixels, mask, ids_restore = random_masking(pixels, mask_ratio, noise)  # [B, K, C*p*p]
        ids_keep = torch.argsort(ids_restore, dim=1)[:, : kept_pixels.shape[1]]  # the shuffle's first K
        proj = self.patch_embed.proj
        # its weight is applied directly: a wrapper (e.g. LoRA) would be skipped
        if type(proj) is not nn.Conv2d:
            raise TypeError("forward_encoder needs a plain Conv2d patch projection, got "
                            f"{type(proj).__name__}")
        kept = self.patch_embed.norm(F.linear(kept_pixels, proj.weight.flatten(1), proj.bias))  # [B, K, D]
        kept = kept + self.pos_embed[0, 1:][ids_keep]  # their positions, [B, K, D]
        latent = torch.cat([self.cls_with_pos(kept.shape[0]), kept], dim=1)  # [B, 1 + K, D]
        return self.forward_blocks(latent), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, 1 + K, D] -> pixel predictions for every patch [B, L, P]."""
        x = self.decoder_embed(latent)  # [B, 1 + K, Dd]
        b, k1, dd = x.shape
        n = ids_restore.shape[1]
        mask_tokens = self.mask_token.expand(b, n + 1 - k1, -1)  # [B, L - K, Dd]
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)  # shuffled order
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, dd))  # [B, L, Dd]
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # [B, L, P]

    def pixel_targets(self, imgs: torch.Tensor) -> torch.Tensor:
        target = patchify(imgs, self.cfg.patch_size)  # [B, L, P]
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the *removed* patches only."""
        per_patch = ((pred - self.pixel_targets(imgs)) ** 2).mean(dim=-1)  # [B, L]
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (loss, pred [B, L, P], mask [B, L]). ``mask_ratio`` defaults to the model's own."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def encode(self, imgs: torch.Tensor) -> torch.Tensor:
        """Unmasked CLS feature [B, D], identical to ``ViTEncoder.forward``."""
        return ViTEncoder.forward(self, imgs)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's tensors alone, in timm layout."""
        return {k: v for k, v in self.state_dict().items() if not is_decoder_key(k)}


def is_decoder_key(key: str) -> bool:
    return key.startswith(DECODER_KEY_PREFIXES)


# Named MAE variants: encoder architecture + decoder size.
MAE_ARCHS: dict[str, tuple[str, DecoderConfig]] = {
    "mae_vit_test": ("vit_test", DecoderConfig(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)),
    "mae_vit_demo": ("vit_demo", DecoderConfig(decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)),
    "mae_vit_base_patch16": ("vit_base_patch16", DecoderConfig(512, 8, 16)),
    "mae_vit_large_patch16": ("vit_large_patch16", DecoderConfig(512, 8, 16)),
}


def create_mae(
    arch: str = "mae_vit_base_patch16",
    img_size: int = 224,
    patch_size: int | None = None,
    norm_pix_loss: bool = False,
    mask_ratio: float = MAE_MASK_RATIO,
    **encoder_overrides,
) -> MaskedAutoencoderViT:
    """Factory: ``create_mae("mae_vit_base_patch16")`` is the paper's ViT-B/16 MAE (decoder 512×8, 16
    heads)."""
    if arch not in MAE_ARCHS:
        raise KeyError(f"unknown MAE architecture {arch!r}; known: {sorted(MAE_ARCHS)}")
    vit_arch, dec = MAE_ARCHS[arch]
    cfg = vit_config(vit_arch, img_size, patch_size, **encoder_overrides)
    return MaskedAutoencoderViT(cfg, dec, norm_pix_loss=norm_pix_loss, mask_ratio=mask_ratio)


def decoder_config_dict(model: MaskedAutoencoderViT) -> dict:
    return asdict(model.dec)
