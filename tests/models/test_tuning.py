"""``apply_tuning``: exactly which encoder parameters train under each strategy (``linear_probe``,
``finetune``, ``lora``, ``last_n_blocks``, ``full``) and, for LoRA, each ``trainable_norms`` (all / final /
none), in ``apply_tuning`` and in the Stage 2 module, and the configs that choose it."""

from __future__ import annotations

import pytest
import torch
import yaml

from pacx.lit.pacx import PaCXModule
from pacx.models.tuning import TUNING_STRATEGIES, apply_tuning, count_parameters
from pacx.models.vit import create_vit
from pacx.weights.layout import merge_lora_state

DEPTH = 2  # vit_test


def expected_trainable(norms: str) -> set[str]:
    """The trainable parameter names of a LoRA-wrapped ``vit_test``, written out by hand."""
    prefix = "base_model.model."
    lora = {f"{prefix}blocks.{i}.{module}.lora_{ab}.default.weight"
            for i in range(DEPTH) for module in ("attn.qkv", "mlp.fc1", "mlp.fc2") for ab in "AB"}
    final = {f"{prefix}norm.weight", f"{prefix}norm.bias"}
    blocks = {f"{prefix}blocks.{i}.{n}.{w}"
              for i in range(DEPTH) for n in ("norm1", "norm2") for w in ("weight", "bias")}
    return lora | {"all": final | blocks, "final": final, "none": set()}[norms]


BLOCK_PARAMS = tuple(f"{m}.{w}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                     for w in ("weight", "bias"))
FINAL_NORM = {"norm.weight", "norm.bias"}
EVERYTHING_BUT_POSITIONS = ({"cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias"} | FINAL_NORM
                            | {f"blocks.{i}.{n}" for i in range(DEPTH) for n in BLOCK_PARAMS})
# strategy (with its options) -> the trainable parameter names of vit_test, written out by hand
TRAINABLE_BY_STRATEGY = {
    "linear_probe": ({}, set()),
    "finetune": ({}, EVERYTHING_BUT_POSITIONS),
    "lora": ({}, expected_trainable("all")),
    "last_n_blocks": ({"last_n_blocks": 1}, FINAL_NORM | {f"blocks.1.{n}" for n in BLOCK_PARAMS}),
    "full": ({}, EVERYTHING_BUT_POSITIONS),
}


def test_every_strategy_has_its_trainable_set():
    assert set(TRAINABLE_BY_STRATEGY) == set(TUNING_STRATEGIES)


@pytest.mark.parametrize("strategy", sorted(TRAINABLE_BY_STRATEGY))
def test_each_strategy_trains_exactly_its_parameters(strategy):
    options, expected = TRAINABLE_BY_STRATEGY[strategy]
    encoder = create_vit("vit_test", img_size=32)
    model = apply_tuning(encoder, strategy, **options)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    assert total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("norms", ["all", "final", "none"])
def test_lora_trains_exactly_the_chosen_norms(norms):
    encoder = create_vit("vit_test", img_size=32)
    assert len(encoder.blocks) == DEPTH
    model = apply_tuning(encoder, "lora", trainable_norms=norms)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected_trainable(norms)


@pytest.mark.parametrize("norms", ["all", "final", "none"])
def test_stage2_module_passes_trainable_norms_and_records_it(norms):
    module = PaCXModule(encoder_arch="vit_test", img_size=32, shared_dim=16, trainable_norms=norms)
    trainable = {n for n, p in module.cxr_encoder.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(norms)
    assert module.pacx_metadata()["trainable_norms"] == norms


def test_lora_defaults_rank_alpha_dropout_and_the_adapted_output():
    """docs/method.md#stage-2: rank 8, alpha 16 (scale 2), dropout 0.1 on qkv, fc1, fc2; in eval mode a
    wrapped linear gives W x + b + (alpha / r) · B A x, written out here."""
    model = apply_tuning(create_vit("vit_test", img_size=32), "lora")
    wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == {"qkv", "fc1", "fc2"} and len(wrapped) == 3 * DEPTH
    qkv = model.get_submodule("base_model.model.blocks.0.attn.qkv")
    a, b = qkv.lora_A["default"].weight, qkv.lora_B["default"].weight
    assert a.shape == (8, 32) and b.shape == (96, 8)
    assert qkv.lora_dropout["default"].p == pytest.approx(0.1)
    torch.nn.init.normal_(b)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    base = qkv.base_layer
    expected = x @ base.weight.T + base.bias + (16 / 8) * (x @ a.T @ b.T)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(qkv(x), expected)
    custom = apply_tuning(create_vit("vit_test", img_size=32), "lora", lora_r=4, lora_alpha=4,
                          lora_dropout=0.0)
    fc1 = custom.get_submodule("base_model.model.blocks.1.mlp.fc1")
    assert fc1.lora_A["default"].weight.shape[0] == 4 and fc1.scaling["default"] == 1.0


def test_merged_lora_is_w_plus_scaled_ba_and_gives_the_adapted_features():
    """Export merge at rank 4, alpha 12 (scale 3): W + 3 · B A per wrapped linear, written out for one; the
    merged plain ViT loads strictly and equals the LoRA model (eval)."""
    torch.manual_seed(0)
    model = apply_tuning(create_vit("vit_test", img_size=32), "lora", lora_r=4, lora_alpha=12)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    model.eval()
    merged = merge_lora_state(model.state_dict(), 12 / 4)
    fc2 = model.get_submodule("base_model.model.blocks.1.mlp.fc2")
    expected = fc2.base_layer.weight + 3 * fc2.lora_B["default"].weight @ fc2.lora_A["default"].weight
    torch.testing.assert_close(merged["blocks.1.mlp.fc2.weight"], expected)
    plain = create_vit("vit_test", img_size=32).eval()
    plain.load_state_dict(merged, strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=0)


def test_last_n_blocks_accepts_one_to_depth():
    model = apply_tuning(create_vit("vit_test", img_size=32), "last_n_blocks", last_n_blocks=DEPTH)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == FINAL_NORM | {
        f"blocks.{i}.{n}" for i in range(DEPTH) for n in BLOCK_PARAMS}
    for n in (0, DEPTH + 1):
        with pytest.raises(ValueError, match="last_n_blocks needs"):
            apply_tuning(create_vit("vit_test", img_size=32), "last_n_blocks", last_n_blocks=n)


def test_trainable_norms_is_a_lora_option():
    with pytest.raises(ValueError, match="trainable_norms 'final' applies to tuning 'lora'"):
        apply_tuning(create_vit("vit_test", img_size=32), "last_n_blocks", last_n_blocks=1,
                     trainable_norms="final")
    with pytest.raises(KeyError, match="unknown trainable_norms 'some'"):
        apply_tuning(create_vit("vit_test", img_size=32), "lora", trainable_norms="some")
    full = apply_tuning(create_vit("vit_test", img_size=32), "full")  # "all" (the default) is fine anywhere
    assert all(p.requires_grad for n, p in full.named_parameters() if n != "pos_embed")


def test_configs_choose_all_for_the_paper_and_final_for_the_authors(repo):
    paper = yaml.safe_load((repo / "configs/stage2/pacx_vitb_symile.yaml").read_text())
    authors = yaml.safe_load((repo / "configs/stage2/pacx_vitb_symile_final_norm.yaml").read_text())
    assert paper["model"]["init_args"]["trainable_norms"] == "all"
    assert authors["model"]["init_args"] == {"trainable_norms": "final"}
