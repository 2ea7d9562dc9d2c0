"""The import layers of ``pyproject.toml`` (``[tool.importlinter]``): ``lint-imports`` passes on the tree, and
fails, naming the contract, when an upward import is planted in a temporary copy of the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the ``pacx`` package under ``root`` with ``root``'s pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def test_import_contracts_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "planted", "contracts"), [
    ("models/vit.py", "import pacx.lit.mae", ["pacx layers", "pacx.models builds and runs with torch alone"]),
    ("weights/checkpoint.py", "import pacx.models.vit", ["pacx layers"]),
    ("models/backbones.py", "import pacx.share", ["pacx layers"]),  # no exception left for models
    ("teachers/extract.py", "import pacx.teacher_cli", ["pacx layers"]),  # only the `-m` entry point may
    # down a layer, but forbidden
    ("data/registry.py", "import pacx.models.vit", ["pacx.data does not import pacx.models"]),
])
def test_planted_upward_import_breaks_a_contract(tmp_path, module, planted, contracts):
    shutil.copytree(REPO / "pacx", tmp_path / "pacx", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "pacx" / module
    target.write_text(target.read_text() + f"\n{planted}  # planted by tests/test_architecture.py\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    broken = result.stdout.split("Broken contracts", 1)[-1]
    for name in contracts:
        assert f"{name}" in broken, result.stdout
    assert f"pacx.{module[:-3].replace('/', '.')} -> {planted.split()[-1]}" in broken, result.stdout
