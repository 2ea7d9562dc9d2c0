"""scripts/benchmark_train.py and pacx/perf/train.py: same-configuration HF
twin, analytic FLOPs, CLI smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pacx.models.mae import MAE_ARCHS, create_mae
from pacx.perf.train import (
    create_hf_twin,
    frozen_parameter_names,
    hf_key,
    hf_loss,
    mae_forward_flops,
    mae_train_flops,
    pacx_loss,
    parameter_counts,
)

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "benchmark_train.py"
TINY = dict(arch="mae_vit_test", img_size=32)


def _inputs(model, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    imgs = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    return imgs, torch.rand(batch, cfg.num_patches, generator=g)


def _counted_flops(fn, backward: bool) -> int:
    # The counter has no formula for the fused CPU attention kernel; the math backend runs as bmm's.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss = fn()
        if backward:
            loss.backward()
    return counter.get_total_flops()


def test_hf_twin_is_the_same_configuration():
    torch.manual_seed(0)
    ours = create_mae(**TINY)
    hf = create_hf_twin(ours)  # strict load: every tensor name and shape matched one to one
    assert parameter_counts(ours) == parameter_counts(hf)
    assert parameter_counts(ours)[0] > 0
    # The fixed sin-cos tables are the only frozen tensors, in both, and they correspond.
    assert frozen_parameter_names(ours) == ["decoder_pos_embed", "pos_embed"]
    assert sorted(hf_key(k) for k in frozen_parameter_names(ours)) == frozen_parameter_names(hf)
    assert hf.config._attn_implementation == "sdpa"
    # Same weights and same masking noise: the same function.
    imgs, noise = _inputs(ours)
    torch.testing.assert_close(pacx_loss(ours, imgs, noise), hf_loss(hf, imgs, noise))
    # HF counts the same matmuls plus the embedding of the L - K patches it masks afterwards.
    cfg, batch = ours.cfg, imgs.shape[0]
    dropped = cfg.num_patches - int(cfg.num_patches * (1 - ours.mask_ratio))
    fwd = mae_forward_flops(cfg, ours.dec, ours.mask_ratio)["total"]
    extra = 2 * dropped * cfg.patch_size**2 * cfg.in_chans * cfg.embed_dim
    assert _counted_flops(lambda: hf_loss(hf, imgs, noise), backward=False) == (fwd + extra) * batch
    assert _counted_flops(lambda: pacx_loss(ours, imgs, noise), backward=False) == fwd * batch


@pytest.mark.parametrize("arch", sorted(MAE_ARCHS))
def test_analytic_flops_match_flop_counter(arch):
    batch = 2
    with torch.device("meta"):  # shapes only: ViT-L counts in a second
        model = create_mae(arch)
        imgs, noise = (torch.randn(batch, 3, model.cfg.img_size, model.cfg.img_size),
                       torch.rand(batch, model.cfg.num_patches))
    parts = mae_forward_flops(model.cfg, model.dec, model.mask_ratio)
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    # Forward: every counted FLOP is a matmul the formula names (LayerNorm, softmax, GELU, adds and the
    # loss are not counted by either), so the two agree exactly.
    assert _counted_flops(lambda: pacx_loss(model, imgs, noise), backward=False) == parts["total"] * batch
    # Training: the "3 x forward" convention over-counts by exactly the patch embedding's
    # input-gradient, which autograd never computes because the image needs no gradient.
    counted_train = _counted_flops(lambda: pacx_loss(model, imgs, noise), backward=True)
    analytic_train = mae_train_flops(model.cfg, model.dec, model.mask_ratio, batch)
    assert counted_train == analytic_train - parts["patch_embed"] * batch
    assert abs(counted_train - analytic_train) / analytic_train < 0.1


def test_vit_b_flops_reference_numbers():
    with torch.device("meta"):
        model = create_mae("mae_vit_base_patch16")
    parts = mae_forward_flops(model.cfg, model.dec, 0.9)
    # K = int(196 * 0.1) = 19 kept patches: 20 encoder tokens, 197 decoder tokens.
    assert parts["encoder"] == 12 * (2 * 20 * (4 * 768**2 + 2 * 768 * 3072) + 4 * 20**2 * 768)
    assert parts["decoder"] == 8 * (2 * 197 * (4 * 512**2 + 2 * 512 * 2048) + 4 * 197**2 * 512)
    assert parts["patch_embed"] == 2 * 19 * 768 * 768  # only the kept patches are embedded
    assert round(parts["total"] / 1e9, 2) == 14.16


def test_cli_tiny_run_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--arch", TINY["arch"], "--img-size", str(TINY["img_size"]),
           "--batch-size", "4", "--steps", "2", "--warmup", "1", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ratio ours / HF" in proc.stdout
    result = json.loads(out.read_text())
    for key in ("ours_steps_per_s", "hf_steps_per_s", "ratio", "batch_size", "device", "precision",
                "params_ours", "params_hf", "mfu_ours", "mfu_hf", "train_flops_per_step"):
        assert key in result, key
    assert all(not isinstance(v, (dict, list)) for v in result.values())  # flat
    assert result["ours_steps_per_s"] > 0 and result["hf_steps_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["ours_steps_per_s"] / result["hf_steps_per_s"])
    assert (result["batch_size"], result["device"], result["precision"]) == (4, "cpu", "fp32")
    assert result["params_ours"] == result["params_hf"] > 0
    assert result["loss_ours"] == pytest.approx(result["loss_hf"], rel=1e-5)


def test_kept_only_patch_embedding_equals_embed_then_mask():
    # The benchmark's MAE embeds only the kept patches; the reference order (embed all L patches, add
    # positions, then mask with the same noise) must give the same encoder input and the same mask.
    from pacx.models.mae import random_masking

    torch.manual_seed(0)
    model = create_mae(**TINY)
    imgs, noise = _inputs(model)
    latent, mask, ids_restore = model.forward_encoder(imgs, 0.75, noise)
    kept, ref_mask, ref_ids = random_masking(model.prepare_tokens(imgs), 0.75, noise)
    ref_latent = model.forward_blocks(torch.cat([model.cls_with_pos(kept.shape[0]), kept], dim=1))
    torch.testing.assert_close(latent, ref_latent)
    assert torch.equal(mask, ref_mask) and torch.equal(ids_restore, ref_ids)


def test_stage2_lora_vs_full_writes_json(tmp_path):
    """--stage2: LoRA trains fewer parameters than full fine-tuning; both speeds are reported."""
    from scripts.benchmark_train import main

    result = main(["--stage2", "--stage2-arch", "vit_test", "--img-size", "32", "--batch-size", "4",
                   "--steps", "2", "--json", str(tmp_path / "s2.json")])
    saved = json.loads((tmp_path / "s2.json").read_text())
    assert saved["lora_images_per_s"] > 0 and saved["full_images_per_s"] > 0
    assert saved["ratio"] == pytest.approx(saved["lora_images_per_s"] / saved["full_images_per_s"])
    assert result["lora_trainable_params"] < result["full_trainable_params"]


@pytest.mark.parametrize("mode", [["--stage2", "--stage2-arch", "vit_test"],
                                  ["--stage3", "--stage3-arch", "vit_test"]])
def test_threads_apply_to_stage2_and_stage3(mode, capsys):
    """--threads sets torch's intra-op threads in every mode, not only for the Stage 1 step."""
    from scripts.benchmark_train import main

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        main([*mode, "--img-size", "32", "--batch-size", "2", "--steps", "1", "--warmup", "1",
              "--threads", "1"])
        assert torch.get_num_threads() == 1
        assert "), 1 threads, fp32)" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)


def test_rates_from_every_mode_merge_into_one_file(tmp_path):
    """--rates: Stage 1, Stage 2 (LoRA, full) and Stage 3 (segmentation, probe features) runs fill one rates
    file, each run keeping the others' keys; the estimate reads it (pacx.reproduce.estimate)."""
    from pacx.reproduce.estimate import RATE_COMMANDS, read_rates
    from scripts.benchmark_train import main

    rates = tmp_path / "rates.json"
    tiny = ["--img-size", "32", "--batch-size", "4", "--steps", "2", "--warmup", "1", "--rates", str(rates)]
    main(["--arch", TINY["arch"], "--threads", "1", *tiny])
    s2 = main(["--stage2", "--stage2-arch", "vit_test", *tiny])
    s3 = main(["--stage3", "--stage3-arch", "vit_test", *tiny, "--json", str(tmp_path / "s3.json")])
    got = read_rates(rates)
    assert set(got) == set(RATE_COMMANDS) == {"stage1", "stage2_lora", "stage2_full", "seg", "probe_features"}
    assert got["stage2_lora"]["img_per_s"] == s2["lora_images_per_s"]
    assert got["seg"]["img_per_s"] == s3["seg_images_per_s"] > 0
    assert got["probe_features"]["img_per_s"] == s3["probe_features_images_per_s"] > 0
    assert s3["seg_trainable_params"] > 0  # the decoder trains, the backbone does not
    assert (got["stage1"]["arch"], got["stage1"]["img_size"], got["stage1"]["mask_ratio"]) == ("mae_vit_test",
                                                                                               32, 0.9)
    for entry in got.values():
        assert (entry["device"], entry["precision"], entry["batch"]) == ("cpu", "fp32", 4)
    with pytest.raises(SystemExit):  # one mode per run
        main(["--stage2", "--stage3"])


@pytest.mark.parametrize("argv, message", [(["--steps", "0"], "--steps must be >= 1"),
                                           (["--warmup", "-1"], "--warmup must be >= 0")])
def test_step_counts_are_checked_at_parse_time(argv, message, capsys):
    from scripts.benchmark_train import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
