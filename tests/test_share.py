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
    torch.save(model(torch.load(sys.argv[2])), sys.argv[3])
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
    theirs = torch.load(tmp_path / "y.pt")
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
    """timm's features off by more than the tolerance: an error, and no weights or config left in the folder
    (a half-written folder would still load with timm or pacx.load_encoder)."""
    import pacx.share as share

    monkeypatch.setattr(share, "timm_folder_parity", lambda folder, encoder: 1.0)
    out = tmp_path / "bad"
    with pytest.raises(RuntimeError, match="differ from pacx's by 1.00e\\+00 .*model.safetensors and "
                                           "config.json were removed"):
        export_timm_folder(stage1_run, out)
    assert list(out.iterdir()) == []


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
    theirs = torch.load(tmp_path / "features.pt")
    assert theirs.shape == ours.shape == (1, 32)
    assert (theirs - ours).abs().max().item() <= 1e-5
