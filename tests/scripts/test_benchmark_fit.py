"""scripts/benchmark_fit.py and pacx/perf/fit.py: the real Stage 1 fit timed by a callback, checked against
counts and FLOPs computed here."""

from __future__ import annotations

import types

import pandas as pd
import pytest
import torch
import yaml

from pacx.data.chexpert import MANIFESTS
from pacx.models.flops import mae_train_flops
from pacx.models.mae import MAE_ARCHS
from pacx.models.vit import vit_config
from pacx.perf.fit import StepThroughput, batch_length, read_throughput
from pacx.reproduce.estimate import read_rates
from tests.helpers import REPO, load_script


def test_fit_benchmark_times_the_real_stage1_fit(tmp_path):
    work, rates = tmp_path / "work", tmp_path / "rates.json"
    result = load_script("benchmark_fit").main([
        "--config", str(REPO / "configs/demo/stage1_mae.yaml"), "--arch", "mae_vit_test", "--img-size", "32",
        "--batch-size", "4", "--workers", "0", "--num-images", "6", "--cache-size", "40", "--warmup", "2",
        "--steps", "3", "--workdir", str(work), "--json", str(tmp_path / "fit.json"), "--rates", str(rates)])
    # the steps after the warm-up, each a full batch of the per-device batch
    assert (result["timed_steps"], result["timed_batches"], result["timed_images_per_device"]) == (3, 3, 12)
    assert result["img_per_s"] == result["img_per_s_per_device"] == pytest.approx(12 / result["seconds"])
    ratio = yaml.safe_load((REPO / "configs/demo/stage1_mae.yaml").read_text())["model"]["mask_ratio"]
    flops = mae_train_flops(vit_config("vit_test", 32), MAE_ARCHS["mae_vit_test"][1], ratio, 1)
    assert result["train_flops_per_image"] == flops
    assert result["mfu"] == pytest.approx(flops * result["img_per_s_per_device"] / 989e12)
    assert (result["device"], result["peak_memory_gib"], result["compile"], result["fused_adamw"]) == \
        ("cpu", None, False, False)
    assert (result["arch"], result["batch"], result["num_images"]) == ("mae_vit_test", 4, 6)
    # the manifest repeats the 6 images past warmup + steps + 1 batches: no epoch ends inside the timing
    train = pd.read_csv(work / "manifests" / MANIFESTS["train"])
    assert len(train) == 24 and train["Path"].nunique() == 6
    assert read_throughput(work / "throughput.json")["img_per_s"] == result["img_per_s"]
    entry = read_rates(rates)["stage1"]
    assert entry["img_per_s"] == result["img_per_s_per_device"] and "Stage1_MAE.py fit" in entry["what"]


def test_step_throughput_needs_a_timed_step_and_valid_settings():
    trainer = types.SimpleNamespace(max_steps=5)
    module = types.SimpleNamespace(device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"max_steps \(5\) must exceed warmup_steps \(5\)"):
        StepThroughput(warmup_steps=5).on_fit_start(trainer, module)
    StepThroughput(warmup_steps=4).on_fit_start(trainer, module)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        StepThroughput(warmup_steps=-1)
    with pytest.raises(ValueError, match="peak_tflops must be > 0"):
        StepThroughput(peak_tflops=0)


def test_batch_length_and_result_file(tmp_path):
    x = torch.zeros(7, 3)
    assert batch_length(x) == batch_length((x, torch.zeros(7))) == batch_length({"cxr": x}) == 7
    assert batch_length([{"a": x}]) == 7
    with pytest.raises(TypeError, match="cannot count the samples"):
        batch_length([])
    bad = tmp_path / "t.json"
    bad.write_text('{"img_per_s": 0}')
    with pytest.raises(ValueError, match="positive img_per_s"):
        read_throughput(bad)
    bad.write_text("{")
    with pytest.raises(ValueError, match="not a throughput result"):
        read_throughput(bad)
