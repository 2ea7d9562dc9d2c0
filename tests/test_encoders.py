"""pacx.load_encoder / export: every accepted format, strictness, unsafe pickles, mismatched shapes."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open

import pacx
from pacx.lit.mae import MAEModule
from pacx.models.mae import create_mae, is_decoder_key
from pacx.models.vit import create_vit, vit_config
from pacx.share import export_encoder
from pacx.weights.checkpoint import CheckpointError
from pacx.weights.formats import read_encoder_weights

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class Payload:
    """Unpickling this would run code: it creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture()
def mae():
    torch.manual_seed(0)
    return create_mae("mae_vit_test", img_size=32).eval()


def _features(model):
    with torch.no_grad():
        return model(X)


def test_mae_release_with_decoder_loads_strictly(tmp_path, mae):
    torch.save({"model": mae.state_dict()}, tmp_path / "mae_visualize.pth")
    enc = pacx.load_encoder(tmp_path / "mae_visualize.pth", cfg=mae.cfg)
    torch.testing.assert_close(_features(enc), mae.encode(X))
    # the whole MAE (decoder too) initialises a Stage 1 module strictly
    module = MAEModule(arch="mae_vit_test", img_size=32, init_from=str(tmp_path / "mae_visualize.pth"))
    for k, v in mae.state_dict().items():
        torch.testing.assert_close(module.model.state_dict()[k], v)


@pytest.mark.bad_input
def test_a_release_with_part_of_the_decoder_is_refused_by_stage1_init(tmp_path, mae):
    """Stage 1 `init_from` a file that holds only part of the MAE decoder (one decoder block missing) →
    CheckpointError naming the missing decoder keys (only a file without any decoder starts it at random)."""
    state = {k: v for k, v in mae.state_dict().items() if not k.startswith("decoder_blocks.0.")}
    torch.save({"model": state}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing.*decoder_blocks\.0\."):
        MAEModule(arch="mae_vit_test", img_size=32, init_from=str(tmp_path / "partial.pth"))
    encoder_only = {k: v for k, v in mae.state_dict().items() if not is_decoder_key(k)}
    torch.save({"model": encoder_only}, tmp_path / "encoder.pth")
    module = MAEModule(arch="mae_vit_test", img_size=32, init_from=str(tmp_path / "encoder.pth"))
    for k, v in encoder_only.items():
        torch.testing.assert_close(module.model.state_dict()[k], v)


def test_authors_stage1_lightning_file(tmp_path, mae):
    ckpt = {"epoch": 399, "global_step": 10,
            "state_dict": {f"model.{k}": v for k, v in mae.state_dict().items()},
            "hyper_parameters": {"mask_ratio": 0.9}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    weights = read_encoder_weights(tmp_path / "last.ckpt")
    assert weights.fmt == "authors_stage1" and any(k.startswith("decoder_") for k in weights.dropped)
    enc = pacx.load_encoder(tmp_path / "last.ckpt", cfg=mae.cfg)
    torch.testing.assert_close(_features(enc), mae.encode(X))
    module = MAEModule(arch="mae_vit_test", img_size=32, init_from=str(tmp_path / "last.ckpt"))
    for k, v in mae.state_dict().items():  # decoder included
        torch.testing.assert_close(module.model.state_dict()[k], v)


def test_timm_weight_file_with_head(tmp_path):
    # 1000-class head
    theirs = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32).eval()
    torch.save(theirs.state_dict(), tmp_path / "vit_small.pth")
    enc = pacx.load_encoder(tmp_path / "vit_small.pth")
    assert enc.cfg.embed_dim == 384 and enc.cfg.img_size == 32 and enc.embed_dim == 384
    with torch.no_grad():
        torch.testing.assert_close(enc(X), theirs.forward_head(theirs.forward_features(X), pre_logits=True))


def test_export_loads_into_timm_strictly_with_same_features(tmp_path, stage1_run):
    out = export_encoder(stage1_run, tmp_path / "enc.safetensors")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["stage"] == "stage1_mae" and meta["git_sha"] and Path(meta["source"]).name == "last.ckpt"
    model = timm.create_model(meta["timm_model"], pretrained=False, num_classes=0,
                              **json.loads(meta["timm_kwargs"]))
    model.load_state_dict(tensors, strict=True)
    ours = pacx.load_encoder(stage1_run)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(X), ours(X))
        torch.testing.assert_close(pacx.load_encoder(out)(X), ours(X))
    assert not any(k.startswith(("decoder", "mask_token")) for k in tensors)


def test_export_script(tmp_path, stage1_run, repo):
    out = tmp_path / "e.safetensors"
    subprocess.run([sys.executable, str(repo / "scripts/export_encoder.py"), str(stage1_run), str(out)],
                   check=True, capture_output=True)
    assert out.is_file()


def test_shape_mismatch_lists_keys(tmp_path, mae):
    export_src = tmp_path / "m.pth"
    torch.save({"model": mae.state_dict()}, export_src)
    other = vit_config("vit_test", img_size=32, embed_dim=48, num_heads=2)
    with pytest.raises(CheckpointError,
                       match=r"shape mismatch.*cls_token: file \(1, 1, 32\) vs model \(1, 1, 48\)"):
        pacx.load_encoder(export_src, cfg=other)
    with pytest.raises(CheckpointError, match="pos_embed"):
        pacx.load_encoder(export_src, cfg=vit_config("vit_test", img_size=64))


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        pacx.load_encoder(tmp_path / "nope.pth")
    torch.save({"something": torch.zeros(1)}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="not an encoder format"):
        pacx.load_encoder(tmp_path / "odd.pth")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.ckpt"):
        pacx.load_encoder(tmp_path / "junk.ckpt")
    with pytest.raises(FileNotFoundError, match="run.json"):
        pacx.load_encoder(tmp_path)


def test_code_carrying_pickles_are_refused_everywhere(tmp_path, mae, repo, chexpert_release):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"model": mae.state_dict(), "extra": Payload(marker),
                "state_dict": {f"model.{k}": v for k, v in mae.state_dict().items()},
                "pacx": {"stage": "stage1_mae"}}, evil)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        pacx.load_encoder(evil)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        export_encoder(evil, tmp_path / "x.safetensors")
    res = subprocess.run([sys.executable, str(repo / "scripts/export_encoder.py"), str(evil),
                          str(tmp_path / "y")],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "refused to unpickle" in res.stderr
    from Stage1_MAE import main
    from tests.conftest import stage1_args

    with pytest.raises(CheckpointError, match="refused to unpickle"):
        main(stage1_args(tmp_path / "run", chexpert_release, "--ckpt_path", str(evil), "--trainer.max_steps",
                         "1"))
    assert not marker.exists()


def test_encoder_is_eval_mode_with_embed_dim(stage1_run):
    enc = pacx.load_encoder(stage1_run)
    assert not enc.training and enc.embed_dim == 32
    assert enc(X).shape == (2, 32)


def test_vit_encoder_round_trip_via_plain_state_dict(tmp_path):
    enc = create_vit("vit_test", img_size=32).eval()
    torch.save(enc.state_dict(), tmp_path / "plain.pth")
    loaded = pacx.load_encoder(tmp_path / "plain.pth", cfg=enc.cfg)
    torch.testing.assert_close(_features(loaded), _features(enc))


def test_export_under_any_file_name_loads_back_as_safetensors(tmp_path, stage1_run):
    """The export writes safetensors whatever OUT is called (scripts/export_encoder.py takes any name); the
    loader must read it by content, not hand it to torch.load (which called it an unsafe pickle)."""
    ref = export_encoder(stage1_run, tmp_path / "enc.safetensors")
    for name in ("enc.bin", "encoder"):
        out = export_encoder(stage1_run, tmp_path / name)
        weights = read_encoder_weights(out)
        assert weights.fmt == "pacx_export" and weights.stage == "stage1_mae"
        with safe_open(str(ref), "pt") as f:
            expected = {k: f.get_tensor(k) for k in f.keys()}
        assert set(weights.state) == set(expected)
        for k, v in expected.items():
            assert torch.equal(weights.state[k], v), k
        torch.testing.assert_close(_features(pacx.load_encoder(out)), _features(pacx.load_encoder(ref)),
                                   atol=0, rtol=0)
    # a pickle is still only ever opened with weights_only=True, whatever its name
    pickled = tmp_path / "release.safetensors.pth"
    torch.save({"model": create_vit("vit_test", img_size=32).state_dict()}, pickled)
    assert read_encoder_weights(pickled).fmt == "mae_release"


def test_state_fingerprint_covers_zero_dim_tensors():
    from pacx.weights.checkpoint import state_fingerprint

    a, b = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    assert state_fingerprint(a) == state_fingerprint(b)  # num_batches_tracked: a 0-dim int64 buffer
    b.num_batches_tracked += 1
    assert state_fingerprint(a) != state_fingerprint(b)
    # the hash of tensors with dimensions is unchanged: each one's bytes in memory order
    enc = create_vit("vit_test", img_size=32)
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(enc.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    assert state_fingerprint(enc) == h.hexdigest()


def _save_in_a_loop(out: str, value: float, rounds: int) -> None:
    from pacx.weights.checkpoint import save_safetensors

    state = {"w": torch.full((1024, 1024), value)}
    for _ in range(rounds):
        save_safetensors(state, out, {"value": str(value)})


def test_two_processes_saving_the_same_safetensors_file_never_collide(tmp_path):
    """Two writers of one export path (two jobs exporting the same run): each write goes through its own
    temporary file, so neither fails and the file always holds one whole state (a shared temporary name let
    one writer rename or delete the other's file mid-write)."""
    import multiprocessing

    from pacx.weights.checkpoint import load_safetensors

    out = tmp_path / "encoder.safetensors"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_save_in_a_loop, args=(str(out), v, 40)) for v in (1.0, 2.0)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    tensors, meta = load_safetensors(out)
    assert torch.equal(tensors["w"], torch.full((1024, 1024), float(meta["value"])))
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left behind


def test_a_copied_run_directory_reads_its_own_checkpoint(tmp_path, stage1_run):
    """run.json names its checkpoints by absolute path: a copy of the run directory (a backup, a run moved
    to another disk) must read the checkpoint inside the copy, not the original's, whose weights may have
    changed since (a resumed or rerun run)."""
    from pacx.weights.checkpoint import safe_torch_load

    copy = tmp_path / "copy"
    shutil.copytree(stage1_run, copy)
    ckpt = safe_torch_load(copy / "checkpoints" / "last.ckpt")
    ckpt["state_dict"] = {k: v + 1 if k.endswith("cls_token") else v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, copy / "checkpoints" / "last.ckpt")  # the copy's weights now differ from the original
    weights = read_encoder_weights(copy)
    assert Path(weights.source) == copy / "checkpoints" / "last.ckpt"
    torch.testing.assert_close(weights.state["cls_token"], ckpt["state_dict"]["model.cls_token"])
    original = read_encoder_weights(stage1_run).state["cls_token"]
    assert (weights.state["cls_token"] - original).abs().max().item() == 1.0
