"""The project is self-contained: README code runs, references point into docs/ (and resolve), the bad-input
table is current, and exported files carry no absolute path of the machine that wrote them.

README convention: the line just above every ```python block is ``<!-- readme-test: run … -->`` (the block
is executed here) or ``<!-- readme-test: skip: <reason> -->`` for a block that cannot run here (real data,
the network; the test skips it and says why). A ```bash block runs only when marked ``run``; unmarked ones
(real data, a cluster) are not run. Marked blocks run in one folder laid out like a clone after Stage 1
(``scripts/``, and ``runs/stage1/mae_vitb_chexpert``: the tiny test run), the bash blocks first, in README
order, so their commands run as written and make the files (``mae_encoder.safetensors``, …) the python
blocks use."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pacx.share import export_encoder

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!--\s*readme-test:\s*(run|skip)\b[:\s]*(.*?)\s*-->")
BLOCK = re.compile(r"```(python|bash)\n(.*?)```", re.S)
# What a user's clone does not have: the internal notes (and their § sections) these used to point at.
FOREIGN = re.compile(r"shared/|SPEC\.md|DATASETS\.md|ECGFOUNDER\.md|STYLE\.md|§")
SEARCHED = ("pacx", "scripts", "configs", "plans", "README.md", "Stage1_MAE.py", "Stage2_PACX.py",
            "Stage3_eval.py")
DOC_REF = re.compile(r"docs/(\w+)\.md#([\w-]+)")


def readme_blocks(lang: str = "python") -> list[tuple[str, str, str]]:
    """``(kind, reason, code)`` of every ``lang`` block in the README; kind from the marker just above it."""
    text = (REPO / "README.md").read_text()
    blocks = []
    for match in BLOCK.finditer(text):
        if match.group(1) != lang:
            continue
        before = text[: match.start()].rstrip().splitlines()[-1] if text[: match.start()].strip() else ""
        marker = MARKER.search(before)
        blocks.append((marker.group(1), marker.group(2), match.group(2)) if marker else ("unmarked", "",
                                                                                         match.group(2)))
    return blocks


@pytest.fixture(scope="module")
def readme_folder(stage1_run, tmp_path_factory) -> Path:
    """A clone after Stage 1 in which every bash block marked run has run (see the module docstring)."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "scripts").symlink_to(REPO / "scripts")
    (folder / "runs/stage1").mkdir(parents=True)
    (folder / "runs/stage1/mae_vitb_chexpert").symlink_to(stage1_run)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for kind, _, code in readme_blocks("bash"):
        if kind == "run":
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=folder, env=env,
                                    capture_output=True, text=True, timeout=600)
            if result.returncode:
                pytest.fail("README bash block failed "
                            f"({result.returncode}):\n{code}\n{result.stderr[-3000:]}")
    return folder


def _files(*roots: str):
    for root in roots:
        path = REPO / root
        yield from ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                         and p.suffix in {".py", ".md", ".yaml", ".sbatch",
                                                                          ".sh"}))


def test_every_readme_python_block_is_marked():
    blocks = readme_blocks()
    assert blocks, "the README has python blocks"
    unmarked = [code.splitlines()[0] for kind, _, code in blocks if kind == "unmarked"]
    assert not unmarked, ("python blocks without a <!-- readme-test: run|skip: reason --> line above: "
                          f"{unmarked}")
    for kind, reason, _ in blocks:
        assert kind == "run" or reason, "a skipped README block states why"


def test_readme_bash_blocks_run(readme_folder):
    """The export commands (and any other bash block marked run) run as written and leave their outputs."""
    assert any(kind == "run" for kind, _, _ in readme_blocks("bash")), \
        "the README runs at least the export command"
    assert (readme_folder / "mae_encoder.safetensors").is_file()


@pytest.mark.parametrize("index", range(len(readme_blocks())))
def test_readme_python_block_runs(index, readme_folder):
    """The timm snippet (and any other block marked run) runs, in the folder the bash blocks left."""
    kind, reason, code = readme_blocks()[index]
    if kind == "skip":
        pytest.skip(f"README block not run here: {reason}")
    result = subprocess.run([sys.executable, "-c", code], cwd=readme_folder, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_no_reference_to_internal_notes():
    """README, code, configs and plans point into docs/, never at shared/, SPEC.md, DATASETS.md, … ."""
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in _files(*SEARCHED)
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if FOREIGN.search(line)]
    assert not hits, "references to notes users do not have:\n" + "\n".join(hits)


def test_docs_references_resolve():
    """Every ``docs/<page>.md#<anchor>`` in the project names a page and an anchor that exist."""
    anchors = {p.stem: set(re.findall(r'<a id="([\w-]+)"></a>', p.read_text()))
               for p in (REPO / "docs").glob("*.md")}
    bad = []
    for path in _files(*SEARCHED, "tests", "docs"):
        for page, anchor in DOC_REF.findall(path.read_text(errors="replace")):
            if anchor not in anchors.get(page, ()):
                bad.append(f"{path.relative_to(REPO)}: docs/{page}.md#{anchor}")
    assert not bad, "dangling docs references:\n" + "\n".join(sorted(set(bad)))


def test_bad_input_table_is_up_to_date():
    result = subprocess.run([sys.executable, str(REPO / "scripts/bad_input_table.py"), "--check"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-2000:]
    assert "| bad input | error | test |" in (REPO / "docs/bad_inputs.md").read_text()


def _absolute_paths(meta: dict[str, str], *roots: Path) -> list[str]:
    return [f"{k}={v}" for k, v in meta.items() if any(str(r) in v for r in roots) or v.startswith("/")]


def test_exported_files_carry_no_absolute_path(stage1_run, tmp_path):
    out = export_encoder(stage1_run, tmp_path / "enc.safetensors")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert not _absolute_paths(meta, stage1_run, tmp_path, Path.home()), meta
    assert meta["source"] == "checkpoints/last.ckpt" and meta["source_run"] == stage1_run.name
    assert len(meta["source_sha256"]) == 64

    from pacx.models.ecg_ssl import BACKBONE_PREFIX, STAGE_ECG_SSL, export_ecg_teacher
    from pacx.models.ecgfounder import create_ecgfounder

    state = {BACKBONE_PREFIX + k: v
             for k, v in create_ecgfounder("demo_small", head=False).state_dict().items()}
    ckpt = tmp_path / "ecg.ckpt"
    torch.save({"state_dict": state, "global_step": 3,
                "pacx": {"stage": STAGE_ECG_SSL, "ecgfounder_config": "demo_small"}},
               ckpt)
    out = export_ecg_teacher(ckpt, tmp_path / "ecg.safetensors")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert not _absolute_paths(meta, tmp_path, Path.home()), meta
    assert meta["source"] == "ecg.ckpt" and json.loads(meta["global_step"]) == 3
