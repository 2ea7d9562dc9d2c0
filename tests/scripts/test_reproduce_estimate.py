"""``scripts/reproduce_paper.py PLAN --estimate RATES``: GPU-hours per node of
the paper plan from a synthetic rates file (pacx.reproduce.estimate), the rates
file's merging and checks, point settings, documented split sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pacx.data.lowdata import subset_size
from pacx.data.registry import BENCHMARKS, SPLITS, BenchmarkSpec
from pacx.reproduce import main
from pacx.reproduce.costs import point_settings
from pacx.reproduce.estimate import format_hours, merge_rates, read_rates
from pacx.reproduce.plan import load_plan

REPO = Path(__file__).resolve().parents[2]
PAPER = REPO / "plans" / "paper.yaml"
RATES = {
    "stage1": {"img_per_s": 5000.0, "device_name": "NVIDIA H200", "precision": "bf16", "batch": 256,
               "arch": "mae_vit_base_patch16", "img_size": 224, "mask_ratio": 0.9},
    "stage2_lora": {"img_per_s": 2000.0},
    "probe_features": {"img_per_s": 4000.0},
}  # no "seg": the segmentation node must say how to measure it
# docs/performance.md#split-sizes (train, val, test), written out here so the
# registry's numbers are checked too
SIZES = {"chexchonet": (51543, 5728, 14318), "vindr": (13500, 1500, 3000), "chestx6": (14551, 1748, 1737),
         "nih": (73545, 12979, 25596), "tb": (449, 80, 133)}
SEEDS, BACKBONES = 5, 3


def _estimate(tmp_path, capsys, rates=RATES, *extra) -> tuple[str, dict]:
    path = tmp_path / "rates.json"
    path.write_text(json.dumps(rates))
    out = tmp_path / "estimate.json"
    assert main([str(PAPER), "--estimate", str(path), "--json", str(out), *extra]) == 0
    return capsys.readouterr().out, json.loads(out.read_text())


def _row(table: str, node: str) -> str:
    rows = [line for line in table.splitlines() if line.split()[:1] == [node]]
    assert len(rows) == 1, f"{node} not listed once:\n{table}"
    return rows[0]


def _probe_images(name: str, fraction: float) -> int:
    train, val, test = SIZES[name]
    n = train if fraction == 1.0 else subset_size(train, len(BENCHMARKS[name].labels), fraction)
    return 2 * n + val + test  # the flip-aware cache: each train image and its flip, then val and test


def test_paper_plan_estimate(tmp_path, capsys):
    table, est = _estimate(tmp_path, capsys)
    plan = load_plan(PAPER)
    for name in plan.nodes:  # every node is listed, script nodes included
        _row(table, name)
    nodes = est["nodes"]

    # Stage 1: 400 epochs x 223,414 CheXpert training images at 5,000 images/s per GPU, on 2 x 4 GPUs.
    stage1 = 400 * 223_414 / 5000.0 / 3600
    assert nodes["stage1"]["images"] == 400 * 223_414
    assert nodes["stage1"]["gpu_hours"] == stage1 and nodes["stage1"]["wall_hours"] == stage1 / 8
    assert _row(table, "stage1").split()[1:7] == ["1", "89,365,600", "stage1", format_hours(stage1), "8",
                                                   format_hours(stage1 / 8)]
    assert format_hours(stage1) == "4.96"
    # Stage 2: 50 epochs x 10,000 Symile rows with LoRA, 4 GPUs.
    assert nodes["stage2"]["images"] == 50 * 10_000 and nodes["stage2"]["rate_keys"] == ["stage2_lora"]
    assert nodes["stage2"]["gpu_hours"] == 50 * 10_000 / 2000.0 / 3600
    # Linear probes: one cached feature pass per point; TB has 3 backbones x 5 seeds.
    tb = _probe_images("tb", 1.0)
    assert tb == 1111 and nodes["stage3_lp"]["images"] == BACKBONES * SEEDS * tb
    assert nodes["stage3_lp"]["gpu_hours"] == pytest.approx(BACKBONES * SEEDS * tb / 4000.0 / 3600)
    lowdata = sum(BACKBONES * SEEDS * _probe_images(b, f) for b in SIZES if b != "tb" for f in (1.0, 0.01))
    assert nodes["stage3_lowdata"]["images"] == lowdata
    assert nodes["stage3_lowdata"]["gpu_hours"] == pytest.approx(lowdata / 4000.0 / 3600)
    # MedMod's split sizes are not documented: said, not guessed.
    assert "medmod_phys: size unknown" in _row(table, "stage3_lowdata")
    assert "(30 of 150 points)" in _row(table, "stage3_lowdata") and not nodes["stage3_lowdata"]["complete"]
    # A missing rate key says which benchmark measures it.
    seg = _row(table, "stage3_seg")
    assert "no rate for seg: run scripts/benchmark_train.py --stage3" in seg and f"--rates {tmp_path}" in seg
    assert nodes["stage3_seg"]["gpu_hours"] is None and "cxlseg: size unknown" in seg
    # Script nodes carry no estimate; CPU ones need none.
    assert nodes["manifests"]["gpu_hours"] is None and nodes["manifests"]["complete"]
    assert "script on GPU: not estimated" in _row(table, "features")
    total = sum(n["gpu_hours"] or 0.0 for n in nodes.values())
    assert est["total_gpu_hours"] == pytest.approx(total) and not est["complete"]
    assert f"total: {format_hours(total)} GPU-hours (without what is missing for " in table


def test_authors_profile_rescales_stage1_by_analytic_flops(tmp_path, capsys):
    from pacx.models.mae import MAE_ARCHS
    from pacx.models.vit import vit_config
    from pacx.perf.train import mae_forward_flops

    table, est = _estimate(tmp_path, capsys, RATES, "--profile", "authors")
    vit, dec = MAE_ARCHS["mae_vit_base_patch16"]
    flops = {r: mae_forward_flops(vit_config(vit, 224), dec, r)["total"] for r in (0.9, 0.75)}
    rate = 5000.0 * flops[0.9] / flops[0.75]  # mask 0.75 keeps 49 patches, not 19: fewer images/s
    assert est["nodes"]["stage1"]["gpu_hours"] == pytest.approx(400 * 223_414 / rate / 3600)
    assert "rate scaled by analytic FLOPs (mask_ratio 0.9 -> 0.75)" in _row(table, "stage1")
    assert est["nodes"]["stage1"]["complete"]  # a rescaled rate is an estimate, not a gap


def test_rates_of_another_configuration_are_flagged(tmp_path, capsys):
    rates = {**RATES, "stage1": {**RATES["stage1"], "arch": "mae_vit_test", "img_size": 32},
             "stage2_lora": {"img_per_s": 2000.0, "arch": "vit_test", "img_size": 32}}
    table, est = _estimate(tmp_path, capsys, rates)
    assert "rate measured at another configuration (arch vit_test -> vit_base_patch16, img_size 32 -> " \
           "224), not rescaled" in _row(table, "stage2")
    assert (est["nodes"]["stage2"]["gpu_hours"] == 50 * 10_000 / 2000.0 / 3600
            and not est["nodes"]["stage2"]["complete"])
    assert "arch mae_vit_test -> mae_vit_base_patch16, img_size 32 -> 224), scaled by analytic FLOPs" in \
           _row(table, "stage1")
    assert not est["nodes"]["stage1"]["complete"]


def test_empty_rates_name_every_missing_key(tmp_path, capsys):
    table, est = _estimate(tmp_path, capsys, {})
    for node, key, script in (("stage1", "stage1", "benchmark_fit.py --device cuda --compile"),
                              ("stage2", "stage2_lora", "benchmark_train.py"),
                              ("stage3_lp", "probe_features", "benchmark_train.py"),
                              ("stage3_seg", "seg", "benchmark_train.py")):
        assert f"no rate for {key}: run scripts/{script}" in _row(table, node)
        assert est["nodes"][node]["gpu_hours"] is None
    assert "total: 0 GPU-hours" in table


def test_bad_rates_file_is_exit_code_2(tmp_path, caplog):
    path = tmp_path / "rates.json"
    path.write_text(json.dumps({"stage1": {"img_per_s": 0}}))
    assert main([str(PAPER), "--estimate", str(path)]) == 2
    assert "rate 'stage1' needs a positive number img_per_s" in caplog.text
    assert main([str(PAPER), "--estimate", str(tmp_path / "missing.json")]) == 2


def test_merge_rates_keeps_other_keys_and_replaces_its_own(tmp_path):
    path = tmp_path / "sub" / "rates.json"
    merge_rates(path, {"stage1": {"img_per_s": 100.0, "device": "cuda"}})
    merge_rates(path, {"stage2_lora": {"img_per_s": 50}, "stage2_full": {"img_per_s": 30}})
    merged = merge_rates(path, {"stage1": {"img_per_s": 120.0}})
    assert merged == read_rates(path) == {"stage1": {"img_per_s": 120.0}, "stage2_lora": {"img_per_s": 50},
                                          "stage2_full": {"img_per_s": 30}}
    with pytest.raises(ValueError, match="'seg' needs a positive number img_per_s"):
        merge_rates(path, {"seg": {"images_per_s": 3.0}})
    assert "seg" not in read_rates(path)  # nothing written
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_rates(path)


def test_point_settings_follow_the_command_line():
    plan = load_plan(PAPER)
    point = next(p for p in plan.nodes["stage3_lowdata"].points
                 if p.values == {"benchmark": "nih", "backbone": "imagenet", "fraction": "0.01", "seed": "3"})
    s = point_settings(point.argv)
    # the grid's argument over the config
    assert s["data.benchmark"] == "nih" and s["data.train_fraction"] == 0.01
    assert s["model.backbone.kind"] == "imagenet" and s["model.mode"] == "linear_probe"  # init_args lifted
    assert s["model.class_path"] == "pacx.lit.classify.ClassificationModule"
    # config, then the trainer fragment
    assert s["trainer.max_epochs"] == 40 and s["trainer.strategy"] == "ddp"
    assert s["seed_everything"] == 3


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_split_sizes_are_all_or_nothing(name):
    sizes = BENCHMARKS[name].split_sizes
    assert not sizes or (set(sizes) == set(SPLITS) and all(n > 0 for n in sizes.values()))
    if name in SIZES:
        assert tuple(sizes[s] for s in SPLITS) == SIZES[name]


def test_split_sizes_are_checked():
    spec = BENCHMARKS["tb"]
    fields = {f: getattr(spec, f) for f in spec.__dataclass_fields__}
    with pytest.raises(ValueError, match="split_sizes"):
        BenchmarkSpec(**{**fields, "split_sizes": {"training": 10}})


def test_point_settings_read_key_equals_value_and_appends(tmp_path, capsys):
    """``--key=value`` and jsonargparse's ``--key+=value`` (plans/demo.yaml's online probe callback) are one
    word each; the demo plan's estimate used to stop on them with a ValueError."""
    s = point_settings(["fit", "--config", str(REPO / "configs/stage3/linear_probe.yaml"),
                        "--data.train_fraction=0.01", "--trainer.callbacks+=a.B", "--trainer.callbacks+=c.D",
                        "--trainer.max_epochs", "3"])
    assert s["data.train_fraction"] == 0.01 and s["trainer.max_epochs"] == 3
    assert s["trainer.callbacks"] == ["a.B", "c.D"]
    path = tmp_path / "rates.json"
    path.write_text(json.dumps(RATES))
    assert main([str(REPO / "plans/demo.yaml"), "--estimate", str(path), "--out", str(tmp_path / "o")]) == 0
    assert _row(capsys.readouterr().out, "stage1").split()[1:3] == ["1", "-"]


def test_cpu_stage_node_is_noted_once_and_an_empty_grid_lacks_nothing(tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""\
out: {tmp_path / "o"}
trainer: configs/trainer/ddp.yaml
vars: {{none: []}}
anchors: {{configs: &configs [configs/stage3/linear_probe.yaml, configs/stage3/lp/tb.yaml]}}
slurm: {{defaults: {{gpus_per_node: 0}}}}
nodes:
  - {{name: probe, stage: Stage3_eval.py, config: *configs,
      grid: {{seed: [0, 1, 2]}}, seed: "{{seed}}"}}
  - {{name: empty, stage: Stage3_eval.py, config: *configs,
      grid: {{seed: "{{none}}"}}, seed: "{{seed}}"}}
""")
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps(RATES))
    out = tmp_path / "estimate.json"
    assert main([str(plan), "--estimate", str(rates), "--json", str(out)]) == 0
    table, nodes = capsys.readouterr().out, json.loads(out.read_text())["nodes"]
    assert nodes["probe"]["images"] == 3 * 1111 and nodes["probe"]["gpu_hours"] == 3 * 1111 / 4000.0 / 3600
    # the allocation's note is the node's: not "(1 of 3 points)"
    assert nodes["probe"]["notes"] == ["no GPU asked (resources.gpus_per_node 0): wall-hours not computed"]
    assert nodes["empty"]["points"] == 0 and nodes["empty"]["notes"] == [] and nodes["empty"]["complete"]
    assert table.splitlines()[-1] == f"total: {format_hours(3 * 1111 / 4000.0 / 3600)} GPU-hours " \
                                     "(without what is missing for probe)"
