"""Attention capture, rollout, heatmaps and the attention_rollout script (pacx.eval.rollout)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pacx.eval.rollout import (
    HEAD_FUSIONS,
    attention_maps,
    attention_rollout,
    capture_attention,
    cls_heatmap,
    discard_lowest,
    fuse_heads,
    overlay,
    render_grid,
    rollout_heatmaps,
)
from pacx.models.vit import create_vit
from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return create_vit("vit_test", img_size=32).eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


def manual_attentions(encoder, x: torch.Tensor) -> list[torch.Tensor]:
    """Recompute every block's softmax(q kᵀ · scale) by walking the blocks by hand."""
    out = []
    with torch.no_grad():
        tokens = encoder.prepare_tokens(x)
        tokens = torch.cat([encoder.cls_with_pos(x.shape[0]), tokens], dim=1)  # [B, T, D]
        for blk in encoder.blocks:
            h = blk.norm1(tokens)
            b, t, d = h.shape
            heads = blk.attn.num_heads
            q, k, _ = blk.attn.qkv(h).reshape(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            out.append(torch.softmax(q @ k.transpose(-2, -1) * (d // heads) ** -0.5, dim=-1))
            tokens = blk(tokens)
    return out


def test_attention_maps_match_manual_softmax(encoder, images):
    attns = attention_maps(encoder, images)
    expected = manual_attentions(encoder, images)
    assert len(attns) == len(encoder.blocks) == 2
    tokens = 1 + (32 // 8) ** 2
    for got, want in zip(attns, expected):
        assert got.shape == (2, 2, tokens, tokens)  # [B, heads, T, T]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.sum(-1), torch.ones(2, 2, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_capture_leaves_output_unchanged(encoder, images, fused):
    for blk in encoder.blocks:
        blk.attn.fused_attn = fused
    try:
        with torch.no_grad():
            plain = encoder(images)
            with capture_attention(encoder) as captured:
                hooked = encoder(images)
            after = encoder(images)
        assert torch.equal(plain, hooked) and torch.equal(plain, after)
        assert all(a is not None for a in captured)
        assert not any(blk.attn._forward_hooks for blk in encoder.blocks)  # hooks removed
    finally:
        for blk in encoder.blocks:
            blk.attn.fused_attn = True


def test_non_fused_path_agrees_with_capture(encoder, images):
    """timm's own explicit attention (fused_attn off) sees the same probabilities: patch its softmax."""
    seen = []
    real_softmax = torch.Tensor.softmax

    def spy(self, *args, **kwargs):
        out = real_softmax(self, *args, **kwargs)
        seen.append(out.detach().clone())
        return out

    for blk in encoder.blocks:
        blk.attn.fused_attn = False
    try:
        torch.Tensor.softmax = spy
        with torch.no_grad():
            encoder(images)
    finally:
        torch.Tensor.softmax = real_softmax
        for blk in encoder.blocks:
            blk.attn.fused_attn = True
    timm_probs = [s for s in seen if s.dim() == 4]
    for got, want in zip(attention_maps(encoder, images), timm_probs, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def numpy_rollout(layers: list[np.ndarray]) -> np.ndarray:
    """Explicit reference: per layer mean over heads, 0.5·A + 0.5·I, renormalise, R = A_L ⋯ A_1."""
    result = np.eye(layers[0].shape[-1])
    for attn in layers:
        a = attn.mean(axis=0)
        a = 0.5 * a + 0.5 * np.eye(a.shape[0])
        a = a / a.sum(axis=1, keepdims=True)
        result = a @ result
    return result


def random_attention(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    logits = rng.normal(size=shape)
    e = np.exp(logits)
    return e / e.sum(axis=-1, keepdims=True)


def test_rollout_two_layer_two_head_example():
    rng = np.random.default_rng(0)
    layers = [random_attention(rng, (2, 3, 3)) for _ in range(2)]  # 2 layers of [heads=2, T=3, T=3]
    got = attention_rollout([torch.tensor(a[None]) for a in layers])  # batch of 1
    np.testing.assert_allclose(got[0].double().numpy(), numpy_rollout(layers), atol=1e-6)
    # Order matters: the product is A2 · A1, not A1 · A2.
    swapped = numpy_rollout(layers[::-1])
    assert not np.allclose(got[0].numpy(), swapped, atol=1e-4)
    torch.testing.assert_close(got.sum(-1), torch.ones(1, 3), atol=1e-6, rtol=0)


def test_rollout_of_identity_and_uniform_attention():
    t = 5
    eye = torch.eye(t).expand(1, 3, t, t)  # every token attends to itself
    for residual in (True, False):
        torch.testing.assert_close(attention_rollout([eye, eye, eye], residual=residual), torch.eye(t)[None])
    uniform = torch.full((1, 2, t, t), 1.0 / t)
    # Without the residual, uniform attention mixes everything at once and stays uniform.
    torch.testing.assert_close(attention_rollout([uniform, uniform], residual=False),
                               torch.full((1, t, t), 1 / t))
    heat = cls_heatmap(attention_rollout([uniform, uniform], residual=False), grid=2)
    assert torch.equal(heat, torch.zeros(1, 2, 2))  # a flat map scales to zeros, not NaN


def test_head_fusion_registry():
    assert set(HEAD_FUSIONS) == {"mean", "max", "min"}
    a = torch.rand(2, 4, 5, 5)
    torch.testing.assert_close(fuse_heads(a, "mean"), a.mean(1))
    torch.testing.assert_close(fuse_heads(a, "max"), a.max(1).values)
    torch.testing.assert_close(fuse_heads(a, "min"), a.min(1).values)
    with pytest.raises(KeyError, match="unknown head fusion"):
        fuse_heads(a, "median")
    for name in HEAD_FUSIONS:
        out = attention_rollout([a, a], head_fusion=name)
        assert out.shape == (2, 5, 5) and torch.isfinite(out).all()


def test_discard_ratio_keeps_cls_column():
    rng = np.random.default_rng(3)
    a = torch.tensor(random_attention(rng, (2, 5, 5)), dtype=torch.float32)  # [B, T, T]
    kept = discard_lowest(a, 0.5)
    assert torch.equal(kept[:, :, 0], a[:, :, 0])
    rest = kept[:, :, 1:].reshape(2, -1)
    assert ((rest == 0).sum(1) == int(5 * 4 * 0.5)).all()
    # The survivors are the largest ones.
    assert (rest.amax(1) == a[:, :, 1:].reshape(2, -1).amax(1)).all()
    assert torch.equal(discard_lowest(a, 0.0), a)
    with pytest.raises(ValueError):
        discard_lowest(a, 1.0)
    out = attention_rollout([a[:, None]], discard_ratio=0.9)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 5))
    # the lowest half over the whole sample, not per row: row 1 loses both entries, row 0 none
    small = torch.tensor([[[0.1, 0.9, 0.8], [0.5, 0.1, 0.2], [0.4, 0.3, 0.05]]])
    expected = torch.tensor([[[0.1, 0.9, 0.8], [0.5, 0.0, 0.0], [0.4, 0.3, 0.0]]])
    torch.testing.assert_close(discard_lowest(small, 0.5), expected, rtol=0, atol=0)


def test_cls_heatmap_shape_and_range(encoder, images):
    heat = cls_heatmap(attention_rollout(attention_maps(encoder, images)), grid=4)
    assert heat.shape == (2, 4, 4)
    assert heat.min() >= 0 and heat.max() <= 1
    assert (torch.allclose(heat.amax(dim=(1, 2)), torch.ones(2))
            and torch.allclose(heat.amin(dim=(1, 2)), torch.zeros(2)))
    with pytest.raises(ValueError):
        cls_heatmap(torch.rand(1, 17, 17), grid=3)


def test_cls_heatmap_is_the_cls_row_in_patch_order():
    """Row 0 (CLS attending to patch j) in row-major patch order, min-max scaled; column 0 is not read."""
    roll = torch.zeros(1, 5, 5)
    roll[0, 0, 1:] = torch.tensor([1.0, 3.0, 2.0, 5.0])  # patches (0,0) (0,1) (1,0) (1,1)
    roll[0, 1:, 0] = torch.tensor([9.0, 0.0, 4.0, 7.0])
    expected = torch.tensor([[[0.0, 0.5], [0.25, 1.0]]])
    torch.testing.assert_close(cls_heatmap(roll, grid=2), expected, rtol=0, atol=1e-7)


def test_rollout_heatmaps_default_to_mean_fusion_and_do_not_depend_on_the_batch(encoder, images):
    attns = attention_maps(encoder, images)
    expected = cls_heatmap(attention_rollout(attns, head_fusion="mean"), grid=4)
    torch.testing.assert_close(rollout_heatmaps(encoder, images), expected)
    torch.testing.assert_close(rollout_heatmaps(encoder, images, batch_size=1), expected)
    assert not torch.allclose(cls_heatmap(attention_rollout(attns, head_fusion="max"), grid=4), expected)


def test_overlay_and_render_grid(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, size=(40, 30), dtype=np.uint8)
    heat = torch.rand(4, 4)
    out = overlay(img, heat, alpha=0.4)
    assert out.shape == (40, 30, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(overlay(img, heat, alpha=0.0), np.repeat(img[..., None], 3, 2))
    png = render_grid([img, img], {"a": torch.rand(2, 4, 4), "b": np.random.rand(2, 4, 4)},
                      tmp_path / "g.png")
    with Image.open(png) as im:
        assert im.width > im.height  # 3 panels wide, 2 rows high
    assert not list(tmp_path.glob(".*tmp*"))  # no leftover temporary file


def write_images(folder: Path, n: int = 3) -> list[Path]:
    from pacx.testing.images import simple_cxr

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(folder / f"img{i}.png")
        Image.fromarray(simple_cxr(rng, width=64, height=56)).save(paths[-1])
    return paths


def test_script_end_to_end(stage1_run, tmp_path, capsys):
    write_images(tmp_path / "imgs")
    out = tmp_path / "out" / "roll.png"
    rc = load_script("attention_rollout").main(["--backbones", f"mae={stage1_run}", "rnd=random:vit_test",
                             "--images", str(tmp_path / "imgs"), "--out", str(out), "--discard-ratio", "0.2"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        width, height = im.size
    panel = height / 3  # 3 rows of square-ish panels
    assert 2.0 < width / panel < 4.5  # image | mae | rnd
    maps = np.load(out.with_suffix(".npz"))
    assert sorted(maps.files) == ["mae", "rnd"]
    for name in maps.files:
        assert maps[name].shape == (3, 4, 4) and maps[name].dtype == np.float32  # 32 px / patch 8
        assert np.isfinite(maps[name]).all() and maps[name].min() >= 0 and maps[name].max() <= 1


def test_script_random_backbone_depends_only_on_the_seed(stage1_run, tmp_path):
    """A random-init backbone is fixed by --seed: a file backbone listed before it (whose loading draws random
    numbers) leaves its heatmaps exactly as they are alone."""
    write_images(tmp_path / "imgs", n=2)
    script = load_script("attention_rollout")
    alone, both = tmp_path / "alone.png", tmp_path / "both.png"
    common = ["--images", str(tmp_path / "imgs"), "--img-size", "32", "--seed", "3"]
    assert script.main(["--backbones", "rnd=random:vit_test", *common, "--out", str(alone)]) == 0
    assert script.main(["--backbones", f"mae={stage1_run}", "rnd=random:vit_test", *common, "--out",
                        str(both)]) == 0
    np.testing.assert_array_equal(np.load(alone.with_suffix(".npz"))["rnd"],
                                  np.load(both.with_suffix(".npz"))["rnd"])


def test_script_csv_manifest_and_errors(stage1_run, tmp_path, capsys):
    paths = write_images(tmp_path / "data" / "imgs", n=2)
    csv = tmp_path / "data" / "manifest.csv"
    csv.write_text("Path,label\n" + "".join(f"imgs/{p.name},0\n" for p in paths))
    script = load_script("attention_rollout")
    out = tmp_path / "m.png"
    script.main(["--backbones", "rnd=random:vit_test", "--img-size", "32", "--images", str(csv), "--out",
                 str(out)])
    assert np.load(out.with_suffix(".npz"))["rnd"].shape == (2, 4, 4)

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(SystemExit):
        script.main(["--backbones", "rnd=random:vit_test", "--img-size", "32", "--images", str(bad),
                     "--out", str(out)])
    assert str(bad) in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the run's encoder is a 32 px one
        script.main(["--backbones", f"mae={stage1_run}", "--img-size", "64", "--images", str(csv), "--out",
                     str(out)])
    assert "all backbones must share one image size" in capsys.readouterr().err


@pytest.mark.bad_input
def test_a_blank_path_in_an_image_manifest_names_the_row(tmp_path):
    """An attention-rollout manifest CSV with a blank path cell → ManifestError naming the CSV and the row (it
    was read as the image "nan", or a TypeError without a file)."""
    from pacx.data.manifest import ManifestError
    from pacx.eval.rollout import collect_image_paths

    csv = tmp_path / "manifest.csv"
    csv.write_text("Path,label\na.png,0\n,1\n")
    with pytest.raises(ManifestError, match=r"manifest\.csv: 1 row\(s\) with a blank Path.*row 1 \(line 3\)"):
        collect_image_paths([csv])
