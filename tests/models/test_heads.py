"""pacx/models/heads.py: the translation of Stage 2 state dicts of the earlier head layout."""

from pacx.models.heads import LEGACY_HEADS, upgrade_head_keys

CURRENT = ["cxr_encoder.norm.weight", "proj.cxr.1.weight", "proj.ecg.1.weight", "proj.labs.2.bias",
           "reg.ecg.1.weight", "reg.labs.1.bias", "teacher_norms.ecg.mean", "teacher_norms.labs.proj",
           "loss_fn.logit_scale"]
EARLIER = ["cxr_encoder.norm.weight", "proj_cxr.1.weight", "proj_ecg.1.weight", "proj_labs.2.bias",
           "reg_ecg.1.weight", "reg_labs.1.bias", "teacher_norms.ecg.mean", "teacher_norms.labs.proj",
           "loss_fn.logit_scale"]


def test_earlier_keys_are_renamed_and_values_kept():
    state = {k: i for i, k in enumerate(EARLIER)}
    out = upgrade_head_keys(state)
    assert list(out) == CURRENT and list(out.values()) == list(range(len(EARLIER)))
    assert set(LEGACY_HEADS) == {k.split(".")[0] for k in EARLIER if k.startswith(("proj_", "reg_"))}


def test_current_layout_passes_unchanged_whatever_the_teachers():
    state = {k: 0 for k in CURRENT}
    assert upgrade_head_keys(state) == state
    # a wrong teacher set stays an error of the strict load
    assert upgrade_head_keys(state, ["labs"]) == state


def test_an_earlier_ablation_loses_the_ablated_teachers_heads_and_norm():
    out = upgrade_head_keys({k: 0 for k in EARLIER}, ["labs"])
    assert list(out) == [k for k in CURRENT if ".ecg." not in k]
