"""Labs DAE: layout, masked corruption, masked loss, strict loading of the authors' checkpoints."""

import pytest
import torch

from pacx.models.labs_dae import LabsDAE, corrupt, load_labs_dae, masked_mse
from pacx.weights.checkpoint import CheckpointError


def _batch(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n, 50, generator=g)
    observed = (torch.rand(n, 50, generator=g) < 0.7).float()
    return values, observed


def test_architecture_and_keys():
    model = LabsDAE()
    keys = list(model.state_dict())
    assert keys == ["encoder.0.weight", "encoder.0.bias", "encoder.1.weight", "encoder.1.bias",
                    "encoder.3.weight", "encoder.3.bias", "decoder.0.weight", "decoder.0.bias",
                    "decoder.2.weight", "decoder.2.bias"]
    assert model.encoder[0].weight.shape == (512, 100) and model.encoder[3].weight.shape == (256, 512)
    assert model.decoder[2].weight.shape == (50, 512) and isinstance(model.decoder[3], torch.nn.Sigmoid)
    assert sum(p.numel() for p in model.parameters()) == 100 * 512 + 512 + 2 * 512 + 512 * 256 + 256 + \
        256 * 512 + 512 + 512 * 50 + 50
    values, observed = _batch(4)
    recon, z = model(values, observed)
    assert z.shape == (4, 256) and recon.shape == (4, 50) and ((recon > 0) & (recon < 1)).all()


def test_corruption_hides_only_observed_entries():
    values, observed = _batch()
    x, m, hidden = corrupt(values, observed, 0.15, torch.Generator().manual_seed(1))
    assert not (hidden & (observed == 0)).any()  # missing entries are never "hidden"
    assert torch.equal(m, observed * (~hidden).float())
    assert (x[m == 0] == 0).all() and torch.equal(x[m == 1], values[m == 1])  # placeholders zeroed
    frac = hidden.sum() / observed.sum()
    assert abs(frac.item() - 0.15) < 0.01


def test_masked_mse_counts_only_masked_entries():
    pred, target = torch.rand(3, 50), torch.rand(3, 50)
    mask = torch.zeros(3, 50, dtype=torch.bool)
    mask[0, :5] = True
    mask[2, 10] = True
    expected = ((pred - target)[mask] ** 2).mean()
    torch.testing.assert_close(masked_mse(pred, target, mask), expected)
    pred2 = pred.clone()
    pred2[~mask] += 10
    torch.testing.assert_close(masked_mse(pred2, target, mask), expected)
    assert masked_mse(pred, target, torch.zeros_like(mask)) == 0


def test_masked_mse_counts_exactly_under_bf16_autocast():
    """Under bf16-mixed the decoder's output is bf16; the observed count (9,014 here, a full batch of 256)
    must not be rounded to bf16 (9,024), so the loss is sum / count exactly."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(256, 50, generator=g).bfloat16(), torch.rand(256, 50, generator=g)
    mask = torch.rand(256, 50, generator=g) < 0.706
    assert mask.sum() == 9014
    expected = ((pred.double() - target.double()) ** 2)[mask].sum() / 9014
    assert masked_mse(pred, target, mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_encode_uses_raw_placeholders_unless_asked():
    model = LabsDAE().eval()
    values, observed = _batch(8)
    raw = model.encode(values, observed)
    zeroed = model.encode(values, observed, zero_missing=True)
    torch.testing.assert_close(model.encoder(torch.cat([values, observed], 1)), raw)
    torch.testing.assert_close(model.encoder(torch.cat([values * observed, observed], 1)), zeroed)
    with pytest.raises(ValueError, match=r"\[N, 50\]"):
        model.encode(values[:, :40], observed[:, :40])


def test_authors_lightning_checkpoint_loads_strictly(tmp_path):
    model = LabsDAE().eval()
    torch.save({"epoch": 49, "global_step": 1950,
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "dae.ckpt")
    loaded = load_labs_dae(tmp_path / "dae.ckpt")
    values, observed = _batch(4)
    torch.testing.assert_close(loaded.encode(values, observed), model.encode(values, observed))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["model.encoder.9.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "extra.ckpt")
    with pytest.raises(CheckpointError, match="unexpected keys.*encoder.9.weight"):
        load_labs_dae(tmp_path / "extra.ckpt")
    del state["model.encoder.9.weight"], state["model.decoder.0.bias"]
    torch.save({"state_dict": state}, tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match="missing keys.*decoder.0.bias"):
        load_labs_dae(tmp_path / "missing.ckpt")


@pytest.mark.bad_input
def test_a_debug_run_checkpoint_is_refused_as_a_teacher(tmp_path, monkeypatch):
    """Labs DAE checkpoint of a debug run (`pacx.debug` flags set) given as the teacher → DebugRunError naming
    the file, unless debug inputs are allowed (PACX_ALLOW_DEBUG=1)."""
    from pacx.debug import ALLOW_ENV, DebugRunError

    model = LabsDAE()
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "pacx": {"stage": "labs_dae", "debug": {"limit_train_batches": 2}}}, ckpt)
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(DebugRunError, match=r"labs DAE checkpoint .*last\.ckpt comes from a debug run"):
        load_labs_dae(ckpt)
    monkeypatch.setenv(ALLOW_ENV, "1")
    loaded = load_labs_dae(ckpt)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_features_do_not_depend_on_batch_composition_or_train_mode():
    """A row's embedding is the same encoded alone, in batches of 7 or 64, or with the module in train mode
    (no dropout or batch norm); a row with no observed lab still encodes to finite numbers."""
    torch.manual_seed(0)
    model = LabsDAE().eval()
    values, observed = _batch(150, seed=3)
    observed[5] = 0
    with torch.no_grad():
        full = model.encode(values, observed)
        for size in (1, 7, 64):
            parts = torch.cat([model.encode(values[i:i + size], observed[i:i + size])
                               for i in range(0, len(values), size)])
            torch.testing.assert_close(parts, full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.train().encode(values, observed), full)
    assert torch.isfinite(full[5]).all()
