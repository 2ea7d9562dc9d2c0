"""pacx/eval/report.py and scripts/make_report.py on a results directory written by the library's own writers
(results rows -> scripts/make_tables.py; HistoryCSVLogger metrics with a resumed attempt; the rollout grid;
the ReconstructionGrid callback), then rendered in real headless Chromium: the screenshot is not blank, and
every table number in the DOM equals table.json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pacx.eval.report import REPORT_FILE, epoch_series, find_inputs, write_report
from pacx.eval.rollout import render_grid
from pacx.lit.callbacks import ReconstructionGrid
from pacx.lit.history import HistoryCSVLogger
from tests.helpers import load_script

CHROMIUM = "chromium"  # Debian's package and binary name
INSTALL_HINT = "install it with `bash scripts/install_chromium.sh` as root (`make test` runs it)"
CHROMIUM_TIMEOUT_S = 120

# (benchmark, task, metric, logged column, backbone, train fraction or None) -> metric per seed.
RUNS: dict[tuple, list[float]] = {
    ("chexchonet", "binary", "f1", "test/f1", "random", 1.0): [0.20, 0.24],
    ("chexchonet", "binary", "f1", "test/f1", "mae", 1.0): [0.30, 0.34],
    ("chexchonet", "binary", "f1", "test/f1", "pacx", 1.0): [0.41, 0.47],
    ("chexchonet", "binary", "f1", "test/f1", "mae", 0.01): [0.22, 0.25],
    ("chexchonet", "binary", "f1", "test/f1", "pacx", 0.01): [0.31, 0.29],
    ("tb", "binary", "auroc", "test/auroc", "mae", 1.0): [0.71, 0.75],
    ("tb", "binary", "auroc", "test/auroc", "pacx", 1.0): [0.78, 0.80],
    ("cxlseg", "segmentation", "iou", "test/iou", "random", None): [0.80, 0.82],
    ("cxlseg", "segmentation", "iou", "test/iou", "pacx", None): [0.90, 0.91],
}


def _results_rows() -> list[dict]:
    rows = []
    for (bench, task, metric, column, kind, fraction), values in RUNS.items():
        for seed, value in enumerate(values):
            upstream = seed if kind == "pacx" else 0  # PaCX-MAE: one encoder per Stage 2 seed
            row = {"benchmark": bench, "task": task, "metric": metric, "backbone_kind": kind,
                   "mode": "frozen" if task == "segmentation" else "linear_probe", "seed": seed,
                   column: value, "metric_value": value,
                   "backbone_weights": f"exports/{kind}_encoder_s{upstream}.safetensors", "git_sha": "abc123",
                   "run_dir": f"stage3/{bench}/{kind}_f{fraction}_s{seed}", "debug": ""}
            if fraction is not None:
                row.update(train_fraction=fraction, subset_seed=seed)
            if column == "test/f1":
                row["test/auroc"] = round(value + 0.4, 6)
            rows.append(row)
    return rows


def _run_record(run_dir: Path, stage: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"stage": stage, "status": "completed"}))


def _log_epochs(run_dir: Path, attempt: int, epochs: range, extra: dict[str, float]) -> None:
    """Two training steps and one validation row per epoch, as Lightning logs
    them (``attempt`` > 1 resumes)."""
    logger = HistoryCSVLogger(run_dir, attempt=attempt)
    for epoch in epochs:
        loss = 1.0 / (epoch + 1) + 0.1 * attempt
        for i in range(2):
            logger.log_metrics({"train/loss_step": loss + 0.05 * i, "epoch": epoch}, step=2 * epoch + i)
        logger.log_metrics({"train/loss_epoch": loss, "val/loss": loss + 0.2, "epoch": epoch, **{
            k: v / (epoch + 1) for k, v in extra.items()}}, step=2 * epoch + 1)
    logger.save()


class _Reconstructor(torch.nn.Module):
    """What ReconstructionGrid asks of a module: ``device`` and ``reconstruct(imgs) -> (masked, recon)``."""

    device = torch.device("cpu")

    def reconstruct(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return imgs * (torch.rand_like(imgs[:, :1]) > 0.75), imgs.flip(-1)


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    """A demo-shaped results directory: table.json, figures/{low_data.png, comparison.md, rollout.png}, one
    Stage 1 run (resumed once) with reconstructions, one Stage 2 run, one Stage 3 run (no curves expected)."""
    root = tmp_path_factory.mktemp("results")
    results = root / "stage3" / "results.csv"
    results.parent.mkdir(parents=True)
    pd.DataFrame(_results_rows()).to_csv(results, index=False)
    make_tables = load_script("make_tables")
    assert make_tables.main([str(results), "--backbones", "random", "mae", "pacx", "--out-dir",
                             str(root / "figures"), "--json", str(root / "table.json")]) == 0

    stage1 = root / "stage1_mae"
    _run_record(stage1, "stage1_mae")
    _log_epochs(stage1, 1, range(0, 4), {"val/online_probe_auroc": 0.6})
    _log_epochs(stage1, 2, range(3, 6), {"val/online_probe_auroc": 0.6})  # resumed: epoch 3 logged again
    grid, gen = ReconstructionGrid(num_images=4), torch.Generator().manual_seed(0)
    grid._images = torch.rand(4, 3, 32, 32, generator=gen)
    for epoch in (0, 5):
        grid.save(SimpleNamespace(loggers=[], global_step=0), _Reconstructor(), epoch,
                  stage1 / "reconstructions")

    stage2 = root / "stage2_pacx_s0"
    _run_record(stage2, "stage2_pacx")
    _log_epochs(stage2, 1, range(0, 5), {"val/infonce_frac_labs": 1.02, "val/infonce_frac_ecg": 1.01})

    stage3 = root / "stage3" / "chexchonet" / "mae_f1_s0"
    _run_record(stage3, "stage3_classify")
    _log_epochs(stage3, 1, range(0, 2), {})

    rng = np.random.default_rng(0)
    images = [(rng.random((48, 40)) * 255).astype(np.uint8) for _ in range(2)]
    render_grid(images, {"mae": rng.random((2, 4, 4)), "pacx": rng.random((2, 4, 4))},
                root / "figures" / "rollout.png")
    return root


@pytest.fixture(scope="module")
def report(results_dir) -> Path:
    return write_report(results_dir)


class _Cells(HTMLParser):
    """The table's ``<td data-mean=...>`` cells: (benchmark, backbone) -> attributes plus the shown value."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str], dict[str, str]] = {}
        self.images: list[str] = []
        self.sections: dict[str, str] = {}
        self._cell: dict[str, str] | None = None
        self._value = False
        self._section: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "td" and "data-mean" in attrs:
            self._cell = {**attrs, "shown": ""}
            self.cells[(attrs["data-benchmark"], attrs["data-backbone"])] = self._cell
        elif tag == "span" and self._cell is not None and attrs.get("class") == "value":
            self._value = True
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "section":
            self._section = attrs["id"]
            self.sections[self._section] = ""

    def handle_endtag(self, tag):
        if tag == "span":
            self._value = False
        elif tag == "td":
            self._cell = None

    def handle_data(self, data):
        if self._value:
            self._cell["shown"] += data
        if self._section is not None:
            self.sections[self._section] += data


def _parse(html: str) -> _Cells:
    parser = _Cells()
    parser.feed(html)
    return parser


def _check_cells(cells: dict[tuple[str, str], dict[str, str]], table: dict) -> None:
    """Every table.json number is in the DOM, exactly, and nothing else is."""
    assert set(cells) == {(bench, kind) for bench, row in table.items() for kind in row}
    for (bench, kind), cell in cells.items():
        stat = table[bench][kind]
        assert (float(cell["data-mean"]) == stat["mean"]
                and float(cell["data-std"]) == stat["std"]), (bench, kind)
        assert (int(cell["data-n"]) == stat["n"]
                and int(cell["data-n-upstream"]) == stat["n_upstream"]), (bench, kind)
        assert cell["data-metric"] == stat["metric"] and cell["id"] == f"cell-{bench}-{kind}"
        assert cell["shown"] == f"{stat['mean']:.3f} ± {stat['std']:.3f}", (bench, kind)


def test_finds_the_inputs_and_leaves_out_stage3_runs(results_dir):
    found = find_inputs(results_dir)
    assert found.table_json == results_dir / "table.json"
    assert found.comparison == results_dir / "figures" / "comparison.md"
    assert found.low_data_png == results_dir / "figures" / "low_data.png"
    assert found.rollouts == [results_dir / "figures" / "rollout.png"]
    assert found.reconstructions == [results_dir / "stage1_mae" / "reconstructions" / "epoch0005.png"]
    assert [(p.name, s) for p, s in found.training_runs] == [("stage1_mae", "stage1_mae"),
                                                             ("stage2_pacx_s0", "stage2_pacx")]


def test_learning_curves_take_the_latest_attempt(results_dir):
    metrics = pd.read_csv(results_dir / "stage1_mae" / "metrics.csv")
    assert set(metrics["attempt"]) == {1, 2}
    val = epoch_series(metrics, "val/loss")
    assert list(val.index) == [0, 1, 2, 3, 4, 5]
    # attempt 2, 1
    assert val[3] == pytest.approx(1 / 4 + 0.2 + 0.2) and val[2] == pytest.approx(1 / 3 + 0.1 + 0.2)
    steps = epoch_series(metrics, "train/loss_step")
    assert steps[3] == pytest.approx(1 / 4 + 0.2 + 0.025)  # the mean of attempt 2's two steps
    assert epoch_series(metrics, "val/infonce_frac_labs").empty


def test_report_is_one_static_page_with_every_section(results_dir, report):
    html = report.read_text()
    assert report == results_dir / REPORT_FILE
    assert "<script" not in html.lower() and "http://" not in html and "https://" not in html
    page = _parse(html)
    _check_cells(page.cells, json.loads((results_dir / "table.json").read_text()))
    assert page.cells[("chexchonet", "pacx")]["class"] == "stat best"  # best mean of the row in bold
    # low-data, rollout, one reconstruction grid, two learning-curve figures (no Stage 3 run)
    assert len(page.images) == 5 and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert set(page.sections) == {"table", "comparison", "low-data", "rollout", "reconstructions", "curves"}
    assert not any("not available" in text for text in page.sections.values())
    assert "Reproduction report" in page.sections["comparison"] and "0.266" in page.sections["comparison"]
    assert "stage3/" not in page.sections["curves"]


def test_missing_inputs_say_what_is_missing(tmp_path):
    load_script("make_report").main([str(tmp_path), "--out", str(tmp_path / "empty.html")])
    page = _parse((tmp_path / "empty.html").read_text())
    assert not page.cells and not page.images
    for section, missing in (("table", "table.json"), ("comparison", "comparison.md"),
                             ("low-data", "low_data.png"), ("rollout", "rollout*.png"),
                             ("reconstructions", "reconstructions/epoch*.png"), ("curves", "metrics.csv")):
        assert f"not available: {missing}" in page.sections[section], section
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "nowhere")


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium as root needs --no-sandbox, and a writable HOME and profile folder of its own."""
    binary = shutil.which(CHROMIUM)
    if binary is None:
        pytest.fail(f"`{CHROMIUM}` is not on PATH: the report test renders the page in headless Chromium; "
                    f"{INSTALL_HINT}", pytrace=False)
    (tmp / "home").mkdir(exist_ok=True)
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S, check=True,
                          env={**os.environ, "HOME": str(tmp / "home")})


def test_report_renders_in_headless_chromium(results_dir, report, tmp_path):
    url = report.resolve().as_uri()
    shot = tmp_path / "report.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", url)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (2000, 1200)
    assert pixels.std() > 20 and (pixels < 200).mean() > 0.02, "blank screenshot"  # text, rules and a figure
    dom = _chromium(tmp_path, "--dump-dom", url).stdout
    page = _parse(dom)
    _check_cells(page.cells, json.loads((results_dir / "table.json").read_text()))
    assert len(page.images) == 5
