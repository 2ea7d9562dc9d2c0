"""MAE model: masking, the masked-only loss, patch layout, decoder key names."""

import pytest
import torch

from pacx.models.mae import MAE_ARCHS, DecoderConfig, create_mae, patchify, random_masking, unpatchify
from pacx.models.vit import sincos_pos_embed_2d


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9, 0.95])
def test_masking_keeps_exactly_int_L_1_minus_r(ratio):
    torch.manual_seed(0)
    b, n, d = 4, 196, 8
    x = torch.randn(b, n, d)
    kept, mask, ids_restore = random_masking(x, ratio)
    k = int(n * (1 - ratio))
    assert kept.shape == (b, k, d)
    assert mask.shape == (b, n) and torch.all(mask.sum(1) == n - k)
    # kept tokens are exactly the rows of x where mask == 0, in shuffle order
    for i in range(b):
        visible = torch.nonzero(mask[i] == 0).squeeze(1)
        assert set(map(tuple, kept[i].tolist())) == set(map(tuple, x[i, visible].tolist()))


def test_ids_restore_inverts_the_shuffle():
    torch.manual_seed(1)
    x = torch.randn(3, 49, 4)
    noise = torch.rand(3, 49)
    ids_shuffle = torch.argsort(noise, dim=1)
    _, mask, ids_restore = random_masking(x, 0.75, noise=noise)
    shuffled = torch.gather(x, 1, ids_shuffle[..., None].expand(-1, -1, 4))
    restored = torch.gather(shuffled, 1, ids_restore[..., None].expand(-1, -1, 4))
    torch.testing.assert_close(restored, x, rtol=0, atol=0)
    # the smallest-noise patches are the visible ones
    keep = int(49 * 0.25)
    for i in range(3):
        assert set(torch.nonzero(mask[i] == 0).squeeze(1).tolist()) == set(ids_shuffle[i, :keep].tolist())


def test_mask_ratio_is_validated():
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(torch.zeros(1, 4, 2), 1.0)


@pytest.mark.parametrize("channels", [1, 3])
def test_patchify_layout_and_inverse(channels):
    imgs = torch.randn(2, channels, 32, 32)
    p = 8
    x = patchify(imgs, p)
    assert x.shape == (2, 16, p * p * channels)
    # patch (row 1, col 2) holds pixels [8:16, 16:24] in (row, col, channel) order
    manual = imgs[0, :, 8:16, 16:24].permute(1, 2, 0).reshape(-1)
    torch.testing.assert_close(x[0, 1 * 4 + 2], manual)
    torch.testing.assert_close(unpatchify(x, p, channels), imgs)


def test_loss_ignores_visible_patches_and_matches_definition():
    torch.manual_seed(0)
    model = create_mae("mae_vit_test", img_size=32)
    imgs = torch.randn(2, 3, 32, 32)
    loss, pred, mask = model(imgs, mask_ratio=0.75)
    # independent computation: mean over masked patches of per-patch MSE
    target = patchify(imgs, 8)
    per_patch = ((pred - target) ** 2).mean(-1)
    expected = per_patch[mask.bool()].mean()
    torch.testing.assert_close(loss, expected)
    # changing predictions on visible patches leaves the loss unchanged; on masked ones it does not
    visible = (mask == 0)[..., None]
    altered = pred + 100.0 * visible
    torch.testing.assert_close(model.forward_loss(imgs, altered, mask), loss)
    assert not torch.isclose(model.forward_loss(imgs, pred + 1.0 * (~visible), mask), loss)


def test_norm_pix_loss_normalises_targets_per_patch():
    model = create_mae("mae_vit_test", img_size=32, norm_pix_loss=True)
    imgs = torch.randn(2, 3, 32, 32) * 5 + 3
    t = model.pixel_targets(imgs)
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1), torch.ones(2, 16), atol=1e-3, rtol=0)


def test_mask_ratio_reaches_the_model():
    model = create_mae("mae_vit_test", img_size=32, mask_ratio=0.9)
    latent, mask, _ = model.forward_encoder(torch.randn(1, 3, 32, 32), mask_ratio=0.9)
    assert latent.shape[1] == 1 + int(16 * 0.1)
    _, _, mask = model(torch.randn(1, 3, 32, 32))  # default: the model's own 0.9
    assert mask.sum() == 16 - int(16 * 0.1)
    _, _, mask = model(torch.randn(1, 3, 32, 32), mask_ratio=0.5)  # an explicit ratio wins
    assert mask.sum() == 8
    default = create_mae("mae_vit_test", img_size=32)
    assert default.mask_ratio == 0.9  # the paper's (docs/method.md#stage-1), not MAE's 0.75
    assert default(torch.randn(1, 3, 32, 32))[2].sum() == 15


def test_encoder_input_equals_embed_all_then_mask():
    """The kept-only embedding of ``forward_encoder`` against the reference order written out: conv patch
    embedding of every patch, its position added, the ``K`` smallest-noise patches kept in noise order, the
    CLS token with its own position first. Positions and CLS are random here (the CLS position is not 0)."""
    torch.manual_seed(0)
    model = create_mae("mae_vit_test", img_size=32).double()
    with torch.no_grad():
        model.pos_embed.normal_()
        model.cls_token.normal_()
        model.patch_embed.proj.bias.normal_()
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    noise = torch.rand(2, 16, generator=g, dtype=torch.float64)
    conv = model.patch_embed.proj
    tokens = torch.nn.functional.conv2d(imgs, conv.weight, conv.bias, stride=8).flatten(2).transpose(1, 2)
    tokens = tokens + model.pos_embed[:, 1:]  # [2, 16, D]
    cls = (model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1)
    for ratio in (0.0, 0.75):
        k = int(16 * (1 - ratio))
        keep = torch.argsort(noise, dim=1)[:, :k]
        kept = torch.stack([tokens[i, keep[i]] for i in range(2)])
        expected = model.forward_blocks(torch.cat([cls, kept], dim=1))
        latent, mask, _ = model.forward_encoder(imgs, ratio, noise)
        torch.testing.assert_close(latent, expected)
        assert mask.sum() == 2 * (16 - k)
    # nothing masked: the CLS feature is the plain encoder's (attention does not see the token order)
    torch.testing.assert_close(model.forward_encoder(imgs, 0.0, noise)[0][:, 0], model.encode(imgs))


def test_official_decoder_key_names():
    keys = set(create_mae("mae_vit_test", img_size=32).state_dict())
    for k in ["mask_token", "decoder_embed.weight", "decoder_pos_embed", "decoder_blocks.0.attn.qkv.weight",
              "decoder_norm.weight", "decoder_pred.weight", "cls_token", "pos_embed", "norm.weight"]:
        assert k in keys
    base = create_mae("mae_vit_base_patch16")
    assert base.decoder_pred.weight.shape == (16 * 16 * 3, 512)
    assert len(base.decoder_blocks) == 8 and base.decoder_blocks[0].attn.num_heads == 16
    assert DecoderConfig() == DecoderConfig(512, 8, 16)  # the default decoder is the paper's too
    assert 0.015 < base.mask_token.std().item() < 0.025  # MAE's normal(0.02) initialisation


def test_decoder_puts_each_kept_token_back_at_its_patch_and_drops_cls():
    """``forward_decoder`` against a loop: token ``j`` of the latent (after CLS) goes to patch ``keep[j]``,
    mask tokens fill the rest, decoder positions are added, the CLS output is dropped."""
    torch.manual_seed(0)
    model = create_mae("mae_vit_test", img_size=32).double()
    g = torch.Generator().manual_seed(2)
    imgs = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    noise = torch.rand(2, 16, generator=g, dtype=torch.float64)
    latent, _, ids_restore = model.forward_encoder(imgs, 0.75, noise)
    keep = torch.argsort(noise, dim=1)[:, :4]
    x = model.decoder_embed(latent)
    tokens = model.mask_token.expand(2, 17, -1).clone()
    tokens[:, 0] = x[:, 0]
    for i in range(2):
        for j in range(4):
            tokens[i, 1 + int(keep[i, j])] = x[i, 1 + j]
    tokens = tokens + model.decoder_pos_embed
    for blk in model.decoder_blocks:
        tokens = blk(tokens)
    expected = model.decoder_pred(model.decoder_norm(tokens))[:, 1:]
    torch.testing.assert_close(model.forward_decoder(latent, ids_restore), expected)


def test_decoder_positions_are_fixed_sincos_with_a_zero_cls_row():
    model = create_mae("mae_vit_test", img_size=32)
    pos = model.decoder_pos_embed
    assert pos.shape == (1, 17, 16) and not pos.requires_grad
    torch.testing.assert_close(pos[0], sincos_pos_embed_2d(16, 4), rtol=0, atol=0)
    assert torch.all(pos[0, 0] == 0) and pos[0, 1:].abs().sum(-1).min() > 0.5
    assert set(MAE_ARCHS) >= {"mae_vit_base_patch16", "mae_vit_test", "mae_vit_demo"}


def test_encode_equals_encoder_forward():
    from pacx.models.vit import ViTEncoder

    model = create_mae("mae_vit_test", img_size=32).eval()
    enc = ViTEncoder(model.cfg).eval()
    enc.load_state_dict(model.encoder_state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(enc(x), model.encode(x))
