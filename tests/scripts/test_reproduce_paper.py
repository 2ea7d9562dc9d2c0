"""scripts/reproduce_paper.py and pacx.reproduce without Slurm: plan validation, the paper plan's dry run
(every node, its dependencies, the Stage 3 grid's size), --local runs of script plans (order, run.json,
skipping finished work, failures stopping dependents), the Slurm driver against stand-in sbatch/squeue
commands, and the results CSV under concurrent writers."""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pacx.lit.common import append_results_row
from pacx.reproduce import main
from pacx.reproduce.drivers import array_ranges
from pacx.reproduce.execute import execute, stage_argv, write_specs
from pacx.reproduce.plan import PlanError, load_plan

REPO = Path(__file__).resolve().parents[2]
PAPER = REPO / "plans" / "paper.yaml"
DEMO = REPO / "plans" / "demo.yaml"

# The paper's Stage 3 grid, from docs/method.md / docs/datasets.md rather than from the plan: the nine
# benchmarks, the low-data tasks of docs/datasets.md#low-data among them (COVIDx is a low-data task but not
# one of the nine), backbones, seeds 0-4.
BENCHMARKS = {"chexchonet", "vindr", "medmod_phys", "cxlseg", "covidqu_seg", "tb", "chestx6", "nih", "qata"}
LOW_DATA = {"chexchonet", "nih", "vindr", "chestx6", "medmod_phys"}
SEGMENTATION = {"cxlseg", "covidqu_seg", "qata"}
BACKBONES = {"imagenet", "mae", "pacx"}
SEEDS = {0, 1, 2, 3, 4}


def write_plan(tmp_path: Path, body: str, name: str = "plan.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


# ---- validation -------------------------------------------------------------------------------------

BAD_PLANS = {
    "unknown top-level key": ("nodes: [{name: a, script: [-c, pass]}]\ncolour: red\n",
                              "unknown key(s) colour"),
    "unknown node key": ("nodes: [{name: a, script: [-c, pass], colour: red}]\n",
                         "nodes[0]: unknown key(s) colour"),
    "unknown after": ("nodes: [{name: a, script: [-c, pass], after: [b]}]\n",
                      "node 'a': `after` names unknown node(s) b"),
    "cycle": ("nodes:\n  - {name: a, script: [-c, pass], after: [c]}\n  - {name: b, script: [-c, pass], "
              "after: [a]}\n  - {name: c, script: [-c, pass], after: "
              "[b]}\n", "dependency cycle a -> b -> c -> a"),
    "self dependency": ("nodes: [{name: a, script: [-c, pass], after: [a]}]\n",
                        "node 'a': a node cannot run after"),
    "missing config": ("nodes: [{name: s1, stage: Stage1_MAE.py, config: configs/stage1/nope.yaml}]\n",
                       "node 's1': config file not found"),
    "missing stage script": ("nodes: [{name: s1, stage: Stage9.py, config: configs/demo/stage1_mae.yaml}]\n",
                             "node 's1': stage script not found"),
    "stage without config": ("nodes: [{name: s1, stage: Stage1_MAE.py}]\n",
                             "node 's1': a stage node needs config"),
    "stage and script": ("nodes: [{name: a, stage: Stage1_MAE.py, script: [-c, pass]}]\n",
                         "node 'a': give exactly one of stage, script"),
    "unknown field": ("nodes: [{name: a, script: [-c, pass, '{nope}']}]\n", "node 'a': unknown field {nope}"),
    "duplicate names": ("nodes: [{name: a, script: [-c, pass]}, {name: a, script: [-c, pass]}]\n",
                        "two nodes are named 'a'"),
    "bad resources": ("nodes: [{name: a, script: [-c, pass], resources: {gpus: 2}}]\n",
                      "node 'a' resources: unknown key(s) gpus"),
    "shared run dir": ("nodes: [{name: a, script: [-c, pass], grid: {n: [1, 2]}, run_dir: '{out}/x'}]\n",
                       "share the run directory"),
    "axis shadows a var": ("vars: {n: 1}\nnodes: [{name: a, script: [-c, pass], grid: {n: [1, 2]}}]\n",
                           "grid axis 'n' must be an identifier that is not a var"),
    "bad axis value": ("nodes: [{name: a, script: [-c, pass], grid: {n: [a/b]}}]\n",
                       "value 'a/b' may hold only"),
    "max_parallel true": ("nodes: [{name: a, script: [-c, pass], grid: {n: [1, 2]}, max_parallel: true}]\n",
                          "max_parallel must be a positive integer on a grid node, got True"),
    "missing trainer fragment": ("trainer: configs/trainer/nope.yaml\n"
                                 "nodes: [{name: s1, stage: Stage1_MAE.py, config: "
                                 "configs/demo/stage1_mae.yaml}]\n", "node 's1': trainer fragment not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLANS))
def test_invalid_plans_raise_naming_file_and_node(tmp_path, case):
    body, message = BAD_PLANS[case]
    path = write_plan(tmp_path, "out: " + str(tmp_path / "out") + "\n" + body,
                      f"bad_{case.replace(' ', '_')}.yaml")
    with pytest.raises(PlanError) as err:
        load_plan(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_main_reports_plan_errors_with_exit_code_2(tmp_path, caplog):
    path = write_plan(tmp_path, "nodes: [{name: a, script: [-c, pass], after: [zz]}]\n")
    assert main([str(path), "--dry-run", "--out", str(tmp_path / "out")]) == 2
    assert "unknown node(s) zz" in caplog.text


def test_vars_resolve_in_order_and_set_overrides(tmp_path):
    path = write_plan(tmp_path, """\
        vars: {root: /data/x, sub: "{root}/images", where: "{out}/w"}
        nodes: [{name: a, script: [-c, pass, "{sub}", "{where}", "{{literal}}", "{'k': 1}"]}]
    """)
    plan = load_plan(path, out=tmp_path / "o", overrides={"root": "/elsewhere"})
    argv = plan.nodes["a"].points[0].argv
    assert argv == ("-c", "pass", "/elsewhere/images", f"{tmp_path / 'o'}/w", "{literal}", "{'k': 1}")
    with pytest.raises(PlanError, match="--set names unknown var"):
        load_plan(path, out=tmp_path / "o", overrides={"rot": "/x"})


# ---- the paper plan ---------------------------------------------------------------------------------

# The paper's graph, written out here (not read from the plan): node -> the nodes it waits for.
PAPER_EDGES = {
    "manifests": set(), "stage1": set(), "export_mae": {"stage1"}, "labs_dae": set(),
    "features": {"labs_dae"}, "stage2": {"export_mae", "features"}, "export_pacx": {"stage2"},
    "stage3_lowdata": {"manifests", "export_mae", "export_pacx"},
    "stage3_lp": {"manifests", "export_mae", "export_pacx"},
    "stage3_seg": {"manifests", "export_mae", "export_pacx"},
    "alignment": {"export_mae", "export_pacx", "features"}, "zero_shot": {"stage2", "features"},
    "tables": {"stage3_lowdata", "stage3_lp", "stage3_seg"},
}


@pytest.mark.parametrize("path", [PAPER, DEMO])
def test_zero_shot_points_name_stage2_runs_only(tmp_path, path):
    """``eval_alignment.py --zero-shot`` refuses any backbone without Stage 2 heads (random init, a Stage 1
    export, ImageNet weights) before doing anything, so a plan point that mixes them would fail its job."""
    plan = load_plan(path, out=tmp_path / "o")
    checked = 0
    for node in plan.nodes.values():
        for point in node.points:
            if "--zero-shot" not in point.argv:
                continue
            backbones = [point.argv[i + 1] for i, a in enumerate(point.argv) if a == "--backbone"]
            assert backbones, node.name
            for spec in backbones:
                source = spec.split("=", 1)[1]
                assert "stage2" in source and not source.endswith(".safetensors"), (node.name, spec)
            checked += 1
    assert checked == 1


def parse_dry_run(text: str) -> dict[str, list[str]]:
    """``node=$(sbatch ...)`` lines -> {node: sbatch argv}."""
    jobs = {}
    for line in text.splitlines():
        m = re.fullmatch(r"(\w+)=\$\((sbatch .*)\)", line)
        if m:
            jobs[m.group(1)] = shlex.split(m.group(2))
    return jobs


def option(argv: list[str], name: str) -> str | None:
    return next((a.split("=", 1)[1] for a in argv if a.startswith(f"{name}=")), None)


def array_size(spec: str) -> int:
    return sum(int(b) - int(a) + 1 if "-" in part else 1
               for part in spec.split("%")[0].split(",") for a, _, b in [part.partition("-")])


def test_paper_dry_run_lists_every_node_with_dependencies_and_array_sizes(tmp_path, capsys):
    out = tmp_path / "paper_runs"
    assert main([str(PAPER), "--dry-run", "--out", str(out)]) == 0
    jobs = parse_dry_run(capsys.readouterr().out)
    assert set(jobs) == set(PAPER_EDGES)
    for node, argv in jobs.items():
        dep = option(argv, "--dependency")
        deps = set(re.findall(r"\$(\w+)", dep)) if dep else set()
        assert dep is None or dep.startswith("afterok:"), node
        assert deps == PAPER_EDGES[node], node
        assert argv[-2] == str(REPO / "scripts/slurm/node.sbatch")
        assert argv[-1] == str(out / ".plan/nodes" / f"{node}.json")
        assert option(argv, "--job-name") == f"paper-{node}"
    assert not out.exists()  # a dry run writes nothing

    expected_points = sum((2 if b in LOW_DATA else 1) * len(BACKBONES) * len(SEEDS) for b in BENCHMARKS)
    assert expected_points == 210
    arrays = {n: array_size(option(a, "--array")) for n, a in jobs.items() if n.startswith("stage3")}
    assert sum(arrays.values()) == expected_points
    assert arrays == {"stage3_lowdata": 5 * 3 * 2 * 5, "stage3_lp": 1 * 3 * 1 * 5, "stage3_seg": 3 * 3 * 5}
    assert option(jobs["manifests"], "--array") == "0-8"  # one converter run per benchmark
    assert int(option(jobs["stage1"], "--nodes")) > 1 and option(jobs["stage1"], "--gpus-per-node")


def test_paper_grid_covers_benchmarks_backbones_fractions_seeds(tmp_path):
    plan = load_plan(PAPER, out=tmp_path / "out")
    seen = set()
    for node in plan.nodes.values():
        if node.target != "Stage3_eval":
            continue
        for point in node.points:
            argv = list(point.argv)
            bench, kind = point.values["benchmark"], point.values["backbone"]
            fraction = (float(argv[argv.index("--data.train_fraction") + 1])
                        if "--data.train_fraction" in argv else 1.0)
            seed = int(argv[argv.index("--seed_everything") + 1])
            assert seed == int(point.values["seed"])
            assert argv[argv.index("--model.backbone.kind") + 1] == kind
            configs = [Path(argv[i + 1]) for i, a in enumerate(argv) if a == "--config"]
            base, folder = ("segmentation", "seg") if bench in SEGMENTATION else ("linear_probe", "lp")
            assert configs == [REPO / "configs/stage3" / f"{base}.yaml",
                               REPO / "configs/stage3" / folder / f"{bench}.yaml"]
            assert argv[argv.index("--trainer.default_root_dir") + 1] == point.run_dir
            seen.add((bench, kind, fraction, seed))
    expected = {(b, k, f, s) for b in BENCHMARKS for k in BACKBONES for s in SEEDS
                for f in ((1.0, 0.01) if b in LOW_DATA else (1.0,))}
    assert seen == expected


# The authors' effective settings (docs/method.md#profiles), written out here:
# node -> setting -> (paper, authors).
AUTHORS = {
    ("stage1", "model.mask_ratio"): (0.9, 0.75),
    ("stage1", "model.lr_interval"): ("step", "epoch"),
    ("stage2", "model.init_args.lr_interval"): ("step", "epoch"),
    ("stage2", "data.batch_size"): (128, 500),
    ("stage2", "model.init_args.norm_eps"): (1e-6, 1e-5),
    ("stage2", "model.init_args.trainable_norms"): ("all", "final"),
}


def _value(text: str):
    """A printed setting as a Python value ("1e-06" is a float here, as the configs mean it)."""
    value = yaml.safe_load(text)
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def test_profile_dry_runs_print_the_resolved_differences_side_by_side(tmp_path, capsys):
    tables = {}
    for profile in ("paper", "authors"):
        assert main([str(PAPER), "--dry-run", "--profile", profile,
                     "--out", str(tmp_path / "{profile}")]) == 0
        lines = [ln[2:].split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("# stage")]
        tables[profile] = {(node, key): (_value(a), _value(b)) for node, key, a, b in lines}
    assert tables["paper"] == tables["authors"] == AUTHORS


def test_demo_dry_run_lists_nodes_whose_point_count_differs_between_profiles(tmp_path, capsys):
    # the smoke profile has no segmentation task, so its seg nodes have no points
    assert main([str(DEMO), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    rows = {tuple(ln[2:].split()[:2]): ln[2:].split()[2:]
            for ln in capsys.readouterr().out.splitlines() if ln.startswith("# seg")}
    assert rows[("seg", "(points)")] == ["4", "4", "0"]          # full, quick, smoke
    assert rows[("seg_pacx", "(points)")] == ["3", "2", "0"]


def _resolved(module, argv: tuple[str, ...], out: Path) -> dict:
    """The Stage CLI's own resolved config (``--print_config``), flattened, with the run's out dir masked."""
    import contextlib
    import io

    from pacx.reproduce.profiles import flatten

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        module.main([*argv, "--print_config"])
    return {k: str(v).replace(str(out), "<out>") for k, v in flatten(yaml.safe_load(buf.getvalue())).items()}


def test_authors_profile_differs_from_paper_exactly_in_the_listed_settings(tmp_path):
    """Resolved by the Stage CLIs themselves: Stage 1 and Stage 2 differ in exactly the AUTHORS settings;
    every other node runs the same command (up to the profile's output directory)."""
    import Stage1_MAE
    import Stage2_PACX

    plans = {p: load_plan(PAPER, out=tmp_path / "{profile}", profile=p) for p in ("paper", "authors")}
    assert {p: plan.out for p, plan in plans.items()} == {"paper": tmp_path / "paper",
                                                          "authors": tmp_path / "authors"}
    found = {}
    for node, module in (("stage1", Stage1_MAE), ("stage2", Stage2_PACX)):
        paper, authors = (_resolved(module, plans[p].nodes[node].points[0].argv, plans[p].out) for p in plans)
        for key in set(paper) | set(authors):
            if paper.get(key) != authors.get(key):
                found[(node, key)] = (_value(paper[key]), _value(authors[key]))
    assert found == AUTHORS
    overrides = yaml.safe_load(PAPER.read_text())["profiles"]["authors"]
    assert set(overrides) == {"stage1", "stage2"}
    for name, node in plans["paper"].nodes.items():
        for a, b in zip(node.points, plans["authors"].nodes[name].points):
            other = list(b.argv)
            for file in overrides.get(name, []):  # the same command plus the profile's override configs
                i = other.index(str(REPO / file))
                assert other[i - 1] == "--config"
                del other[i - 1:i + 1]
            assert [x.replace(str(tmp_path / "paper"), "<out>") for x in a.argv] == \
                [x.replace(str(tmp_path / "authors"), "<out>") for x in other], name


def test_profiles_keep_their_own_output_directory(tmp_path, caplog):
    out = tmp_path / "shared"
    local = write_plan(tmp_path, f"""\
        python: {sys.executable}
        profiles: {{one: {{}}, two: {{}}}}
        nodes: [{{name: a, script: [-c, "{LOG}", "{{out}}/order.txt", "{{profile}}"]}}]
    """)
    assert main([str(local), "--local", "--out", str(out), "--profile", "one"]) == 0
    assert read_lines(out / "order.txt") == ["one"] and (out / ".plan/profile").read_text() == "one\n"
    assert main([str(local), "--local", "--out", str(out), "--profile", "two"]) == 2
    assert "holds the runs of profile 'one', not 'two'" in caplog.text
    assert main([str(local), "--local", "--out", str(tmp_path / "{profile}"), "--profile", "two"]) == 0
    assert read_lines(tmp_path / "two" / "order.txt") == ["two"]
    with pytest.raises(PlanError, match="unknown profile 'three'; the plan's profiles: one, two"):
        load_plan(local, out=out, profile="three")
    plain = write_plan(tmp_path, "nodes: [{name: a, script: [-c, pass]}]\n", "plain.yaml")
    with pytest.raises(PlanError, match="--profile one given, but the plan declares no profiles"):
        load_plan(plain, out=out, profile="one")
    bad = write_plan(tmp_path, "profiles: {x: {a: [configs/stage1/mae_vitb_chexpert_ratio075.yaml]}}\n"
                               "nodes: [{name: a, script: [-c, pass]}]\n", "bad.yaml")
    with pytest.raises(PlanError, match="profile 'x' names 'a', which is not a stage node"):
        load_plan(bad, out=out)


def test_paper_plan_builds_medmod_without_symiles_training_admissions(tmp_path, capsys):
    """The dry run shows the MedMod converter with --exclude-hadm pointing at the Symile train ids."""
    assert main([str(PAPER), "--local", "--dry-run", "--out", str(tmp_path / "out")]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "[benchmark=medmod_phys]" in ln)
    assert "--exclude-hadm /data/symile-mimic/data_npy/train/hadm_id_train.npy" in line


def test_demo_plan_stage_argv_layout(tmp_path):
    plan = load_plan(DEMO, out=tmp_path / "demo")
    assert plan.profile == "full" and plan.profiles == ("full", "quick", "smoke")
    stage1 = plan.nodes["stage1"].points[0]
    assert stage1.argv[:7] == ("fit", "--config", str(REPO / "configs/demo/stage1_mae.yaml"),
                               "--trainer.default_root_dir", str(tmp_path / "demo/stage1_mae"),
                               "--seed_everything", "0")
    assert plan.nodes["stage2"].resources.tasks_per_node == 2
    assert [p.run_dir for p in plan.nodes["stage2"].points] == [str(tmp_path / f"demo/stage2_pacx_s{s}")
                                                                for s in range(3)]
    stage3 = plan.nodes["stage3"]  # 2 tasks x 2 fractions x random | MAE x 2 probe seeds
    assert len(stage3.points) == 2 * 2 * 2 * 2 and stage3.axes == ("task", "fraction", "backbone", "seed")
    point = stage3.points[-1]
    assert point.name == "task=tb_fraction=0.01_backbone=mae_seed=1"
    assert point.run_dir == str(tmp_path / "demo/stage3/tb/mae_f0.01_s1")
    assert point.argv[-4:] == ("--model.backbone.kind", "mae", "--model.backbone.weights",
                               str(tmp_path / "demo/exports/mae_encoder.safetensors"))
    pacx = plan.nodes["stage3_pacx"].points[-1]  # one probe seed per Stage 2 seed
    assert pacx.run_dir == str(tmp_path / "demo/stage3/tb/pacx_u2_f0.01_s0")
    assert pacx.argv[-1] == str(tmp_path / "demo/exports/pacx_encoder_s2.safetensors")
    backbones = plan.nodes["alignment"].points[0].argv
    assert [a for a in backbones if a.startswith("pacx_u")] == [
        f"pacx_u{s}={tmp_path}/demo/exports/pacx_encoder_s{s}.safetensors" for s in range(3)]
    assert list(plan.nodes).index("stage2") > list(plan.nodes).index("features")
    smoke = load_plan(DEMO, out=tmp_path / "smoke", profile="smoke")
    assert smoke.nodes["seg"].points == () and len(smoke.nodes["stage3"].points) == 4
    assert smoke.nodes["stage2"].points[0].argv[3:5] == ("--config",
                                                         str(REPO / "configs/demo/smoke/stage2.yaml"))


LIST_PLAN = """\
    vars:
      root: /d
      seeds: [0, 1]
      names: [a, b]
      empty: []
    profiles:
      base: {}
      more: {vars: {seeds: [0, 1, 2]}}
      one: {vars: {seeds: 7}}
    anchors:
      shared: &shared [--root, "{root}"]
    nodes:
      - name: g
        script: [-c, pass, *shared, {for: n, in: "{names}", args: [--name, "{n}-{seed}"]}]
        grid: {seed: "{seeds}"}
      - name: none
        script: [-c, pass]
        grid: {x: "{empty}"}
"""


def test_list_vars_for_groups_splices_and_profile_vars(tmp_path):
    path = write_plan(tmp_path, LIST_PLAN)
    plan = load_plan(path, out=tmp_path / "o")
    assert [p.argv for p in plan.nodes["g"].points] == [
        ("-c", "pass", "--root", "/d", "--name", f"a-{s}", "--name", f"b-{s}") for s in ("0", "1")]
    assert plan.nodes["none"].points == ()  # an empty list var: a node without points
    assert [p.name for p in load_plan(path, out=tmp_path / "o2", profile="more").nodes["g"].points] == [
        "seed=0", "seed=1", "seed=2"]
    over = load_plan(path, out=tmp_path / "o3", profile="more", overrides={"seeds": "5,6"})  # --set wins
    assert [p.name for p in over.nodes["g"].points] == ["seed=5", "seed=6"]
    # a number for a list var is a list of one (it used to become a text var and fail as a grid axis)
    one = load_plan(path, out=tmp_path / "o4", profile="one")
    assert [p.name for p in one.nodes["g"].points] == ["seed=7"]


LIST_ERRORS = {
    "a list var inside a string": ("vars: {s: [1]}\nnodes: [{name: a, script: [-c, 'x{s}']}]\n",
                                   "{s} is a list var"),
    "a for group without a list": ("vars: {s: 1}\nnodes: [{name: a, script: [-c, {for: n, in: "
                                   "'{s}', args: []}]}]\n", "`for: n` needs `in:"),
    "a for group with other keys": ("nodes: [{name: a, script: [-c, {for: n, over: x}]}]\n",
                                    "takes exactly the keys for, in, args"),
    "a profile setting an unknown var": ("profiles: {p: {vars: {nope: 1}}}\nnodes: [{name: a, "
                                         "script: [-c, pass]}]\n", "profile 'p' sets unknown var(s) nope"),
}


@pytest.mark.parametrize("case", sorted(LIST_ERRORS))
def test_list_var_and_group_errors_name_the_plan(tmp_path, case):
    body, message = LIST_ERRORS[case]
    path = write_plan(tmp_path, "out: " + str(tmp_path / "out") + "\n" + body)
    with pytest.raises(PlanError) as err:
        load_plan(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_stage_argv_resumes_from_last_ckpt_except_on_requeue(tmp_path, monkeypatch):
    point = {"argv": ["fit", "--config", "c.yaml"], "run_dir": str(tmp_path / "run")}
    monkeypatch.setattr("pacx.reproduce.execute.progress_enabled", lambda: True)  # bars: the config decides
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert stage_argv(point) == ["fit", "--config", "c.yaml"]
    (tmp_path / "run/checkpoints").mkdir(parents=True)
    (tmp_path / "run/checkpoints/last.ckpt").write_bytes(b"")
    assert stage_argv(point) == ["fit", "--config", "c.yaml", "--ckpt_path", "last"]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert stage_argv(point)[-2:] == ["--ckpt_path", "last"]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # requeued: the Stage CLI resumes by itself
    assert stage_argv(point) == ["fit", "--config", "c.yaml"]
    monkeypatch.setattr("pacx.reproduce.execute.progress_enabled", lambda: False)  # no terminal: no bars
    assert stage_argv(point) == ["fit", "--config", "c.yaml", "--trainer.enable_progress_bar", "false"]


FAKE_STAGE = """
import json, pathlib
def main(argv):
    run_dir = pathlib.Path(argv[argv.index("--trainer.default_root_dir") + 1])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "argv.json").write_text(json.dumps(argv))
    (run_dir / "run.json").write_text(json.dumps({"status": argv[argv.index("--status") + 1]}))
"""


@pytest.mark.parametrize("status, code", [("completed", 0), ("interrupted", 1)])
def test_exec_calls_the_stage_main_in_process_and_checks_run_json(tmp_path, monkeypatch, status, code):
    (tmp_path / "FakeStage.py").write_text(FAKE_STAGE)
    monkeypatch.setattr("pacx.reproduce.execute.progress_enabled", lambda: True)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delitem(sys.modules, "FakeStage", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))  # exec puts the spec's repo on it
    run_dir = tmp_path / "runs" / "s"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")  # an earlier, interrupted try
    argv = ["fit", "--trainer.default_root_dir", str(run_dir), "--status", status]
    spec = {"node": "s", "kind": "stage", "stage": "FakeStage", "repo": str(tmp_path),
            "python": sys.executable,
            "points": [{"index": 0, "name": "", "run_dir": str(run_dir), "argv": argv, "stdout": None,
                        "values": {}}]}
    (tmp_path / "s.json").write_text(json.dumps(spec))
    assert execute(tmp_path / "s.json") == code
    assert json.loads((run_dir / "argv.json").read_text()) == [*argv, "--ckpt_path", "last"]
    with pytest.raises(SystemExit, match="out of range"):
        execute(tmp_path / "s.json", index=1)


def test_array_ranges():
    assert array_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert array_ranges([3]) == "3" and array_ranges(list(range(150))) == "0-149"


# ---- --local ----------------------------------------------------------------------------------------

# Each node appends "<node> <point>" to order.txt; the grid appends its mapping-axis argument too.
LOG = "import sys; open(sys.argv[1], 'a').write(' '.join(sys.argv[2:]) + chr(10))"
LOCAL_PLAN = f"""\
name: tiny
python: {sys.executable}
nodes:
  - {{name: a, script: [-c, "{LOG}", "{{out}}/order.txt", "{{node}}"]}}
  - {{name: b, after: [a], script: [-c, "{LOG}", "{{out}}/order.txt", "{{node}}"]}}
  - {{name: c, after: [a], script: [-c, "{LOG}", "{{out}}/order.txt", "{{node}}"]}}
  - name: g
    after: [c]
    script: [-c, "{LOG}", "{{out}}/order.txt", "{{node}}", "{{point}}"]
    grid:
      n: [1, 2]
      w: {{x: [--flag, x], y: [--flag, y]}}
  - {{name: d, after: [b, g], script: [-c, "{LOG}", "{{out}}/order.txt", "{{node}}"],
      stdout: "{{out}}/d.txt"}}
"""


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


LOCAL_MODES = {"subprocess": ["--local"], "in process": ["--local", "--in-process"]}


@pytest.mark.parametrize("mode", sorted(LOCAL_MODES))
def test_local_runs_in_topological_order_and_skips_finished(tmp_path, mode):
    out = tmp_path / "out"
    plan_path = write_plan(tmp_path, LOCAL_PLAN)
    local = LOCAL_MODES[mode]
    assert main([str(plan_path), *local, "--out", str(out), "--json", str(tmp_path / "s.json")]) == 0
    lines = read_lines(out / "order.txt")
    grid = [f"g n={n}_w={w} --flag {w}" for n, w in itertools.product("12", "xy")]
    assert lines == ["a", "b", "c", *grid, "d"]  # plan order among ready nodes, grid in product order
    plan = load_plan(plan_path, out=out)
    for node in plan.nodes.values():
        for point in node.points:
            record = json.loads((Path(point.run_dir) / "run.json").read_text())
            assert record["status"] == "completed" and record["returncode"] == 0, point.run_dir
    assert (out / "runs/g/n=2_w=y/run.json").is_file()
    assert (out / "d.txt").read_text() == ""  # d's stdout went to the file (it printed nothing)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert {n: s["status"] for n, s in summary["nodes"].items()} == dict.fromkeys("abcgd", "completed")
    assert json.loads((out / ".plan/nodes/g.json").read_text())["points"][3]["name"] == "n=2_w=y"

    assert main([str(plan_path), *local, "--out", str(out), "--json", str(tmp_path / "s.json")]) == 0
    assert read_lines(out / "order.txt") == lines  # nothing ran again
    summary = json.loads((tmp_path / "s.json").read_text())
    assert {n: s["status"] for n, s in summary["nodes"].items()} == dict.fromkeys("abcgd", "done")

    (out / "runs/g/n=1_w=y/run.json").unlink()  # one grid point unfinished: it runs, then the script d that
    assert main([str(plan_path), *local, "--out", str(out)]) == 0  # reads g (not a, b, c, g's other points)
    lines += ["g n=1_w=y --flag y", "d"]
    assert read_lines(out / "order.txt") == lines

    # the plan grows a grid value: its two new points run, and d again; nothing else
    write_plan(tmp_path, LOCAL_PLAN.replace("n: [1, 2]", "n: [0, 1, 2]"))
    assert main([str(plan_path), *local, "--out", str(out)]) == 0
    lines += ["g n=0_w=x --flag x", "g n=0_w=y --flag y", "d"]
    assert read_lines(out / "order.txt") == lines

    # an upstream point that finished after d started (run again by hand, say) makes d stale
    record = out / "runs/g/n=2_w=x/run.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "updated": "2999-01-01T00:00:00"}))
    assert main([str(plan_path), *local, "--out", str(out)]) == 0
    assert read_lines(out / "order.txt") == [*lines, "d"]


@pytest.mark.parametrize("mode", sorted(LOCAL_MODES))
def test_local_failure_stops_dependents_only(tmp_path, mode):
    out = tmp_path / "out"
    plan_path = write_plan(tmp_path, f"""\
        python: {sys.executable}
        nodes:
          - {{name: bad, script: [-c, "raise SystemExit(3)"]}}
          - {{name: child, after: [bad], script: [-c, "{LOG}", "{{out}}/order.txt", "{{node}}"]}}
          - {{name: grandchild, after: [child], script: [-c, "{LOG}", "{{out}}/order.txt", "{{node}}"]}}
          - {{name: other, script: [-c, "{LOG}", "{{out}}/order.txt", "{{node}}"],
              stdout: "{{out}}/other.txt"}}
          - {{name: failing_out, script: [-c, "print('partial'); raise SystemExit(1)"],
              stdout: "{{out}}/f.txt"}}
    """)
    assert main([str(plan_path), *LOCAL_MODES[mode], "--out", str(out),
                 "--json", str(tmp_path / "s.json")]) == 1
    assert read_lines(out / "order.txt") == ["other"]
    assert json.loads((out / "runs/bad/run.json").read_text())["status"] == "failed: exit code 3"
    assert not (out / "runs/child/run.json").exists() and not (out / "runs/grandchild").exists()
    assert not (out / "f.txt").exists()  # a failed script's stdout file is not left behind
    nodes = json.loads((tmp_path / "s.json").read_text())["nodes"]
    assert {n: s["status"] for n, s in nodes.items()} == {
        "bad": "failed", "child": "blocked", "grandchild": "blocked", "other": "completed",
        "failing_out": "failed"}


@pytest.mark.parametrize("mode", sorted(LOCAL_MODES))
def test_a_two_rank_stage_outside_slurm_restarts_the_stage_not_the_driver(tmp_path, mode, chexpert_release):
    """``trainer.devices 2`` without Slurm: Lightning starts rank 1 by re-running this process's command
    line. That must be the Stage script's command, which run.json records too. Before pacx.cli.as_script, an
    in-process Stage re-ran the driver, so its rank 1 also ran the plan's later nodes (here ``later``, twice),
    and a rank-1 copy of the executor logged that the run was unfinished."""
    out = tmp_path / "out"
    plan_path = write_plan(tmp_path, f"""\
        python: {sys.executable}
        nodes:
          - {{name: first, script: [-c, "{LOG}", "{{out}}/order.txt", "{{node}}"]}}
          - name: stage1
            after: [first]
            stage: Stage1_MAE.py
            config: [configs/demo/stage1_mae.yaml, configs/demo/smoke/stage1.yaml]
            run_dir: "{{out}}/stage1"
            args: [--data.root, "{chexpert_release}", --wandb, disabled, --trainer.devices, "2",
                   --trainer.strategy, ddp, --trainer.max_epochs, "1", --trainer.limit_val_batches, "1"]
          - {{name: later, script: [-c, "{LOG}", "{{out}}/order.txt", "{{node}}"]}}
    """)
    # a child process: this test's own process stays out of the gloo process group
    done = subprocess.run([sys.executable, "scripts/reproduce_paper.py", str(plan_path), *LOCAL_MODES[mode],
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert read_lines(out / "order.txt") == ["first", "later"]  # each node ran once
    record = json.loads((out / "stage1" / "run.json").read_text())
    assert record["status"] == "completed" and record["world_size"] == 2
    assert record["command"][:3] == [str(REPO / "Stage1_MAE.py"), "fit", "--config"]
    assert " ERROR " not in done.stdout + done.stderr
    assert "LightningCLI's args parameter" not in done.stderr


# each point records its process, its torch threads and when it ran; point 3 of the grid fails
WHO = ("import os, sys, time, torch; t0 = time.time(); time.sleep(1.5); "
       "open(sys.argv[1] + '/' + sys.argv[2], 'w').write(' '.join(map(str, [os.getpid(), "
       "torch.get_num_threads(), t0, time.time()]))); sys.exit(3 if sys.argv[2] == '3' else 0)")


@pytest.mark.parametrize("mode", sorted(LOCAL_MODES))
def test_local_jobs_run_parallel_nodes_side_by_side(tmp_path, mode, monkeypatch):
    """``--jobs 2``: the points of a ``local_parallel`` node run two at a time in other processes with
    cores // 2 torch threads each (in process: two workers started once for the plan); a failing point
    fails only itself; a node without the flag still runs in order in this process; a node with
    ``local_parallel: 3`` runs its three points at once with cores // 3 threads each (its own workers)."""
    from pacx.reproduce import drivers

    monkeypatch.setattr(drivers, "cores", lambda: 4)
    out = tmp_path / "out"
    plan_path = write_plan(tmp_path, f"""\
        python: {sys.executable}
        nodes:
          - {{name: mk, script: [-c, "import os, sys; os.makedirs(sys.argv[1])", "{{out}}/who"]}}
          - {{name: par, after: [mk], local_parallel: true, grid: {{n: [1, 2, 3, 4, 5]}},
              script: [-c, "{WHO}", "{{out}}/who", "{{n}}"]}}
          - {{name: again, after: [mk], local_parallel: true, grid: {{n: [6, 7]}},
              script: [-c, "{WHO}", "{{out}}/who", "{{n}}"]}}
          - {{name: seq, after: [mk], grid: {{n: [8, 9]}}, script: [-c, "{WHO}", "{{out}}/who", "{{n}}"]}}
          - {{name: three, after: [mk], local_parallel: 3, grid: {{n: [10, 11, 12]}},
              script: [-c, "{WHO}", "{{out}}/who", "{{n}}"]}}
    """)
    assert main([str(plan_path), *LOCAL_MODES[mode], "--jobs", "2", "--out", str(out),
                 "--json", str(tmp_path / "s.json")]) == 1
    who = {int(f.name): f.read_text().split() for f in (out / "who").iterdir()}
    assert sorted(who) == list(range(1, 13))
    pids = {n: int(w[0]) for n, w in who.items()}
    threads = {n: int(w[1]) for n, w in who.items()}
    spans = {n: (float(w[2]), float(w[3])) for n, w in who.items()}
    parallel = range(1, 8)
    assert {threads[n] for n in parallel} == {2}
    assert os.getpid() not in {pids[n] for n in parallel}
    if mode == "in process":  # two workers, started once and shared by both nodes; seq ran here
        assert len({pids[n] for n in parallel}) == 2 and {pids[8], pids[9]} == {os.getpid()}
    else:  # a subprocess per point
        assert len({pids[n] for n in parallel}) == 7 and pids[8] != pids[9]
    assert spans[1][0] < spans[2][1] and spans[2][0] < spans[1][1]  # 1 and 2 overlapped
    assert spans[8][1] <= spans[9][0]  # the node without the flag ran one point after the other
    three = (10, 11, 12)
    assert {threads[n] for n in three} == {1} and len({pids[n] for n in three}) == 3
    assert not {pids[n] for n in three} & ({pids[n] for n in parallel} | {os.getpid()})
    assert max(spans[n][0] for n in three) < min(spans[n][1] for n in three)  # all three overlapped
    nodes = json.loads((tmp_path / "s.json").read_text())["nodes"]
    assert nodes["par"]["status"] == "failed" and nodes["par"]["failed"] == [2]  # n=3 is index 2
    assert nodes["again"]["status"] == nodes["seq"]["status"] == nodes["three"]["status"] == "completed"
    assert json.loads((out / "runs/par/n=3/run.json").read_text())["status"] == "failed: exit code 3"


def test_local_parallel_is_a_grid_flag(tmp_path):
    for bad in ("local_parallel: yes-please, grid: {n: [1, 2]}", "local_parallel: true",
                "local_parallel: 1, grid: {n: [1, 2]}", "local_parallel: 2.5, grid: {n: [1, 2]}",
                "local_parallel: 3"):
        path = write_plan(tmp_path, f"nodes: [{{name: a, script: [-c, pass], {bad}}}]\n")
        with pytest.raises(PlanError, match=r"local_parallel must be true, false or a number of points at "
                                            r"once \(>= 2\), and set only on a grid node"):
            load_plan(path, out=tmp_path / "out")
    with pytest.raises(SystemExit):
        main([str(path), "--jobs", "2"])  # --jobs goes with --local


def test_local_width_follows_jobs_and_the_nodes_own_number(tmp_path):
    """How many points run at once: one point at a time with --jobs 1 whatever the flag; --jobs N for
    ``local_parallel: true``; the node's own k for ``local_parallel: k`` under any --jobs above 1."""
    path = write_plan(tmp_path, """\
        nodes:
          - {name: flag, local_parallel: true, grid: {n: [1, 2, 3]}, script: [-c, pass]}
          - {name: own, local_parallel: 3, grid: {n: [1, 2, 3]}, script: [-c, pass]}
          - {name: plain, grid: {n: [1, 2, 3]}, script: [-c, pass]}
    """)
    nodes = load_plan(path, out=tmp_path / "out").nodes
    widths = {name: [nodes[name].local_width(jobs) for jobs in (1, 2, 4)] for name in nodes}
    assert widths == {"flag": [1, 2, 4], "own": [1, 3, 3], "plain": [1, 1, 1]}


def test_script_node_records_sigterm_and_ignores_usr1(tmp_path):
    out = tmp_path / "out"
    code = "import pathlib, sys, time; pathlib.Path(sys.argv[1]).write_text('up'); time.sleep(60)"
    plan = load_plan(write_plan(tmp_path, f"""\
        python: {sys.executable}
        nodes: [{{name: slow, script: [-c, "{code}", "{{out}}/up"]}}]
    """), out=out)
    write_specs(plan)
    proc = subprocess.Popen([sys.executable, "-m", "pacx.reproduce", "exec", str(plan.spec_path("slow"))],
                            cwd=REPO)
    deadline = time.monotonic() + 60
    while not (out / "up").is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert json.loads((out / "runs/slow/run.json").read_text())["status"] == "running"
    os.kill(proc.pid, signal.SIGUSR1)  # the Stage CLIs' requeue warning: a script keeps running
    time.sleep(1.0)
    assert proc.poll() is None
    os.kill(proc.pid, signal.SIGTERM)  # the time limit: the script is stopped and the failure recorded
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert json.loads((out / "runs/slow/run.json").read_text())["status"] == "failed: killed by SIGTERM"


def test_local_dry_run_prints_exec_lines_only(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(write_plan(tmp_path, LOCAL_PLAN)), "--local", "--dry-run", "--out", str(out)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")]
    assert len(lines) == 1 + 1 + 1 + 4 + 1
    assert lines[3].endswith(f"{out}/.plan/nodes/g.json --index 0") and "-m pacx.reproduce exec" in lines[3]
    assert not out.exists()


# ---- the Slurm driver against stand-in sbatch / squeue ------------------------------------------------

FAKE_SBATCH = """#!/usr/bin/env bash
for spec in "$@"; do :; done
if [[ -n "${FAKE_FAIL:-}" && "$spec" == */"$FAKE_FAIL".json ]]; then
  echo "sbatch: error: Invalid account" >&2; exit 1
fi
n=$(( $(cat "$FAKE_DIR/n" 2>/dev/null || echo 100) + 1 )); echo $n > "$FAKE_DIR/n"
printf '%s\\n' "$n $*" >> "$FAKE_DIR/calls"; echo "$n;cluster"
"""
FAKE_SQUEUE = """#!/usr/bin/env bash
grep -qx -- "$3" "$FAKE_DIR/active" 2>/dev/null && echo RUNNING; exit 0
"""


@pytest.fixture()
def fake_slurm(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    return tmp_path


def calls(fake: Path) -> dict[str, list[str]]:
    """{node: sbatch argv} of the stand-in's calls, with the job id it returned first."""
    out = {}
    for line in read_lines(fake / "calls"):
        job, *argv = shlex.split(line)
        out[Path(argv[-1]).stem] = [job, *argv]
    return out


def test_slurm_driver_submits_unfinished_nodes_with_afterok(tmp_path, fake_slurm):
    out = tmp_path / "out"
    plan_path = write_plan(tmp_path,
                           LOCAL_PLAN.replace("name: tiny",
                                              "name: tiny\nslurm: {sbatch_args: [--partition=p]}"))
    plan = load_plan(plan_path, out=out)
    finished = [plan.nodes["a"].points[0], plan.nodes["g"].points[0], plan.nodes["g"].points[2]]
    for point in finished:  # a and two grid points completed earlier
        (Path(point.run_dir)).mkdir(parents=True)
        (Path(point.run_dir) / "run.json").write_text('{"status": "completed"}')
    assert main([str(plan_path), "--out", str(out), "--json", str(tmp_path / "s.json")]) == 0
    sub = calls(fake_slurm)
    assert list(sub) == ["b", "c", "g", "d"]  # a is finished
    ids = {n: argv[0] for n, argv in sub.items()}
    assert option(sub["b"], "--dependency") is None and option(sub["c"], "--dependency") is None
    assert option(sub["g"], "--dependency") == f"afterok:{ids['c']}"
    assert option(sub["d"], "--dependency") == f"afterok:{ids['b']}:{ids['g']}"
    assert option(sub["g"], "--array") == "0-3"  # c runs, so all of script g runs after it, finished or not
    assert option(sub["g"], "--output") == f"{out}/logs/%x-%A_%a.out" and (out / "logs").is_dir()
    assert option(sub["d"], "--output") == f"{out}/logs/%x-%j.out"
    assert ("--partition=p" in sub["d"] and "--parsable" in sub["d"]
            and "--kill-on-invalid-dep=yes" in sub["d"])
    assert option(sub["b"], "--ntasks-per-node") == "1" and option(sub["b"], "--gpus-per-node") is None
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["job_ids"] == [ids[n] for n in "bcgd"]
    assert json.loads((out / ".plan/jobs.json").read_text())["g"][-1]["indices"] == [0, 1, 2, 3]
    spec = json.loads((out / ".plan/nodes/g.json").read_text())
    assert spec["kind"] == "script" and len(spec["points"]) == 4 and spec["python"] == sys.executable

    # Re-run while g's job is still running and c has completed: g is not submitted again, d waits on it.
    (fake_slurm / "active").write_text(ids["g"] + "\n")
    point = plan.nodes["c"].points[0]
    Path(point.run_dir).mkdir(parents=True)
    (Path(point.run_dir) / "run.json").write_text('{"status": "completed"}')
    (fake_slurm / "calls").unlink()
    assert main([str(plan_path), "--out", str(out), "--json", str(tmp_path / "s.json")]) == 0
    again = calls(fake_slurm)
    assert list(again) == ["b", "d"]
    assert option(again["d"], "--dependency") == f"afterok:{again['b'][0]}:{ids['g']}"
    nodes = json.loads((tmp_path / "s.json").read_text())["nodes"]
    assert (nodes["g"]["status"] == "queued" and nodes["g"]["job_id"] == ids["g"]
            and nodes["c"]["status"] == "done")


def test_slurm_rerun_after_a_plan_edit_submits_only_the_points_queued_jobs_miss(tmp_path, fake_slurm, caplog):
    """g's job (points n=1, n=2) is queued when the plan grows a grid value n=0 that comes first: the re-run
    submits one job for n=0's two points only (not the queued ones again, renumbered), d waits on both g
    jobs, and the queued job still reads the spec it was submitted with."""
    out = tmp_path / "out"
    plan_path = write_plan(tmp_path, LOCAL_PLAN)
    assert main([str(plan_path), "--out", str(out)]) == 0
    first = calls(fake_slurm)
    queued_spec = Path(first["g"][-1])
    submitted = json.loads(queued_spec.read_text())
    assert [p["name"] for p in submitted["points"]] == ["n=1_w=x", "n=1_w=y", "n=2_w=x", "n=2_w=y"]
    (fake_slurm / "active").write_text("\n".join(first[n][0] for n in "abcgd") + "\n")
    (fake_slurm / "calls").unlink()
    write_plan(tmp_path, LOCAL_PLAN.replace("n: [1, 2]", "n: [0, 1, 2]"))
    caplog.set_level(logging.INFO, logger="pacx.reproduce.drivers")
    assert main([str(plan_path), "--out", str(out), "--json", str(tmp_path / "s.json")]) == 0
    again = calls(fake_slurm)
    assert list(again) == ["g"]  # a, b, c, d: queued as they were
    assert option(again["g"], "--array") == "0-1"  # n=0_w=x, n=0_w=y: indices 0 and 1 of the new grid
    assert option(again["g"], "--dependency") == f"afterok:{first['c'][0]}"
    assert json.loads(queued_spec.read_text()) == submitted  # the queued job's points did not move
    new_spec = json.loads(Path(again["g"][-1]).read_text())
    assert [p["name"] for p in new_spec["points"]][:2] == ["n=0_w=x", "n=0_w=y"]
    jobs = json.loads((out / ".plan/jobs.json").read_text())
    assert [j["job_id"] for j in jobs["g"]] == [first["g"][0], again["g"][0]]
    assert f"job(s) {first['g'][0]} run the others" in caplog.text
    assert f"d: its queued job(s) {first['d'][0]} do not wait for the new job(s) of g" in caplog.text
    nodes = json.loads((tmp_path / "s.json").read_text())["nodes"]
    assert nodes["g"]["status"] == "submitted" and nodes["d"]["status"] == "queued"


def test_slurm_driver_reports_a_refused_submission(tmp_path, fake_slurm, monkeypatch, caplog):
    monkeypatch.setenv("FAKE_FAIL", "g")
    out = tmp_path / "out"
    assert main([str(write_plan(tmp_path, LOCAL_PLAN)), "--out", str(out)]) == 1
    ids = {n: argv[0] for n, argv in calls(fake_slurm).items()}
    assert list(ids) == ["a", "b", "c"]  # submitted before g was refused; d never
    assert "sbatch of node 'g' failed (exit 1): sbatch: error: Invalid account" in caplog.text
    assert str(ids) in caplog.text  # the message names what is already queued
    assert {n: j[-1]["job_id"] for n, j in json.loads((out / ".plan/jobs.json").read_text()).items()} == ids


# ---- the shared results CSV ---------------------------------------------------------------------------


def _append_rows(path: str, worker: int, n: int) -> None:
    for i in range(n):
        append_results_row(path, {"worker": worker, "i": i, "metric_value": worker + i / 100})


def test_results_csv_appends_are_safe_with_concurrent_writers(tmp_path):
    path = tmp_path / "stage3" / "results.csv"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_append_rows, args=(str(path), w, 25)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
    assert [p.exitcode for p in workers] == [0, 0, 0, 0]
    table = pd.read_csv(path)
    assert len(table) == 100 and len(table.drop_duplicates(["worker", "i"])) == 100
    assert sorted(table.groupby("worker")["i"].max()) == [24] * 4
    append_results_row(path, {"worker": 9, "i": 0, "extra": "x"})  # a new column joins the union
    table = pd.read_csv(path)
    assert (list(table.columns) == ["worker", "i", "metric_value", "extra"]
            and table["extra"].notna().sum() == 1)


# ---- found in review ------------------------------------------------------------------------------------


def test_profile_differences_match_grid_points_by_name(tmp_path, capsys):
    """A profile with fewer tasks: index 0 is task=chexchonet in one profile and task=tb in the other, whose
    configs differ by the task and not by the profile; only the point count differs."""
    path = write_plan(tmp_path, """\
        vars: {tasks: [chexchonet, tb]}
        profiles: {a: {}, b: {vars: {tasks: [tb]}}}
        nodes:
          - name: probe
            stage: Stage3_eval.py
            config: [configs/demo/stage3_linear_probe.yaml, "configs/demo/stage3_{task}.yaml"]
            grid: {task: "{tasks}"}
    """)
    assert main([str(path), "--dry-run", "--out", str(tmp_path / "{profile}")]) == 0
    table = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("# probe")]
    assert table == [["#", "probe", "(points)", "2", "1"]]


@pytest.mark.parametrize("mode", sorted(LOCAL_MODES))
def test_negative_exit_codes_are_exit_statuses_in_both_modes(tmp_path, mode):
    """``SystemExit(-1)`` exits with status 255, not "killed by SIGHUP"; -100 with 156 (there is no signal
    100: in process this raised and left run.json at "running")."""
    out = tmp_path / "out"
    path = write_plan(tmp_path, f"""\
        python: {sys.executable}
        nodes:
          - {{name: neg, script: [-c, "raise SystemExit(-1)"]}}
          - {{name: big, script: [-c, "raise SystemExit(-100)"]}}
    """)
    assert main([str(path), *LOCAL_MODES[mode], "--out", str(out)]) == 1
    records = {n: json.loads((out / "runs" / n / "run.json").read_text()) for n in ("neg", "big")}
    assert {n: (r["status"], r["returncode"]) for n, r in records.items()} == {
        "neg": ("failed: exit code 255", 255), "big": ("failed: exit code 156", 156)}


def test_node_sbatch_args_may_use_node(tmp_path):
    path = write_plan(tmp_path, "vars: {acct: lab}\nnodes: [{name: a, script: [-c, pass], "
                                "sbatch_args: ['--comment={node}-{acct}']}]\n")
    assert load_plan(path, out=tmp_path / "o").nodes["a"].sbatch_args == ("--comment=a-lab",)


def test_script_whose_interpreter_cannot_start_leaves_no_stdout_file(tmp_path):
    out = tmp_path / "out"
    path = write_plan(tmp_path, "python: /nonexistent/python\n"
                                "nodes: [{name: t, script: [-c, pass], stdout: '{out}/t.txt'}]\n")
    write_specs(plan := load_plan(path, out=out))
    usr1 = signal.getsignal(signal.SIGUSR1)  # the executor ignores it for good, as its own process
    try:
        assert execute(plan.spec_path("t")) == 1
    finally:
        signal.signal(signal.SIGUSR1, usr1)
    record = json.loads((out / "runs/t/run.json").read_text())
    assert record["status"].startswith("failed: [Errno 2]") and record["returncode"] == 1
    assert sorted(p.name for p in out.iterdir()) == [".plan", "runs"]  # no .t.txt.tmp<pid>
