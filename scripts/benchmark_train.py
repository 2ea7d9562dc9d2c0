"""MAE training throughput: pacx's ViT MAE vs Hugging Face ``ViTMAEForPreTraining``, one run.

Both models are built at the same configuration (HF's config is derived from ours, see
``pacx.perf.train.hf_vitmae_config``), hold the same weights (ours loaded into HF strictly, the fused
qkv split in three), see the same image and masking-noise tensors and use the same AdamW settings,
which are read, with the mask ratio, from the Stage 1 config (``--config``, default
``configs/stage1/mae_vitb_chexpert.yaml``). A timed step is forward + backward +
``optimizer.step()`` + ``zero_grad(set_to_none=True)``; warm-up steps are excluded; the two models
alternate step by step (A B, B A, ...); steps/s is 1 / median (default) or 1 / best step time, and
the median ratio over adjacent step pairs is printed too (the steadiest figure when other processes
load the machine). The analytic FLOP count behind TFLOP/s and MFU is documented in
``pacx/perf/train.py``.

    python scripts/benchmark_train.py --json /tmp/bench_train.json            # ViT-B/16, CPU, fp32
    python scripts/benchmark_train.py --device cuda --precision bf16 --batch-size 256 --compile
    python scripts/benchmark_train.py --arch mae_vit_test --img-size 32 --steps 2 --warmup 1   # tiny
    python scripts/benchmark_train.py --stage2 ...   # Stage 2: LoRA vs full fine-tuning, images/s
    python scripts/benchmark_train.py --stage3 ...   # Stage 3: segmentation step and probe feature extraction

``--rates FILE`` merges the measured per-GPU images/s into FILE (keys ``stage1``; ``stage2_lora``,
``stage2_full``; ``seg``, ``probe_features``), the input of
``scripts/reproduce_paper.py PLAN --estimate FILE`` (:mod:`pacx.reproduce.estimate`). ``probe_features`` is a
forward-only timing of the frozen encoder (no gradients, eval mode), which is what a linear probe's feature
extraction runs.

Needs ``transformers`` (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import sys
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import timm
import torch
import transformers
import yaml

# Runnable from a plain checkout too (without `pip install -e .`): the repository root holds `pacx`.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pacx.models.flops import mae_forward_flops, mae_train_flops  # noqa: E402
from pacx.models.mae import MAE_ARCHS, create_mae  # noqa: E402
from pacx.perf.train import (  # noqa: E402
    ForwardRunner,
    TrainRunner,
    adamw_settings,
    create_hf_twin,
    frozen_parameter_names,
    hf_loss,
    make_adamw,
    mfu,
    pacx_loss,
    paired_ratio,
    parameter_counts,
    summarize,
    time_interleaved,
)
from pacx.reproduce.estimate import merge_rates  # noqa: E402
from pacx.utils import git_sha, write_text_atomic  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="mae_vit_base_patch16", choices=sorted(MAE_ARCHS))
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--config", type=Path, default=REPO / "configs/stage1/mae_vitb_chexpert.yaml",
                   help="Stage 1 config: the AdamW settings (model.lr, betas, weight_decay) and mask ratio")
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 on CPU, 64 on CUDA")
    p.add_argument("--steps", type=int, default=8, help="timed steps per model (interleaved A B, B A, ...)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps per model first (use >= 3 with --compile)")
    p.add_argument("--stat", choices=("median", "best"), default="median",
                   help="step time behind steps/s and the ratio")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 = torch.autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True) for both models")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="peak FLOP/s for MFU, in TFLOP/s (989 = dense bf16 H100/H200)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--hf-attn", default="sdpa", help="HF attn_implementation (sdpa | eager)")
    p.add_argument("--seed", type=int, default=0)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--stage2", action="store_true",
                      help="instead: the Stage 2 distillation step, LoRA vs full "
                           "fine-tuning at the same batch")
    mode.add_argument("--stage3", action="store_true",
                      help="instead: Stage 3 on a frozen encoder, the segmentation training step (frozen "
                           "backbone + decoder) and the linear probe's feature extraction (forward only)")
    p.add_argument("--stage2-arch", default="vit_base_patch16", help="encoder for --stage2")
    p.add_argument("--stage3-arch", default="vit_base_patch16", help="encoder for --stage3")
    p.add_argument("--json", type=Path, default=None, help="write the results as a flat JSON object")
    p.add_argument("--rates", type=Path, default=None,
                   help="merge the measured per-GPU images/s into this rates file "
                        "(scripts/reproduce_paper.py --estimate reads it)")
    args = p.parse_args(argv)
    if args.steps < 1:  # the medians of zero timed steps would fail later with a cryptic error
        p.error("--steps must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def rate_entry(args: argparse.Namespace, device: torch.device, batch: int, images_per_s: float,
               **what) -> dict:
    """One entry of the rates file: the per-GPU images/s and the conditions it was measured under."""
    return {"img_per_s": images_per_s, "device": device.type, "device_name": device_name(device),
            "precision": args.precision, "batch": batch, "compile": args.compile,
            "fused_adamw": args.fused_adamw, "steps": args.steps, "stat": args.stat,
            "torch": torch.__version__, "git": git_sha(),
            "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"), **what}


def write_rates(args: argparse.Namespace, entries: dict[str, dict]) -> None:
    if args.rates is not None:
        merge_rates(args.rates, entries)
        print(f"merged {', '.join(entries)} into {args.rates}")


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def stage2_loss(module, imgs: torch.Tensor, teachers: dict[str, torch.Tensor]) -> torch.Tensor:
    """One Stage 2 step's loss: encoder + heads + DistillationLoss, as PaCXModule's training step."""
    return module.loss_terms({"cxr": imgs, "teachers": teachers})[1]["loss"]


def run_stage2(args: argparse.Namespace, device: torch.device, batch: int) -> dict:
    """Stage 2 images/s with LoRA vs full fine-tuning of the same encoder, interleaved, same inputs."""
    from pacx.lit.pacx import PaCXModule

    stage2 = yaml.safe_load((REPO / "configs/stage2/pacx_vitb_symile.yaml").read_text())["model"]["init_args"]
    optim = {"lr": float(stage2["lr"]), "betas": tuple(stage2["betas"]),
             "weight_decay": float(stage2["weight_decay"])}
    if args.fused_adamw:
        optim["fused"] = True
    autocast = (partial(torch.autocast, device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext)
    modules, trainable = {}, {}
    for tuning in ("lora", "full"):
        torch.manual_seed(args.seed)
        modules[tuning] = PaCXModule(encoder_arch=args.stage2_arch, img_size=args.img_size, tuning=tuning)
        modules[tuning].to(device).train()
    gen = torch.Generator().manual_seed(args.seed)
    widths = modules["lora"].teacher_widths  # {teacher: feature width}, the paper's teachers by default
    inputs = [(torch.randn(batch, 3, args.img_size, args.img_size, generator=gen).to(device),
               {t: torch.randn(batch, d, generator=gen).to(device) for t, d in widths.items()})
              for _ in range(2)]
    # the step's function, module included
    loss_fn = torch.compile(stage2_loss) if args.compile else stage2_loss
    runners = {}
    for tuning, module in modules.items():
        params = [p for p in module.parameters() if p.requires_grad]
        trainable[tuning] = sum(p.numel() for p in params)
        runners[tuning] = TrainRunner(module, loss_fn, torch.optim.AdamW(params, **optim), inputs, autocast)
    print(f"timing Stage 2: {args.warmup} warm-up + {args.steps} timed steps per strategy, interleaved ...",
          flush=True)
    times = time_interleaved(runners, args.warmup, args.steps, device)
    stats = {name: summarize(t, args.stat) for name, t in times.items()}
    print(f"\nStage 2 distillation step ({args.stage2_arch}, {args.img_size}px, batch {batch}, {device.type} "
          f"({device_name(device)}), {torch.get_num_threads()} threads, {args.precision})")
    rows = [[name, f"{trainable[name]:,}", f"{s['step_s_median']:.4f}", f"{s['steps_per_s'] * batch:.2f}"]
            for name, s in stats.items()]
    print(format_table(["tuning", "trainable params", "median s/step", "images/s"], rows))
    ratio = stats["lora"]["steps_per_s"] / stats["full"]["steps_per_s"]
    print(f"\nratio LoRA / full (images/s, {args.stat}): {ratio:.3f}x")
    result = {"lora_images_per_s": stats["lora"]["steps_per_s"] * batch,
              "full_images_per_s": stats["full"]["steps_per_s"] * batch, "ratio": ratio,
              "lora_trainable_params": trainable["lora"], "full_trainable_params": trainable["full"],
              "batch_size": batch, "device": device.type, "precision": args.precision,
              "arch": args.stage2_arch, "img_size": args.img_size, "steps": args.steps}
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    write_rates(args, {f"stage2_{name}": rate_entry(args, device, batch, stats[name]["steps_per_s"] * batch,
                                                    arch=args.stage2_arch, img_size=args.img_size,
                                                    tuning=name, what="Stage 2 distillation step (encoder + "
                                                                      "heads + loss, backward, AdamW)")
                       for name in ("lora", "full")})
    return result


def seg_loss(module, imgs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """One segmentation step's loss: frozen backbone, decoder, BCE + soft Dice, as SegmentationModule's
    step."""
    return module.loss_fn(module(imgs).float(), masks)["loss"]


def run_stage3(args: argparse.Namespace, device: torch.device, batch: int) -> dict:
    """Stage 3 images/s on one frozen encoder: the segmentation training step and the feature extraction."""
    from pacx.lit.segment import SegmentationModule
    from pacx.models.backbones import BackboneConfig

    seg = yaml.safe_load((REPO / "configs/stage3/segmentation.yaml").read_text())["model"]["init_args"]
    optim = {"lr": float(seg["lr"]), "betas": tuple(seg["betas"]), "weight_decay": float(seg["weight_decay"])}
    if args.fused_adamw:
        optim["fused"] = True
    torch.manual_seed(args.seed)
    backbone = BackboneConfig(kind="random", arch=args.stage3_arch, img_size=args.img_size)
    module = SegmentationModule("cxlseg", backbone, decoder_width=seg["decoder_width"]).to(device).train()
    module.backbone.eval()  # frozen and in eval mode, as on_train_batch_start keeps it
    gen = torch.Generator().manual_seed(args.seed)
    shape = (batch, 3, args.img_size, args.img_size)
    inputs = [(torch.randn(shape, generator=gen).to(device),
               (torch.rand(batch, 1, args.img_size, args.img_size, generator=gen) > 0.5).float().to(device))
              for _ in range(2)]
    autocast = (partial(torch.autocast, device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext)
    compile_ = torch.compile if args.compile else (lambda m: m)
    decoder = [p for p in module.parameters() if p.requires_grad]
    runners = {"seg": TrainRunner(compile_(module), seg_loss, torch.optim.AdamW(decoder, **optim), inputs,
                                  autocast),
               "probe_features": ForwardRunner(compile_(module.backbone),
                                               [imgs for imgs, _ in inputs], autocast)}
    print(f"timing Stage 3: {args.warmup} warm-up + {args.steps} timed steps each, interleaved ...",
          flush=True)
    times = time_interleaved(runners, args.warmup, args.steps, device)
    stats = {name: summarize(t, args.stat) for name, t in times.items()}
    print(f"\nStage 3 on a frozen {args.stage3_arch} ({args.img_size}px, batch {batch}, {device.type} "
          f"({device_name(device)}), {torch.get_num_threads()} threads, {args.precision})")
    labels = {"seg": "segmentation step (decoder trains)",
              "probe_features": "feature extraction (forward only)"}
    rows = [[labels[name], f"{s['step_s_median']:.4f}", f"{s['steps_per_s'] * batch:.2f}"]
            for name, s in stats.items()]
    print(format_table(["what", "median s/step", "images/s"], rows))
    result = {"seg_images_per_s": stats["seg"]["steps_per_s"] * batch,
              "probe_features_images_per_s": stats["probe_features"]["steps_per_s"] * batch,
              "seg_trainable_params": sum(p.numel() for p in decoder), "batch_size": batch,
              "device": device.type, "precision": args.precision, "arch": args.stage3_arch,
              "img_size": args.img_size, "steps": args.steps}
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    what = {"seg": "segmentation step (frozen backbone forward, decoder forward + backward, AdamW)",
            "probe_features": "frozen encoder forward without gradients (the linear probe's feature "
                              "extraction)"}
    write_rates(args, {name: rate_entry(args, device, batch, result[f"{name}_images_per_s"],
                                        arch=args.stage3_arch, img_size=args.img_size, what=what[name])
                       for name in ("seg", "probe_features")})
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    batch = args.batch_size or (8 if device.type == "cpu" else 64)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stage2:
        return run_stage2(args, device, batch)
    if args.stage3:
        return run_stage3(args, device, batch)
    torch.manual_seed(args.seed)
    stage1 = yaml.safe_load(args.config.read_text())
    optim = adamw_settings(stage1)
    if args.fused_adamw:
        optim["fused"] = True

    ours = create_mae(args.arch, img_size=args.img_size, norm_pix_loss=False,
                      mask_ratio=stage1["model"]["mask_ratio"]).to(device).train()
    hf = create_hf_twin(ours, attn_implementation=args.hf_attn).train()
    cfg, dec = ours.cfg, ours.dec

    # Same configuration: equal trainable and frozen parameter counts; the strict state-dict load in
    # create_hf_twin has already matched every tensor's name and shape one to one.
    (train_ours, frozen_ours), (train_hf, frozen_hf) = parameter_counts(ours), parameter_counts(hf)
    if (train_ours, frozen_ours) != (train_hf, frozen_hf):
        raise SystemExit(f"parameter counts differ: ours {train_ours}+{frozen_ours} frozen, "
                         f"HF {train_hf}+{frozen_hf} frozen")

    # Same inputs for both: a small rotation of (image, masking-noise) batches.
    gen = torch.Generator().manual_seed(args.seed)
    shape = (batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    inputs = [(torch.randn(shape, generator=gen).to(device),
               torch.rand(batch, cfg.num_patches, generator=gen).to(device))
              for _ in range(2)]
    autocast = (partial(torch.autocast, device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext)

    # Same function: identical weights + noise must give the same loss (before any step is taken).
    with torch.no_grad(), autocast():
        loss_ours = pacx_loss(ours, *inputs[0]).float().item()
        loss_hf = hf_loss(hf, *inputs[0]).float().item()

    models = {"pacx": (ours, pacx_loss), "hf": (hf, hf_loss)}
    runners = {
        name: TrainRunner(torch.compile(model) if args.compile else model, loss_fn, make_adamw(model, optim),
                          inputs, autocast)
        for name, (model, loss_fn) in models.items()
    }
    print(f"timing: {args.warmup} warm-up + {args.steps} timed steps per model, interleaved ...", flush=True)
    load_before = os.getloadavg()[0]
    times = time_interleaved(runners, args.warmup, args.steps, device)
    load_after = os.getloadavg()[0]
    stats = {name: summarize(t, args.stat) for name, t in times.items()}

    flops_step = mae_train_flops(cfg, dec, ours.mask_ratio, batch)
    for s in stats.values():
        s["tflops"] = flops_step * s["steps_per_s"] / 1e12
        s["mfu"] = mfu(flops_step, 1.0 / s["steps_per_s"], args.peak_tflops)
    ratio = stats["pacx"]["steps_per_s"] / stats["hf"]["steps_per_s"]
    ratio_median = stats["hf"]["step_s_median"] / stats["pacx"]["step_s_median"]
    ratio_best = stats["hf"]["step_s_best"] / stats["pacx"]["step_s_best"]
    ratio_paired = paired_ratio(times["pacx"].wall, times["hf"].wall)
    ratio_cpu = stats["hf"]["cpu_s_median"] / stats["pacx"]["cpu_s_median"]

    kept = int(cfg.num_patches * (1 - ours.mask_ratio))
    print(f"\nMAE training step ({args.arch}: ViT {cfg.embed_dim}d x {cfg.depth} x {cfg.num_heads}h, "
          f"MLP {int(cfg.embed_dim * cfg.mlp_ratio)}, patch {cfg.patch_size}, {cfg.img_size}px; decoder "
          f"{dec.decoder_embed_dim}d x {dec.decoder_depth} x {dec.decoder_num_heads}h; mask "
          f"{ours.mask_ratio} -> {kept}/{cfg.num_patches} kept)")
    print(f"device {device.type} ({device_name(device)}), {torch.get_num_threads()} threads, "
          f"{args.precision}, batch {batch}, compile={args.compile}, AdamW {optim} (from "
          f"{args.config.name})")
    print(f"{args.warmup} warm-up + {args.steps} timed steps per model; load average (1 min) "
          f"{load_before:.2f} before, {load_after:.2f} after timing, on {os.cpu_count()} CPUs")
    print(f"torch {torch.__version__}, timm {timm.__version__}, transformers {transformers.__version__}, "
          f"HF attn_implementation={hf.config._attn_implementation}")
    print(f"parameters: trainable ours {train_ours:,} / HF {train_hf:,}; frozen sin-cos ours {frozen_ours:,} "
          f"{frozen_parameter_names(ours)} / HF {frozen_hf:,} {frozen_parameter_names(hf)}")
    tensors_ours = sum(1 for p in ours.parameters() if p.requires_grad)
    tensors_hf = sum(1 for p in hf.parameters() if p.requires_grad)
    print("structure: same tensors, except that ours fuses q, k, v into one qkv linear per block (HF: "
          f"three), so {tensors_ours} vs {tensors_hf} trainable tensors of equal total size; ours embeds "
          f"only the kept patches, HF embeds all {cfg.num_patches} and then drops {cfg.num_patches - kept}")
    print(f"same weights + noise, loss before training: ours {loss_ours:.6f}  HF {loss_hf:.6f}  "
          f"|diff| {abs(loss_ours - loss_hf):.2e}")
    print(f"analytic FLOPs: {mae_forward_flops(cfg, dec, ours.mask_ratio)['total'] / 1e9:.4g} GFLOP forward "
          f"per sample, {flops_step / 1e9:.4g} GFLOP per training step (3 x forward x batch)\n")
    header = ["model", "median s/step", "best s/step", "CPU s/step", f"steps/s ({args.stat})", "samples/s",
              "TFLOP/s", f"MFU@{args.peak_tflops:g}TF"]
    rows = [[label, f"{s['step_s_median']:.4f}", f"{s['step_s_best']:.4f}", f"{s['cpu_s_median']:.3f}",
             f"{s['steps_per_s']:.4f}",
             f"{s['steps_per_s'] * batch:.3f}", f"{s['tflops']:.4f}", f"{100 * s['mfu']:.4f}%"]
            for label, s in (("pacx MAE (ours)", stats["pacx"]), ("HF ViTMAEForPreTraining", stats["hf"]))]
    print(format_table(header, rows))
    print(f"\nratio ours / HF (steps/s, {args.stat}): {ratio:.3f}x   [median {ratio_median:.3f}x, best "
          f"{ratio_best:.3f}x, median of adjacent-pair ratios {ratio_paired:.3f}x, CPU time "
          f"{ratio_cpu:.3f}x]")
    print("per-step wall s, ours: " + " ".join(f"{t:.3f}" for t in times["pacx"].wall))
    print("per-step wall s, HF:   " + " ".join(f"{t:.3f}" for t in times["hf"].wall))
    if device.type != "cuda":
        print(f"(MFU on {device.type} is relative to --peak-tflops {args.peak_tflops:g}, an accelerator "
              "peak: for information only)")

    result = {
        "ours_steps_per_s": stats["pacx"]["steps_per_s"],
        "hf_steps_per_s": stats["hf"]["steps_per_s"],
        "ratio": ratio,
        "ratio_stat": args.stat,
        "ratio_best": ratio_best,
        "ratio_median": ratio_median,
        "ratio_paired_median": ratio_paired,
        "ratio_cpu_time": ratio_cpu,
        "ours_step_s_median": stats["pacx"]["step_s_median"],
        "hf_step_s_median": stats["hf"]["step_s_median"],
        "ours_step_s_best": stats["pacx"]["step_s_best"],
        "hf_step_s_best": stats["hf"]["step_s_best"],
        "ours_tflops": stats["pacx"]["tflops"],
        "hf_tflops": stats["hf"]["tflops"],
        "mfu_ours": stats["pacx"]["mfu"],
        "mfu_hf": stats["hf"]["mfu"],
        "peak_tflops": args.peak_tflops,
        "train_flops_per_step": flops_step,
        "batch_size": batch,
        "device": device.type,
        "device_name": device_name(device),
        # both models' steps ran in this process: the peak of the two (CUDA only)
        "cuda_peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                                 else None),
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "compile": args.compile,
        "fused_adamw": args.fused_adamw,
        "arch": args.arch,
        "img_size": cfg.img_size,
        "mask_ratio": ours.mask_ratio,
        "adamw_lr": optim["lr"],
        "adamw_betas": " ".join(map(str, optim["betas"])),
        "adamw_weight_decay": optim["weight_decay"],
        "steps": args.steps,
        "ours_cpu_s_median": stats["pacx"]["cpu_s_median"],
        "hf_cpu_s_median": stats["hf"]["cpu_s_median"],
        "ours_step_times_s": " ".join(f"{t:.4f}" for t in times["pacx"].wall),
        "hf_step_times_s": " ".join(f"{t:.4f}" for t in times["hf"].wall),
        "load_avg_1min_before": load_before,
        "load_avg_1min_after": load_after,
        "warmup": args.warmup,
        "params_ours": train_ours,
        "params_hf": train_hf,
        "param_tensors_ours": tensors_ours,
        "param_tensors_hf": tensors_hf,
        "frozen_params_ours": frozen_ours,
        "frozen_params_hf": frozen_hf,
        "loss_ours": loss_ours,
        "loss_hf": loss_hf,
        "hf_attn_implementation": hf.config._attn_implementation,
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "transformers_version": transformers.__version__,
    }
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    stage1 = rate_entry(args, device, batch, stats["pacx"]["steps_per_s"] * batch, arch=args.arch,
                        img_size=cfg.img_size, mask_ratio=ours.mask_ratio, mfu=stats["pacx"]["mfu"],
                        peak_tflops=args.peak_tflops, hf_img_per_s=stats["hf"]["steps_per_s"] * batch,
                        what="MAE training step (forward, backward, AdamW), pacx's model")
    write_rates(args, {"stage1": stage1})
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
