"""The shared ViT encoder: timm compatibility both ways, sin-cos closed form, architecture checks."""

import math

import numpy as np
import pytest
import timm
import torch

from pacx.models.vit import VIT_ARCHS, ViTEncoder, create_vit, sincos_pos_embed_2d
from pacx.weights.layout import ViTConfig, config_from_state_dict


def _timm_twin(enc: ViTEncoder):
    cfg = enc.cfg
    return timm.create_model(cfg.timm_model, pretrained=False, num_classes=0, **cfg.timm_kwargs())


@pytest.mark.parametrize("arch", sorted(VIT_ARCHS))
def test_timm_key_for_key_both_ways(arch):
    torch.manual_seed(0)
    patch = VIT_ARCHS[arch].get("patch_size", 16)
    ours = create_vit(arch, img_size=2 * patch).eval()
    theirs = _timm_twin(ours).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())  # same keys, same order
    x = torch.randn(2, 3, 2 * patch, 2 * patch)

    theirs.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=1e-5)

    torch.nn.init.normal_(theirs.pos_embed, std=0.02)  # timm weights have learned positions
    fresh = create_vit(arch, img_size=2 * patch).eval()
    fresh.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), theirs(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(fresh.forward_features(x)[:, 0], fresh(x))


def test_vit_b16_is_the_paper_backbone():
    enc = create_vit("vit_base_patch16")
    assert (enc.cfg.embed_dim, enc.cfg.depth, enc.cfg.num_heads, enc.cfg.patch_size) == (768, 12, 12, 16)
    assert enc.pos_embed.shape == (1, 197, 768) and not enc.pos_embed.requires_grad
    assert enc.norm.eps == 1e-6 and enc.blocks[0].attn.qkv.bias is not None
    assert sum(p.numel() for p in enc.parameters()) == 85_798_656  # timm's vit_base_patch16_224, no head
    assert sum(p.numel() for p in enc.parameters() if p.requires_grad) == 85_798_656 - 197 * 768


def test_sincos_matches_closed_form():
    dim, grid = 16, 3
    emb = sincos_pos_embed_2d(dim, grid).numpy()
    assert emb.shape == (1 + grid * grid, dim)
    np.testing.assert_array_equal(emb[0], 0)
    quarter = dim // 4
    for row in range(grid):
        for col in range(grid):
            e = emb[1 + row * grid + col]
            for k in range(quarter):
                omega = 1.0 / 10000 ** (k / quarter)
                # first half: column (w), sin then cos; second half: row (h), sin then cos
                assert math.isclose(e[k], math.sin(col * omega), abs_tol=1e-6)
                assert math.isclose(e[quarter + k], math.cos(col * omega), abs_tol=1e-6)
                assert math.isclose(e[2 * quarter + k], math.sin(row * omega), abs_tol=1e-6)
                assert math.isclose(e[3 * quarter + k], math.cos(row * omega), abs_tol=1e-6)


def test_image_size_must_divide_by_patch():
    with pytest.raises(ValueError, match="not divisible by patch size 16"):
        create_vit("vit_base_patch16", img_size=230)
    with pytest.raises(ValueError, match="not divisible"):
        ViTConfig(img_size=64, patch_size=10)


def test_unknown_arch_lists_known():
    with pytest.raises(KeyError, match="vit_base_patch16"):
        create_vit("vit_gigantic")


def test_architecture_inferred_from_state_dict():
    enc = create_vit("vit_small_patch16", img_size=64)
    cfg = config_from_state_dict(enc.state_dict())
    assert cfg == enc.cfg
    odd = create_vit("vit_test", img_size=32)
    with pytest.raises(ValueError, match="pass num_heads"):
        config_from_state_dict(odd.state_dict())
    assert config_from_state_dict(odd.state_dict(), num_heads=2, timm_model=odd.cfg.timm_model) == odd.cfg
