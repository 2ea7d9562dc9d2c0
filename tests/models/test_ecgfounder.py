"""ECGFounder teacher: release-compatible state dict, block semantics, strict loading, safe pickles,
conversion to safetensors, and the official preprocessing (docs/ecgfounder.md).

The reference key list is written here from docs/ecgfounder.md#keys, independently of the module.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import signal

from pacx.constants import ECG_EMBED_DIM
from pacx.models.ecg_preprocess import lead_indices, median_baseline
from pacx.models.ecgfounder import (
    ECGFOUNDER_CONFIGS,
    MIMIC_LEAD_ORDER,
    STANDARD_LEAD_ORDER,
    BasicBlock,
    SamePadConv1d,
    SamePadMaxPool1d,
    create_ecgfounder,
    load_ecgfounder,
    preprocess_ecg,
    same_padding,
    strip_dataparallel_prefix,
)
from pacx.weights.checkpoint import CheckpointError, load_safetensors
from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[2]
FS = 500.0

# docs/ecgfounder.md#configuration (12-lead release) and our demo_small / 1_lead
# entries, written out independently.
REFERENCE_ARCHS: dict[str, dict] = {
    "12_lead": dict(in_ch=12, base=64, filters=(64, 160, 160, 400, 400, 1024, 1024),
                    blocks=(2, 2, 2, 3, 3, 4, 4)),
    "1_lead": dict(in_ch=1, base=64, filters=(64, 160, 160, 400, 400, 1024, 1024),
                   blocks=(2, 2, 2, 3, 3, 4, 4)),
    "demo_small": dict(in_ch=12, base=16, filters=(16, 32, 32, 64, 64, 128, 128), blocks=(1,) * 7),
}


def reference_shapes(in_ch: int, base: int, filters: tuple[int, ...], blocks: tuple[int, ...],
                     n_classes: int = 150, kernel: int = 16,
                     group_width: int = 16) -> list[tuple[str, tuple]]:
    """(key, shape) in the official order, from docs/ecgfounder.md#keys."""
    def bn(prefix: str, c: int) -> list[tuple[str, tuple]]:
        return [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,)), (f"{prefix}.running_mean", (c,)),
                (f"{prefix}.running_var", (c,)), (f"{prefix}.num_batches_tracked", ())]

    def conv(prefix: str, cout: int, cin: int, k: int) -> list[tuple[str, tuple]]:
        return [(f"{prefix}.conv.weight", (cout, cin, k)), (f"{prefix}.conv.bias", (cout,))]

    keys = conv("first_conv", base, in_ch, kernel) + bn("first_bn", base)
    cin = base
    for s, (c, m) in enumerate(zip(filters, blocks)):
        for b in range(m):
            p = f"stage_list.{s}.block_list.{b}."
            keys += (bn(p + "bn1", cin) + conv(p + "conv1", c, cin, 1) + bn(p + "bn2", c)
                     + conv(p + "conv2", c, group_width, kernel) + bn(p + "bn3", c)
                     + conv(p + "conv3", c, c, 1)
                     + [(p + "se_fc1.weight", (c // 2, c)), (p + "se_fc1.bias", (c // 2,)),
                        (p + "se_fc2.weight", (c, c // 2)), (p + "se_fc2.bias", (c,))])
            cin = c
    if n_classes:
        keys += [("dense.weight", (n_classes, filters[-1])), ("dense.bias", (n_classes,))]
    return keys


def fake_release_state(arch: str, seed: int = 0, head: bool = True) -> dict[str, torch.Tensor]:
    """Random tensors under the official names and shapes (small weights keep activations finite)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in reference_shapes(**REFERENCE_ARCHS[arch], n_classes=150 if head else 0):
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.05
    return state


# --------------------------------------------------------------------------------------------------
# State dict and parameter counts


def test_every_config_has_a_reference():
    assert set(ECGFOUNDER_CONFIGS) == set(REFERENCE_ARCHS)


@pytest.mark.parametrize("arch", sorted(REFERENCE_ARCHS))
def test_state_dict_names_shapes_and_order_match_the_release(arch):
    model = create_ecgfounder(arch)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == reference_shapes(**REFERENCE_ARCHS[arch])
    assert model.embed_dim == REFERENCE_ARCHS[arch]["filters"][-1]


def test_release_key_count_and_parameter_counts():
    model = create_ecgfounder("12_lead")
    assert len(model.state_dict()) == 509
    assert sum(p.numel() for p in model.parameters()) == 30_819_014
    assert sum(b.numel() for b in model.buffers()) == 66_429
    assert sum(p.numel() for p in create_ecgfounder("12_lead", head=False).parameters()) == 30_665_264
    assert sum(p.numel() for p in create_ecgfounder("1_lead").parameters()) == 30_807_750
    assert model.embed_dim == ECG_EMBED_DIM == 1024

    bn = sum(p.numel() for n, p in model.named_parameters() if ".bn" in n or n.startswith("first_bn"))
    assert bn == 66_368 and sum(p.numel() for p in model.dense.parameters()) == 153_750
    assert sum(p.numel() for p in model.first_conv.parameters()) == 12_352
    used = [sum(p.numel() for n, p in stage.named_parameters() if ".bn" not in n)
            for stage in model.stage_list]
    assert used == [57_920, 221_600, 236_960, 1_656_600, 1_752_600, 13_010_944, 13_649_920]
    assert 30_819_014 - bn == 30_752_646


def test_se_reduction_is_two_and_only_the_first_block_skips_the_first_swish():
    model = create_ecgfounder("12_lead")
    blocks = [blk for stage in model.stage_list for blk in stage.block_list]
    assert len(blocks) == 20
    assert all(blk.se_fc1.out_features == blk.out_channels // 2 for blk in blocks)
    assert [blk.is_first_block for blk in blocks] == [True] + [False] * 19
    assert [blk.max_pool is not None for blk in blocks] == [i in (0, 2, 4, 6, 9, 12, 16) for i in range(20)]


# --------------------------------------------------------------------------------------------------
# Block semantics (docs/ecgfounder.md#blocks)


@pytest.mark.parametrize(("length", "stride", "expected"), [
    (100, 1, (7, 8)), (101, 1, (7, 8)), (100, 2, (7, 7)), (101, 2, (7, 8)), (5000, 2, (7, 7)),
])
def test_same_padding_kernel_16(length, stride, expected):
    assert same_padding(length, 16, stride) == expected
    conv = SamePadConv1d(3, 4, 16, stride=stride)
    x = torch.randn(2, 3, length)
    ref = F.conv1d(F.pad(x, expected), conv.conv.weight, conv.conv.bias, stride=stride)
    out = conv(x)
    assert out.shape[-1] == math.ceil(length / stride)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_pointwise_conv_is_unpadded():
    assert same_padding(313, 1, 1) == (0, 0)


def test_max_pool_pads_with_zero_on_the_right():
    pool = SamePadMaxPool1d(2)
    odd = -(torch.arange(5.0) + 1).view(1, 1, 5)  # -1 .. -5, all negative
    assert pool(odd).flatten().tolist() == [-1.0, -3.0, 0.0]  # last = max(-5, 0)
    assert pool(odd[..., :4]).flatten().tolist() == [-1.0, -3.0]  # even: the pad column is dropped


@pytest.mark.parametrize(("cin", "cout", "groups", "before"), [(16, 48, 3, 16), (3, 6, 6, 1)])
def test_shortcut_zero_channels_split_on_both_sides(cin, cout, groups, before):
    block = BasicBlock(cin, cout, kernel_size=16, stride=2, groups=groups, downsample=False)
    with torch.no_grad():  # silence the branch: the output is the shortcut alone
        block.conv3.conv.weight.zero_()
        block.conv3.conv.bias.zero_()
    x = torch.randn(2, cin, 31)
    out = block(x)
    after = cout - cin - before
    assert out.shape == (2, cout, 31)
    torch.testing.assert_close(out[:, before:before + cin], x)
    assert out[:, :before].abs().max() == 0 and out[:, cout - after:].abs().max() == 0


def manual_block(blk: BasicBlock, x: torch.Tensor, first: bool, downsample: bool) -> torch.Tensor:
    """docs/ecgfounder.md#blocks written out with functional ops."""
    def same(h: torch.Tensor, conv: torch.nn.Conv1d, stride: int) -> torch.Tensor:
        k, length = conv.kernel_size[0], h.shape[-1]
        total = max(0, (math.ceil(length / stride) - 1) * stride + k - length)
        return F.conv1d(F.pad(h, (total // 2, total - total // 2)), conv.weight, conv.bias, stride=stride,
                        groups=conv.groups)

    h = x if first else F.silu(x)
    h = F.silu(same(h, blk.conv1.conv, 1))
    h = F.silu(same(h, blk.conv2.conv, 2 if downsample else 1))
    h = same(h, blk.conv3.conv, 1)
    z = h.mean(-1)
    gate = torch.sigmoid(F.linear(F.silu(F.linear(z, blk.se_fc1.weight, blk.se_fc1.bias)),
                                  blk.se_fc2.weight, blk.se_fc2.bias))
    h = h * gate[..., None]
    short = F.max_pool1d(F.pad(x, (0, 1)), 2) if downsample else x
    extra = h.shape[1] - x.shape[1]
    short = torch.cat([x.new_zeros(x.shape[0], extra // 2, short.shape[-1]), short,
                       x.new_zeros(x.shape[0], extra - extra // 2, short.shape[-1])], dim=1)
    return h + short


def test_blocks_match_the_written_description():
    torch.manual_seed(0)
    model = create_ecgfounder("demo_small").eval()
    first, widen = model.stage_list[0].block_list[0], model.stage_list[1].block_list[0]
    keep = BasicBlock(32, 32, 16, 2, groups=2, downsample=False)
    seen = {}
    first.conv1.register_forward_pre_hook(lambda m, args: seen.__setitem__("first", args[0]))
    widen.conv1.register_forward_pre_hook(lambda m, args: seen.__setitem__("widen", args[0]))
    x16, x32 = torch.randn(2, 16, 79), torch.randn(2, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(first(x16), manual_block(first, x16, first=True, downsample=True))
        torch.testing.assert_close(widen(x16), manual_block(widen, x16, first=False, downsample=True))
        torch.testing.assert_close(keep(x32), manual_block(keep, x32, first=False, downsample=False))
    assert torch.equal(seen["first"], x16)  # no Swish before conv1 in the network's first block
    torch.testing.assert_close(seen["widen"], F.silu(x16))
    assert widen(x16).shape == (2, 32, 40)


def test_shape_trace_of_the_release_configuration():
    model = create_ecgfounder("12_lead").eval()
    shapes = {}
    model.first_conv.register_forward_hook(lambda m, a, out: shapes.__setitem__("stem", tuple(out.shape)))
    for i, stage in enumerate(model.stage_list):
        stage.register_forward_hook(lambda m, a, out, i=i: shapes.__setitem__(i, tuple(out.shape)))
    with torch.no_grad():
        feats = model(torch.randn(2, 12, 5000))
        logits = model.forward_head(feats)
    assert shapes == {"stem": (2, 64, 2500), 0: (2, 64, 1250), 1: (2, 160, 625), 2: (2, 160, 313),
                      3: (2, 400, 157), 4: (2, 400, 79), 5: (2, 1024, 40), 6: (2, 1024, 20)}
    assert feats.shape == (2, 1024) and logits.shape == (2, 150)
    with pytest.raises(ValueError, match=r"\[B, 12, T\]"):
        model(torch.randn(2, 5000, 12))


# --------------------------------------------------------------------------------------------------
# Loading


def test_official_release_layout_loads_strictly(tmp_path):
    state = fake_release_state("12_lead")
    path = tmp_path / "12_lead_ECGFounder.pth"
    torch.save({"epoch": 7, "step": 1000, "state_dict": state, "val_auroc": 0.9}, path)
    model = load_ecgfounder(path)
    assert not model.training and model.dense is None and model.embed_dim == 1024
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = torch.randn(2, 12, 5000)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert a.shape == (2, 1024) and torch.isfinite(a).all() and torch.equal(a, b)
    with pytest.raises(RuntimeError, match="no classification head"):
        model.forward_head(a)


def test_dataparallel_prefix_and_head(tmp_path):
    state = fake_release_state("demo_small")
    prefixed = {f"module.{k}": v for k, v in state.items()}
    assert strip_dataparallel_prefix(prefixed) == state and "module.dense.bias" in prefixed  # pure
    torch.save({"state_dict": prefixed}, tmp_path / "dp.pth")
    model = load_ecgfounder(tmp_path / "dp.pth", config="demo_small", head=True)
    torch.testing.assert_close(model.dense.weight, state["dense.weight"])
    with torch.no_grad():
        assert model.logits(torch.randn(1, 12, 1000)).shape == (1, 150)


@pytest.mark.parametrize(("edit", "named"), [
    (lambda s: s.pop("stage_list.3.block_list.0.bn2.running_var"),
     "stage_list.3.block_list.0.bn2.running_var"),
    (lambda s: s.__setitem__("stage_list.0.block_list.0.extra.weight", torch.zeros(1)),
     "stage_list.0.block_list.0.extra.weight"),
    (lambda s: s.__setitem__("first_conv.conv.weight", torch.zeros(16, 8, 16)), "first_conv.conv.weight"),
])
def test_mismatched_keys_are_named(tmp_path, edit, named):
    state = fake_release_state("demo_small")
    edit(state)
    torch.save({"state_dict": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        load_ecgfounder(tmp_path / "bad.pth", config="demo_small")


def test_head_requested_but_absent(tmp_path):
    torch.save({"state_dict": fake_release_state("demo_small", head=False)}, tmp_path / "headless.pth")
    load_ecgfounder(tmp_path / "headless.pth", config="demo_small")  # fine without the head
    with pytest.raises(CheckpointError, match=r"dense\.bias"):
        load_ecgfounder(tmp_path / "headless.pth", config="demo_small", head=True)


def test_not_a_state_dict_is_refused(tmp_path):
    torch.save({"model": [1, 2, 3]}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="state_dict"):
        load_ecgfounder(tmp_path / "odd.pth", config="demo_small")


class Payload:
    """Unpickling this would create a directory: the proof that a pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    state = fake_release_state("demo_small")
    torch.save({"state_dict": state, "payload": Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="trust_pickle"):
        load_ecgfounder(tmp_path / "evil.pth", config="demo_small")
    assert not marker.exists()


def test_trust_pickle_opt_in_is_logged(tmp_path, caplog):
    state = fake_release_state("demo_small")
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "release.pth")
    with pytest.raises(CheckpointError):
        load_ecgfounder(tmp_path / "release.pth", config="demo_small")
    with caplog.at_level(logging.WARNING, logger="pacx.models.ecgfounder"):
        model = load_ecgfounder(tmp_path / "release.pth", config="demo_small", trust_pickle=True)
    assert any("trust_pickle=True" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    torch.testing.assert_close(model.first_conv.conv.weight, state["first_conv.conv.weight"])


@pytest.mark.bad_input
@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_unreadable_release_with_trust_pickle_names_the_file(tmp_path, caplog, damage):
    """A truncated or non-checkpoint ECGFounder file, with trust_pickle → CheckpointError naming the file
    ("not a readable torch checkpoint"), not a bare torch error from the full unpickle."""
    path = tmp_path / "release.pth"
    torch.save({"state_dict": fake_release_state("demo_small")}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else bytes(range(256)) * 4)
    with caplog.at_level(logging.WARNING, logger="pacx.models.ecgfounder"):
        with pytest.raises(CheckpointError, match=f"{path}: not a readable torch checkpoint"):
            load_ecgfounder(path, config="demo_small", trust_pickle=True)
    unpickled = any("unpickled in full" in r.getMessage() for r in caplog.records)
    assert unpickled == (damage == "random bytes")  # a truncated zip is not a refusal: no full unpickle


def test_convert_script_writes_safetensors_that_load_identically(tmp_path):
    src, out = tmp_path / "release.pth", tmp_path / "ecgfounder.safetensors"
    optimizer = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}
    torch.save({"state_dict": fake_release_state("demo_small"), "optimizer": optimizer, "epoch": 3}, src)
    assert load_script("convert_ecgfounder").main([str(src), str(out), "--config", "demo_small"]) == 0
    tensors, meta = load_safetensors(out)
    assert meta["config"] == "demo_small" and "dense.weight" in tensors and len(tensors) == len(
        reference_shapes(**REFERENCE_ARCHS["demo_small"]))
    x = torch.randn(2, 12, 5000)
    with torch.no_grad():
        ref = load_ecgfounder(src, config="demo_small")(x)
        assert torch.equal(load_ecgfounder(out, config="demo_small")(x), ref)
    with pytest.raises(CheckpointError):  # the wrong architecture is caught before writing
        load_script("convert_ecgfounder").main([str(src), str(tmp_path / "wrong.safetensors"), "--config",
                                                "1_lead"])
    assert not (tmp_path / "wrong.safetensors").exists()


def test_a_converted_teacher_under_any_name_loads_by_content_and_a_failed_write_leaves_nothing(
        tmp_path, monkeypatch):
    """The converter writes safetensors whatever OUT is called; the loader reads it by content (a ``.bin``
    name used to go to torch.load, which called it an unsafe pickle). The write is atomic: a failure inside
    it leaves no file under the final name."""
    import pacx.weights.checkpoint as checkpoint

    src = tmp_path / "release.pth"
    torch.save({"state_dict": fake_release_state("demo_small")}, src)
    out = tmp_path / "teacher.bin"
    load_script("convert_ecgfounder").main([str(src), str(out), "--config", "demo_small"])
    x = torch.randn(2, 12, 5000)
    with torch.no_grad():
        assert torch.equal(load_ecgfounder(out, config="demo_small")(x),
                           load_ecgfounder(src, config="demo_small")(x))

    def half_written(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        load_script("convert_ecgfounder").main([str(src), str(tmp_path / "t.safetensors"), "--config",
                                                "demo_small"])
    assert not (tmp_path / "t.safetensors").exists() and not (tmp_path / ".t.safetensors.tmp").exists()


# --------------------------------------------------------------------------------------------------
# Preprocessing (docs/ecgfounder.md#preprocessing)


def synthetic_ecg(n_records: int = 3, seed: int = 0, n_samples: int = 5000) -> np.ndarray:
    """Symile layout [N, 1, T, 12] float32 in mV: P-QRS-T beats with per-lead gains plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_samples) / FS
    out = np.empty((n_records, 1, n_samples, 12), np.float32)
    for r in range(n_records):
        rr = rng.uniform(0.7, 1.1)
        beat = np.zeros(n_samples)
        for onset in np.arange(rng.uniform(0.1, rr), t[-1], rr):
            for offset, width, amp in ((-0.18, 0.025, 0.15), (0.0, 0.01, 1.0), (0.03, 0.012, -0.25),
                                       (0.25, 0.04, 0.3)):
                beat += amp * np.exp(-0.5 * ((t - onset - offset) / width) ** 2)
        gains = rng.uniform(0.3, 1.5, 12) * rng.choice([-1, 1], 12)
        out[r, 0] = beat[:, None] * gains + 0.01 * rng.standard_normal((n_samples, 12))
    return out


def reference_preprocess(record: np.ndarray, source_order: tuple[str, ...]) -> np.ndarray:
    """The official per-record, per-lead pipeline with literal scipy calls; record is [T, 12]."""
    sig = np.where(np.isnan(record), 0.0, record.astype(np.float64)).T
    sig = sig[[source_order.index(lead) for lead in STANDARD_LEAD_ORDER]]
    leads = []
    for lead in sig:
        b, a = signal.iirnotch(50.0, 30.0, fs=FS)
        y = signal.filtfilt(b, a, lead)
        b, a = signal.butter(4, [0.67 / (FS / 2), 40.0 / (FS / 2)], btype="bandpass")
        y = signal.filtfilt(b, a, y)
        leads.append(y - signal.medfilt(y, int(0.4 * FS) + 1))
    out = np.stack(leads)
    return (out - out.mean()) / (out.std() + 1e-8)


def power_share(x: np.ndarray, hz: float) -> float:
    """Share of the total spectral power of [L, T] that sits in the FFT bin at ``hz``."""
    power = np.abs(np.fft.rfft(x, axis=-1)) ** 2
    return float(power[:, round(hz * x.shape[-1] / FS)].sum() / power.sum())


def test_vectorised_batch_equals_the_official_per_record_loop():
    x = synthetic_ecg(3)
    x[1, 0, 100:180, 4] = np.nan
    out = preprocess_ecg(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (3, 12, 5000)
    ref = np.stack([reference_preprocess(rec[0], MIMIC_LEAD_ORDER) for rec in x])
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5)
    for layout, arr in (("NTL", x[:, 0]), ("NLT", x[:, 0].transpose(0, 2, 1))):
        np.testing.assert_array_equal(preprocess_ecg(arr, layout=layout), out)
    np.testing.assert_array_equal(preprocess_ecg(torch.from_numpy(x)), out)


@pytest.mark.parametrize("kernel", [5, 201])
def test_median_baseline_equals_scipy_medfilt(kernel):
    x = np.random.default_rng(0).standard_normal((2, 3, 700)) + 3.0  # positive: zero padding shows at edges
    ref = np.stack([[signal.medfilt(row, kernel) for row in rec] for rec in x])
    np.testing.assert_array_equal(median_baseline(x, kernel), ref)


def test_mimic_order_swaps_avf_and_avl():
    assert lead_indices(MIMIC_LEAD_ORDER, STANDARD_LEAD_ORDER) == [0, 1, 2, 3, 5, 4, 6, 7, 8, 9, 10, 11]
    x = synthetic_ecg(2)
    mimic, as_is = preprocess_ecg(x, MIMIC_LEAD_ORDER), preprocess_ecg(x, STANDARD_LEAD_ORDER)
    np.testing.assert_array_equal(mimic[:, 4], as_is[:, 5])
    np.testing.assert_array_equal(mimic[:, 5], as_is[:, 4])
    keep = [0, 1, 2, 3, *range(6, 12)]
    np.testing.assert_array_equal(mimic[:, keep], as_is[:, keep])
    assert not np.array_equal(mimic[:, 4], mimic[:, 5])


def test_global_zscore_per_record():
    x = synthetic_ecg(3) * np.array([1.0, 1000.0, 0.01], np.float32)[:, None, None, None]  # mV, µV, ...
    out = preprocess_ecg(x).reshape(3, -1).astype(np.float64)
    np.testing.assert_allclose(out.mean(1), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(1), 1.0, atol=1e-4)
    per_lead_std = preprocess_ecg(x).std(-1)
    assert (per_lead_std.max(1) / per_lead_std.min(1) > 1.5).all()  # leads are not scaled one by one


def test_flat_leads_nan_and_empty_records_stay_finite():
    x = synthetic_ecg(3)
    x[0, 0, :, 3] = 2.0  # flat lead
    x[0, 0, 1000:1300, 7] = np.nan
    x[1] = 0.7  # a flat record
    x[2] = np.nan  # nothing recorded
    out = preprocess_ecg(x)
    assert np.isfinite(out).all()
    assert np.abs(out[2]).max() == 0


def test_50hz_mains_is_removed():
    x = synthetic_ecg(1)
    t = np.arange(5000) / FS
    noisy = x + (0.3 * np.sin(2 * np.pi * 50.0 * t))[None, None, :, None].astype(np.float32)
    before = power_share(preprocess_ecg(noisy, filtering=False)[0], 50.0)
    after = power_share(preprocess_ecg(noisy)[0], 50.0)
    assert before > 0.1 and after < before * 1e-4  # > 40 dB


def test_baseline_drift_is_removed():
    x = synthetic_ecg(1)
    t = np.arange(5000) / FS
    drifting = x + (2.0 * np.sin(2 * np.pi * 0.1 * t))[None, None, :, None].astype(np.float32)
    before = power_share(preprocess_ecg(drifting, filtering=False)[0], 0.1)
    after = power_share(preprocess_ecg(drifting)[0], 0.1)
    assert before > 0.5 and after < before * 1e-3


@pytest.mark.parametrize(("shape", "kwargs", "message"), [
    ((2, 12, 5000), {}, r"'N1TL' must have shape \[N, 1, 5000, 12\], got \[2, 12, 5000\]"),
    ((2, 1, 2500, 12), {}, r"\[N, 1, 5000, 12\], got \[2, 1, 2500, 12\]"),
    ((2, 5000, 12), {}, r"got \[2, 5000, 12\]"),
    ((2, 1, 5000, 12), {"layout": "NTL"}, r"'NTL' must have shape \[N, 5000, 12\]"),
    ((2, 12, 5000), {"layout": "NCT"}, "unknown ECG layout"),
    ((2, 1, 5000, 12), {"source_lead_order": STANDARD_LEAD_ORDER[:11]}, r"\[N, 1, 5000, 11\]"),
    ((2, 1, 5000, 12), {"source_lead_order": ("I",) * 12}, "duplicate"),
])
def test_bad_layouts_raise(shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        preprocess_ecg(np.zeros(shape, np.float32), **kwargs)


def test_other_sample_counts_and_lead_subsets():
    x = synthetic_ecg(2, n_samples=2500)
    assert preprocess_ecg(x, n_samples=2500).shape == (2, 12, 2500)
    one = preprocess_ecg(synthetic_ecg(2), target_lead_order=("I",))
    assert one.shape == (2, 1, 5000)
    model = create_ecgfounder("1_lead", head=False).eval()
    with torch.no_grad():
        assert model(torch.from_numpy(one)).shape == (2, 1024)


@pytest.mark.bad_input
def test_a_non_tensor_entry_under_state_dict_is_named(tmp_path):
    """An ECGFounder checkpoint whose 'state_dict' holds a non-tensor entry → CheckpointError naming the file
    and that key (not "found ['state_dict']", which reads as if 'state_dict' were missing)."""
    state: dict = fake_release_state("demo_small")
    state["stage_list.1.block_list.0.se_fc1.bias"] = [0.0] * 16  # a plain list: weights_only loads it
    path = tmp_path / "odd_entry.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    named = re.escape(str(path)) + r".*'stage_list\.1\.block_list\.0\.se_fc1\.bias'.*list"
    with pytest.raises(CheckpointError, match=named):
        load_ecgfounder(path, config="demo_small")


# --------------------------------------------------------------------------------------------------
# The whole network against an independent forward (docs/ecgfounder.md#blocks, #configuration)


def functional_net1d(state: dict[str, torch.Tensor], x: torch.Tensor, filters: tuple[int, ...],
                     blocks: tuple[int, ...], group_width: int = 16) -> torch.Tensor:
    """The description of docs/ecgfounder.md written with functional ops over the state dict alone (no
    module of pacx): stem, 7 stages, time mean -> [B, filters[-1]]."""
    def conv(h: torch.Tensor, prefix: str, stride: int = 1, groups: int = 1) -> torch.Tensor:
        w, b = state[prefix + ".conv.weight"], state[prefix + ".conv.bias"]
        length, k = h.shape[-1], w.shape[-1]
        total = max(0, (-(-length // stride) - 1) * stride + k - length)
        return F.conv1d(F.pad(h, (total // 2, total - total // 2)), w, b, stride=stride, groups=groups)

    def swish(h: torch.Tensor) -> torch.Tensor:
        return h * torch.sigmoid(h)

    h = swish(conv(x, "first_conv", stride=2))
    for s, (c, m) in enumerate(zip(filters, blocks)):
        for b in range(m):
            p = f"stage_list.{s}.block_list.{b}."
            cin = h.shape[1]
            out = conv(h if s == b == 0 else swish(h), p + "conv1")
            out = conv(swish(out), p + "conv2", stride=2 if b == 0 else 1, groups=c // group_width)
            out = conv(swish(out), p + "conv3")
            se = swish(out.mean(-1) @ state[p + "se_fc1.weight"].T + state[p + "se_fc1.bias"])
            out = out * torch.sigmoid(se @ state[p + "se_fc2.weight"].T + state[p + "se_fc2.bias"])[..., None]
            short = h
            if b == 0:  # pad one zero column on the right, then max over pairs
                short = F.pad(short, (0, short.shape[-1] % 2))
                short = short.reshape(*short.shape[:2], -1, 2).amax(-1)
            short = torch.cat([short.new_zeros(short.shape[0], (c - cin) // 2, short.shape[-1]), short,
                               short.new_zeros(short.shape[0], c - cin - (c - cin) // 2, short.shape[-1])], 1)
            h = out + short
    return h.mean(-1)


@pytest.mark.parametrize("length", [5000, 1203])  # 1203: odd lengths at the stem and in most stages
def test_whole_network_equals_an_independent_forward(tmp_path, length):
    state = {k: v * 4 for k, v in fake_release_state("demo_small", seed=3).items()}  # non-trivial activations
    torch.save({"state_dict": state}, tmp_path / "release.pth")
    model = load_ecgfounder(tmp_path / "release.pth", config="demo_small").double()
    x = torch.randn(3, 12, length, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    arch = REFERENCE_ARCHS["demo_small"]
    with torch.no_grad():
        ours = model(x)
        ref = functional_net1d({k: v.double() for k, v in state.items()}, x, arch["filters"], arch["blocks"])
    assert ours.shape == (3, 128) and ref.std() > 0.1
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_features_do_not_depend_on_the_batch_or_on_train_mode(tmp_path):
    """BatchNorm and dropout are never called: a row's feature is the same alone, in any batch, and with
    the module in training mode."""
    torch.save({"state_dict": fake_release_state("demo_small")}, tmp_path / "release.pth")
    model = load_ecgfounder(tmp_path / "release.pth", config="demo_small")
    x = torch.from_numpy(preprocess_ecg(synthetic_ecg(4, seed=2)))
    with torch.no_grad():
        batch = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
        reordered = model(x.flip(0)).flip(0)
        trained = model.train()(x)
    model.eval()
    torch.testing.assert_close(alone, batch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reordered, batch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trained, batch, rtol=0, atol=0)
