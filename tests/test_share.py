"""pacx.share: the timm model folder (loaded by timm alone, same features, card
without absolute paths) and ONNX (ONNX Runtime equals PyTorch at batch 1 and 3;
a missing ``onnx`` names the extra), and the serving benchmark."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import pacx
from pacx.constants import IMAGENET_MEAN, IMAGENET_STD
from pacx.share import export_onnx, export_timm_folder, require_serve
from pacx.share.card import LICENCE_NOTE
from pacx.utils import file_sha256
from tests.helpers import load_script

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
ABSOLUTE = re.compile(r"(?:^|[\s`'\"(=])(?:/|~/|[A-Za-z]:\\)[\w.~-]+")

# Run by a python that never imports pacx: timm alone must rebuild the architecture and preprocessing.
TIMM_ONLY = """
import json, sys
import timm, torch
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2], weights_only=True)), sys.argv[3])
data = timm.data.resolve_data_config({}, model=model)
assert "pacx" not in sys.modules, sorted(m for m in sys.modules if m.startswith("pacx"))
print(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}))
"""


def _absolute_paths(text: str, *roots: Path) -> list[str]:
    return [str(r) for r in roots if str(r) in text] + ABSOLUTE.findall(text)


@pytest.fixture(scope="module")
def timm_folder(stage1_run, tmp_path_factory):
    return export_timm_folder(stage1_run, tmp_path_factory.mktemp("share") / "pacx-mae-test")


def test_timm_loads_folder_without_pacx_same_features(timm_folder, stage1_run, tmp_path):
    torch.save(X, tmp_path / "x.pt")
    res = subprocess.run([sys.executable, "-c", TIMM_ONLY, str(timm_folder), str(tmp_path / "x.pt"),
                          str(tmp_path / "y.pt")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    theirs = torch.load(tmp_path / "y.pt", weights_only=True)
    with torch.no_grad():
        ours = pacx.load_encoder(stage1_run)(X)
    assert theirs.shape == ours.shape == (2, 32)
    assert (theirs - ours).abs().max().item() <= 1e-5
    # the Stage 3 evaluation preprocessing, in timm's terms
    data = json.loads(res.stdout.strip().splitlines()[-1])
    assert data == {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": list(IMAGENET_MEAN),
                    "std": list(IMAGENET_STD), "crop_pct": 1.0, "crop_mode": "squash"}


def test_folder_files_and_config(timm_folder, stage1_run):
    assert sorted(p.name for p in timm_folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((timm_folder / "config.json").read_text())
    enc = pacx.load_encoder(stage1_run)
    assert cfg["architecture"] == enc.cfg.timm_model and cfg["num_classes"] == 0
    assert cfg["num_features"] == enc.embed_dim == 32 and cfg["global_pool"] == "token"
    assert cfg["model_args"] == {**enc.cfg.timm_kwargs(), "num_classes": 0, "global_pool": "token"}
    assert cfg["pretrained_cfg"]["input_size"] == [3, 32, 32]
    # model.safetensors is also a pacx export: pacx.load_encoder reads it with the same metadata
    with safe_open(str(timm_folder / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["stage"] == "stage1_mae" and meta["source"] == "checkpoints/last.ckpt"
    torch.testing.assert_close(pacx.load_encoder(timm_folder / "model.safetensors")(X), enc(X))
    torch.testing.assert_close(pacx.load_encoder(timm_folder)(X), enc(X))  # the folder itself too
    assert (timm_folder / "model.safetensors").stat().st_mode & 0o044  # readable by others as umask allows


def test_model_card_provenance_and_no_absolute_path(timm_folder, stage1_run, tmp_path_factory):
    card = (timm_folder / "README.md").read_text()
    with safe_open(str(timm_folder / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    for needle in ("stage1_mae", "checkpoints/last.ckpt", f"run `{stage1_run.name}`", meta["source_sha256"],
                   meta["git_sha"], file_sha256(stage1_run / "config.yaml"), "CheXpert", LICENCE_NOTE,
                   'timm.create_model("local-dir:pacx-mae-test", pretrained=True)', "upload_folder(",
                   "crop_mode"):
        assert needle in card, needle
    both = card + (timm_folder / "config.json").read_text()
    assert not _absolute_paths(both, stage1_run, timm_folder, tmp_path_factory.getbasetemp(), Path.home())


def test_avg_pool_folder_matches_pacx_avg(stage1_run, tmp_path):
    import timm

    folder = export_timm_folder(stage1_run, tmp_path / "avg", pool="avg")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["global_pool"] == "avg" and cfg["model_args"]["fc_norm"] is False
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(X), pacx.load_encoder(stage1_run).set_pool("avg")(X), atol=1e-5,
                                   rtol=0)


def test_other_norm_eps_is_exported_with_its_difference_stated(tmp_path, caplog):
    """timm cannot build LayerNorm eps 1e-5 (the authors' Stage 2): the export
    warns and the card says by how much."""
    from pacx.models.vit import ViTEncoder, vit_config

    cfg = vit_config("vit_test", img_size=32, norm_eps=1e-5)
    torch.manual_seed(0)
    src = tmp_path / "eps.safetensors"
    save_file(ViTEncoder(cfg).state_dict(), str(src), metadata={"pacx_vit_config": json.dumps(cfg.to_dict()),
                                                                 "stage": "stage2_pacx"})
    folder = export_timm_folder(src, tmp_path / "eps")
    card = (folder / "README.md").read_text()
    assert "LayerNorm eps 1e-05" in card and "Symile-MIMIC" in card
    assert any("eps" in r.message and "differ" in r.message for r in caplog.records)


def test_a_folder_that_fails_its_parity_check_is_not_left_loadable(stage1_run, tmp_path, monkeypatch):
    """timm's features off by more than the tolerance: an error, and no folder left (a half-written folder
    would still load with timm or pacx.load_encoder); over a previous export, that one is kept as it was."""
    import pacx.share as share

    monkeypatch.setattr(share, "timm_folder_parity", lambda folder, encoder: 1.0)
    out = tmp_path / "bad"
    with pytest.raises(RuntimeError, match="bad: timm's features differ from pacx's by 1.00e\\+00 .*nothing "
                                           "was written"):
        export_timm_folder(stage1_run, out)
    assert list(tmp_path.iterdir()) == []


def test_onnx_matches_pytorch_at_batch_1_and_3(stage1_run, tmp_path):
    out = export_onnx(stage1_run, tmp_path / "enc.onnx")
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["stage"] == "stage1_mae" and props["pool"] == "cls" and props["img_size"] == "32"
    assert json.loads(props["mean"]) == list(IMAGENET_MEAN) and len(props["source_sha256"]) == 64
    assert not _absolute_paths(json.dumps(props), stage1_run, tmp_path, Path.home())
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    enc = pacx.load_encoder(stage1_run)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        (got,) = session.run(None, {"pixel_values": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(got, enc(x).numpy(), atol=1e-4, rtol=0)


def test_onnx_needs_a_onnx_suffix(stage1_run, tmp_path):
    with pytest.raises(ValueError, match=r"\.onnx"):
        export_onnx(stage1_run, tmp_path / "enc.bin")


def test_missing_onnx_names_the_serve_extra(monkeypatch, stage1_run, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'pacx\[serve\]'"):
        require_serve()
    with pytest.raises(ImportError, match=r"pacx\[serve\]"):
        export_onnx(stage1_run, tmp_path / "enc.onnx")
    assert not (tmp_path / "enc.onnx").exists()


def test_benchmark_serve_reports_both_runtimes(tmp_path):
    out = tmp_path / "serve.json"
    load_script("benchmark_serve").main(["--arch", "vit_test", "--img-size", "32", "--batch-sizes", "1", "3",
                                         "--warmup", "1", "--repeats", "2", "--threads", "1", "--json",
                                         str(out)])
    res = json.loads(out.read_text())
    assert res["threads"] == 1 and sorted(res["batches"]) == ["1", "3"]
    for row in res["batches"].values():
        assert row["torch_ms"] > 0 and row["onnxruntime_ms"] > 0 and row["max_abs_diff"] < 1e-4
        assert row["torch_over_onnxruntime"] == pytest.approx(row["torch_ms"] / row["onnxruntime_ms"],
                                                              rel=1e-9)


def test_model_card_snippet_gives_pacx_features_of_a_16_bit_xray(timm_folder, tmp_path):
    """The card's "Use with timm" code, run by timm alone on a 12-bit X-ray in a 16-bit PNG, gives the
    features ``pacx.embed`` computes (pacx windows high-bit images; ``convert("RGB")`` alone clips them)."""
    from PIL import Image

    from pacx.data.images import open_image
    from pacx.data.transforms import resize_eval

    shutil.copytree(timm_folder, tmp_path / timm_folder.name)
    xray = np.random.default_rng(0).integers(0, 4096, (48, 40), dtype=np.uint16)
    Image.fromarray(xray).save(tmp_path / "chest_xray.png")
    card = (timm_folder / "README.md").read_text()
    code = re.search(r"## Use with timm\n\n```python\n(.*?)```", card, re.S).group(1)
    res = subprocess.run([sys.executable, "-c", code + "torch.save(features, 'features.pt')\n"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    with torch.no_grad():
        ours = pacx.load_encoder(timm_folder)(resize_eval(32)(open_image(tmp_path / "chest_xray.png"))[None])
    theirs = torch.load(tmp_path / "features.pt", weights_only=True)
    assert theirs.shape == ours.shape == (1, 32)
    assert (theirs - ours).abs().max().item() <= 1e-5


# ---- the folder is written as one unit ---------------------------------------------------------------------


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _crash_at_the_card(monkeypatch):
    """Make the export fail at its last step (the model card), after weights and config.json were made."""
    import pacx.share as share

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the card")

    monkeypatch.setattr(share, "model_card", crash)


def test_a_crashed_reexport_leaves_the_previous_folder_intact(stage1_run, tmp_path, monkeypatch):
    """Re-exporting over a folder (here with another pool) and dying before the end leaves the previous
    export byte for byte: no new weights or config.json beside the old card (which, for a pool change,
    would make timm return another feature than the card describes)."""
    out = export_timm_folder(stage1_run, tmp_path / "enc")
    before = _folder_bytes(out)
    _crash_at_the_card(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        export_timm_folder(stage1_run, out, pool="avg")
    assert _folder_bytes(out) == before
    assert json.loads((out / "config.json").read_text())["global_pool"] == "token"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]  # no temporary folder left behind


def test_a_crashed_export_leaves_no_loadable_folder(stage1_run, tmp_path, monkeypatch):
    """Dying before the card is written leaves nothing under the folder's name: no model.safetensors and
    config.json that timm or pacx.load_encoder would load as if the export had finished."""
    _crash_at_the_card(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        export_timm_folder(stage1_run, tmp_path / "enc")
    assert list(tmp_path.iterdir()) == []


def test_a_reexport_replaces_the_whole_folder(stage1_run, tmp_path):
    """An export over a previous one (same three files) replaces it: the new pool, weights that load, and
    the folder keeps its place."""
    out = export_timm_folder(stage1_run, tmp_path / "enc")
    export_timm_folder(stage1_run, out, pool="avg")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["global_pool"] == "avg"
    assert "mean of the patch tokens" in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]
    assert out.stat().st_mode & 0o055 == 0o055 & ~_umask()  # shareable as the umask allows, like a mkdir


def _umask() -> int:
    import os

    umask = os.umask(0)
    os.umask(umask)
    return umask


@pytest.mark.bad_input
def test_a_folder_holding_other_files_is_refused(stage1_run, tmp_path):
    """--format timm OUT, an existing folder holding files other than a previous export's (e.g. a Hub
    clone's .git, an old pytorch_model.bin) → FileExistsError naming them; nothing in the folder changes."""
    out = tmp_path / "enc"
    (out / ".git").mkdir(parents=True)
    (out / "pytorch_model.bin").write_bytes(b"old")
    with pytest.raises(FileExistsError, match=r"enc.*\.git.*pytorch_model\.bin"):
        export_timm_folder(stage1_run, out)
    assert sorted(p.name for p in out.iterdir()) == [".git", "pytorch_model.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]


# ---- the card's provenance is the run the weights came from ------------------------------------------------

OTHER_SHA = "feedbeef" * 5


def _other_run(root: Path) -> Path:
    """A run directory that made none of the weights put into it."""
    run = root / "other_run"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"stage": "stage2_pacx", "status": "completed",
                                              "git_sha": OTHER_SHA, "global_step": 987, "epoch": 65,
                                              "world_size": 8, "checkpoints": {}}))
    (run / "config.yaml").write_text("data:\n  batch_size: 4321\n")
    return run


def _assert_no_provenance_of(card: str, run: Path) -> None:
    for needle in (OTHER_SHA, "| global step | 987 |", "| epoch | 65 |", "| world size | 8 |", "4321",
                   file_sha256(run / "config.yaml")):
        assert needle not in card, needle


def test_card_of_a_third_party_file_lying_in_a_run_has_no_provenance_of_that_run(tmp_path):
    """A timm file downloaded into some run's folder: its card names no training commit, step, config or
    data settings of that run (it did not train these weights)."""
    from pacx.models.vit import ViTEncoder
    from pacx.weights.layout import ViTConfig

    run = _other_run(tmp_path)
    torch.manual_seed(0)
    tiny = ViTConfig(img_size=32, embed_dim=192, depth=1, num_heads=3, timm_model="vit_tiny_patch16_224")
    save_file(ViTEncoder(tiny).state_dict(), str(run / "vit.safetensors"))  # plain timm keys, no metadata
    card = (export_timm_folder(run / "vit.safetensors", tmp_path / "enc") / "README.md").read_text()
    _assert_no_provenance_of(card, run)
    assert "trained by pacx commit" not in card and "global step" not in card


def test_card_of_an_export_copied_into_another_run_names_its_own_run(stage1_run, tmp_path):
    """An export of run ``stage1`` placed in another run's folder: the card names ``stage1``'s checkpoint
    (through the export's metadata) and none of the other run's records."""
    from pacx.share import export_encoder

    run = _other_run(tmp_path)
    export_encoder(stage1_run, run / "init" / "encoder.safetensors")
    folder = export_timm_folder(run / "init" / "encoder.safetensors", tmp_path / "enc")
    card = (folder / "README.md").read_text()
    _assert_no_provenance_of(card, run)
    ckpt = stage1_run / "checkpoints" / "last.ckpt"
    assert f"`checkpoints/last.ckpt` of run `{stage1_run.name}`" in card
    assert file_sha256(ckpt) in card


def test_card_of_an_export_inside_its_own_run_keeps_the_run_provenance(stage1_run, tmp_path):
    """An export written into the run it came from (checked by the checkpoint's hash) keeps that run's
    training commit and config hash on the card."""
    from pacx.share import export_encoder

    run = tmp_path / "stage1"
    shutil.copytree(stage1_run, run)
    export_encoder(run / "checkpoints" / "last.ckpt", run / "encoder.safetensors")
    card = (export_timm_folder(run / "encoder.safetensors", tmp_path / "enc") / "README.md").read_text()
    record = json.loads((run / "run.json").read_text())
    assert f"| trained by pacx commit | `{record['git_sha']}` |" in card
    assert file_sha256(run / "config.yaml") in card


def test_export_of_an_export_keeps_the_checkpoint_it_came_from(stage1_run, tmp_path):
    """Round trip: exporting an export (and that again) keeps the original checkpoint's name, run, hash,
    format and training step in the metadata (``origin_*``), beside the file it was read from."""
    from pacx.share import export_encoder
    from pacx.weights.checkpoint import safe_torch_load

    ckpt = stage1_run / "checkpoints" / "last.ckpt"
    step = safe_torch_load(ckpt)["global_step"]
    a = export_encoder(stage1_run, tmp_path / "a.safetensors")
    b = export_encoder(a, tmp_path / "b.safetensors")
    c = export_encoder(b, tmp_path / "c.safetensors")
    metas = []
    for path in (a, b, c):
        with safe_open(str(path), "pt") as f:
            metas.append(f.metadata())
    assert metas[0]["global_step"] == str(step) and metas[0]["source"] == "checkpoints/last.ckpt"
    for meta, read in zip(metas[1:], ("a.safetensors", "b.safetensors"), strict=True):
        assert meta["source"] == read and meta["source_format"] == "pacx_export"
        assert {k: meta[k] for k in ("origin_source", "origin_source_run", "origin_source_sha256",
                                     "origin_source_format", "global_step", "stage")} == {
            "origin_source": "checkpoints/last.ckpt", "origin_source_run": stage1_run.name,
            "origin_source_sha256": file_sha256(ckpt), "origin_source_format": "pacx_checkpoint",
            "global_step": str(step), "stage": "stage1_mae"}


def test_card_of_the_best_checkpoint_states_its_own_step(stage1_run, tmp_path):
    """--which best: the card's global step and epoch are the best checkpoint's, not the run's last ones."""
    from pacx.weights.checkpoint import safe_torch_load

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(stage1_run / "config.yaml", run / "config.yaml")
    ckpt = safe_torch_load(stage1_run / "checkpoints" / "last.ckpt")
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    torch.save({**ckpt, "global_step": 1, "epoch": 0}, run / "checkpoints" / "best.ckpt")
    record = {**json.loads((stage1_run / "run.json").read_text()), "global_step": 7, "epoch": 3,
              "checkpoints": {"last": "checkpoints/last.ckpt", "best": "checkpoints/best.ckpt"}}
    (run / "run.json").write_text(json.dumps(record))
    card = (export_timm_folder(run, tmp_path / "enc", which="best") / "README.md").read_text()
    assert "| global step | 1 |" in card and "| epoch | 0 |" in card
    assert "`checkpoints/best.ckpt`" in card


def test_card_of_a_checkpoint_copied_into_a_run_of_another_stage_has_no_provenance_of_it(stage1_run,
                                                                                         tmp_path):
    """A Stage 1 checkpoint copied into a Stage 2 run's folder did not come from that run."""
    run = _other_run(tmp_path)
    shutil.copy(stage1_run / "checkpoints" / "last.ckpt", run / "init.ckpt")
    card = (export_timm_folder(run / "init.ckpt", tmp_path / "enc") / "README.md").read_text()
    _assert_no_provenance_of(card, run)


def test_a_failed_onnx_export_leaves_no_file(stage1_run, tmp_path, monkeypatch):
    """An ONNX export that fails its check leaves neither the output nor its temporary file behind."""
    def reject(*args, **kwargs):
        raise onnx.checker.ValidationError("rejected")

    monkeypatch.setattr(onnx.checker, "check_model", reject)
    with pytest.raises(onnx.checker.ValidationError):
        export_onnx(stage1_run, tmp_path / "enc.onnx")
    assert list(tmp_path.iterdir()) == []
