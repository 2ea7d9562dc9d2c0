"""Stage 2 distillation through Stage2_PACX.py: fit from Stage 1, resume, LoRA trainability, export
merge, ablation, the authors' checkpoints and bad input."""

import json

import numpy as np
import pytest
import torch

import pacx
from pacx.lit.pacx import PaCXModule
from pacx.models.tuning import apply_tuning
from pacx.models.vit import create_vit
from pacx.share import export_encoder
from pacx.weights.checkpoint import CheckpointError
from pacx.weights.formats import read_encoder_weights
from pacx.weights.layout import merge_lora_state
from Stage2_PACX import main
from tests.helpers import PAPER_STAGE2, lrs_per_step, stage2_args

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def symile_root(tmp_path_factory):
    from pacx.testing.symile import write_symile_release

    return write_symile_release(tmp_path_factory.mktemp("symile") / "data_npy", n_train=32, n_val=16,
                                n_test_queries=10, cxr_size=40, write_teacher_features=True)


def _args(repo, run, root, init, *extra):
    return stage2_args(run, root, init, *extra)


def _module(**kw):
    return PaCXModule(encoder_arch="vit_test", img_size=32, shared_dim=16, **kw)


def test_fit_from_stage1_then_resume_and_export(tmp_path, repo, symile_root, stage1_run):
    run = tmp_path / "pacx"
    main(_args(repo, run, symile_root, stage1_run, "--trainer.max_steps", "2", "--trainer.val_check_interval",
               "2", *PAPER_STAGE2))
    info = json.loads((run / "run.json").read_text())
    assert info["stage"] == "stage2_pacx" and info["global_step"] == 2 and info["debug"] == {}
    main(_args(repo, run, symile_root, stage1_run, "--trainer.max_steps", "4", "--ckpt_path", "last",
               *PAPER_STAGE2))
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["pacx"]["tuning"] == "lora"
    assert any("lora_A.default" in k for k in ckpt["state_dict"])
    # the exported (merged) encoder gives the adapted model's features
    module = _module(init_encoder=None).eval()
    module.load_state_dict(ckpt["state_dict"], strict=True)
    out = export_encoder(run, tmp_path / "pacx.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(pacx.load_encoder(out)(X), module(X), atol=1e-5, rtol=0)
    # same key layout as a Stage 1 export
    stage1_keys = set(read_encoder_weights(stage1_run).state)
    assert set(read_encoder_weights(out).state) == stage1_keys
    metrics = open(run / "metrics.csv").readline()
    for name in ("val/loss", "val/clip_ecg", "val/reg_labs", "val/batch_top1_cxr_ecg",
                 "val/split_top5_cxr_labs", "val/pos_cos_ecg", "val/neg_cos_labs", "val/reg_cos_ecg",
                 "val/cxr_std", "train/logit_scale"):
        assert name in metrics, name


def test_module_defaults_are_the_papers():
    """docs/method.md#stage-2: LoRA (r 8, alpha 16, dropout 0.1 on qkv, fc1, fc2) with every LayerNorm,
    teachers ECG and labs, 256-d shared space, head dropout 0.2, 0.5 · CLIP + 1.0 · regression, temperature
    0.07, label smoothing 0.02, AdamW lr 1e-4, weight decay 0.05, 5 warmup epochs, cosine floor 1 %."""
    import inspect

    defaults = {k: v.default for k, v in inspect.signature(PaCXModule).parameters.items()}
    expected = {"encoder_arch": "vit_base_patch16", "img_size": 224, "norm_eps": 1e-6, "tuning": "lora",
                "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "lora_targets": ("qkv", "fc1", "fc2"),
                "trainable_norms": "all", "shared_dim": 256, "head_dropout": 0.2, "clip_weight": 0.5,
                "regression_weight": 1.0, "temperature": 0.07, "label_smoothing": 0.02, "pool": "cls",
                "lr": 1e-4, "base_lr": None, "weight_decay": 0.05, "warmup_epochs": 5, "min_lr_ratio": 0.01,
                "lr_interval": "step"}
    assert {k: defaults[k] for k in expected} == expected
    assert tuple(_module().teacher_names) == ("ecg", "labs")
    loss = _module().loss_fn
    assert (loss.clip_weight, loss.regression_weight, loss.label_smoothing) == (0.5, 1.0, 0.02)
    assert loss.scale().item() == pytest.approx(1 / 0.07)


def test_encoder_starts_from_stage1_weights(stage1_run):
    module = _module(init_encoder=str(stage1_run), lora_dropout=0.0).eval()
    with torch.no_grad():  # LoRA B starts at zero: the wrapped encoder equals the Stage 1 encoder
        torch.testing.assert_close(module(X), pacx.load_encoder(stage1_run)(X), atol=1e-6, rtol=0)


def test_lora_trains_exactly_lora_matrices_and_layernorms():
    module = _module()
    trainable = {n for n, p in module.cxr_encoder.named_parameters() if p.requires_grad}
    norms = {f"{n}.{w}" for n, m in module.cxr_encoder.named_modules() if isinstance(m, torch.nn.LayerNorm)
             for w in ("weight", "bias")}
    lora = {n for n, _ in module.cxr_encoder.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert lora and norms and trainable == lora | norms
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora} == {"qkv", "fc1", "fc2"}


@pytest.mark.parametrize("strategy,expect", [("last_n_blocks", {"blocks.1", "norm."}), ("full", None)])
def test_other_tuning_strategies(strategy, expect):
    enc = apply_tuning(create_vit("vit_test", img_size=32), strategy, last_n_blocks=1)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    if expect is None:
        assert trainable == {n for n, _ in enc.named_parameters()} - {"pos_embed"}
    else:
        assert trainable and all(n.startswith(tuple(expect)) for n in trainable)
        assert any(n.startswith("blocks.1") for n in trainable) and "norm.weight" in trainable


def test_teachers_by_name_and_the_earlier_keys():
    one = _module(teachers=["labs"])
    assert set(one.proj) == {"cxr", "labs"} and set(one.reg) == set(one.teacher_norms) == {"labs"}
    _, terms = one.loss_terms({"cxr": X, "teachers": {"labs": torch.randn(3, 256)}})
    assert set(terms) == {"clip_labs", "reg_labs", "loss", "logit_scale"}
    terms["loss"].backward()
    assert all(p.grad is not None for p in [*one.proj["labs"].parameters(), *one.reg["labs"].parameters()])
    with pytest.warns(FutureWarning, match=r"ablate: ecg is read as teachers: \['labs'\]"):
        legacy = _module(ablate="ecg")
    assert legacy.teacher_names == ("labs",) and set(legacy.state_dict()) == set(one.state_dict())
    with pytest.warns(FutureWarning, match="ecg_dim is deprecated"):
        assert _module(ecg_dim=128).teacher_widths == {"ecg": 128, "labs": 256}
    # configs stack
    assert _module(teachers=["labs"], teacher_dims={"ecg": 128}).teacher_widths == {"labs": 256}
    with pytest.raises(KeyError, match="unknown teacher 'ekg'"):
        _module(teacher_dims={"ekg": 128})
    with pytest.raises(ValueError, match="each once"):
        _module(teachers=["ecg", "ecg"])
    with pytest.raises(ValueError, match="no features of teacher 'ecg'"):
        _module().embed({"cxr": X, "teachers": {"labs": torch.randn(3, 256)}})


def earlier_layout(ckpt: dict, ablate: str | None = None) -> dict:
    """A checkpoint as Stage 2 wrote it before teachers were named: one attribute per head (``proj_ecg.*``),
    ``ecg_dim`` / ``labs_dim`` / ``ablate`` in the hyperparameters."""
    state = {}
    for key, value in ckpt["state_dict"].items():
        head, _, rest = key.partition(".")
        state[f"{head}_{rest}" if head in ("proj", "reg") else key] = value
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if k not in ("teachers", "teacher_dims")}
    return {**ckpt, "state_dict": state, "hyper_parameters": {**hparams, "ecg_dim": 1024, "labs_dim": 256,
                                                              "ablate": ablate}}


def test_checkpoint_of_the_earlier_layout_loads_resumes_and_exports(tmp_path, repo, symile_root, stage1_run):
    from pacx.eval.zero_shot import load_stage2_heads

    run = tmp_path / "pacx"
    main(_args(repo, run, symile_root, stage1_run, "--trainer.max_steps", "2", "--trainer.val_check_interval",
               "2", *PAPER_STAGE2))
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    old = earlier_layout(ckpt)
    assert "proj_cxr.1.weight" in old["state_dict"] and "reg_labs.2.bias" in old["state_dict"]
    assert not any(k.startswith(("proj.", "reg.")) for k in old["state_dict"])
    torch.save(old, last)  # the run as the earlier code left it
    with pytest.warns(FutureWarning, match="ecg_dim is deprecated"):
        module = PaCXModule.load_from_checkpoint(last, weights_only=True)
    assert set(module.state_dict()) == set(ckpt["state_dict"])
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(module.state_dict()[key], value), key
    heads = load_stage2_heads(run)
    assert set(heads) == {"cxr", "ecg", "labs"}
    torch.testing.assert_close(heads["ecg"][1][1].weight, ckpt["state_dict"]["proj.ecg.1.weight"])
    with torch.no_grad():
        torch.testing.assert_close(pacx.load_encoder(run)(X), module.eval()(X), atol=1e-5, rtol=0)
    main(_args(repo, run, symile_root, stage1_run, "--trainer.max_steps", "3", "--ckpt_path", "last",
               *PAPER_STAGE2))
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 3 and "proj.cxr.1.weight" in resumed["state_dict"]

    # an ablation run of that layout kept the ablated teacher's (never trained) heads: they are dropped
    torch.save(earlier_layout(ckpt, ablate="ecg"), tmp_path / "ablated.ckpt")
    with pytest.warns(FutureWarning, match="ablate"):
        ablated = PaCXModule.load_from_checkpoint(tmp_path / "ablated.ckpt", weights_only=True)
    assert ablated.teacher_names == ("labs",) and "proj.ecg.1.weight" not in ablated.state_dict()
    assert set(load_stage2_heads(tmp_path / "ablated.ckpt")) == {"cxr", "labs"}


def test_authors_stage2_checkpoint_loads_merged(tmp_path):
    base = create_vit("vit_small_patch16", img_size=32, norm_eps=1e-5)
    peft_model = apply_tuning(base, "lora")
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    peft_model.eval()
    state = {f"cxr_encoder.{k}": v for k, v in peft_model.state_dict().items()}
    state["proj_cxr.1.weight"] = torch.zeros(256, 384)
    torch.save({"state_dict": state, "epoch": 49}, tmp_path / "authors_stage2.ckpt")
    enc = pacx.load_encoder(tmp_path / "authors_stage2.ckpt")
    assert enc.cfg.norm_eps == 1e-5
    with torch.no_grad():
        torch.testing.assert_close(enc(X), peft_model(X), atol=1e-5, rtol=0)
    out = export_encoder(tmp_path / "authors_stage2.ckpt", tmp_path / "a.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(pacx.load_encoder(out)(X), enc(X), atol=0, rtol=0)
    merged = merge_lora_state(peft_model.state_dict(), 2.0)
    assert "blocks.0.attn.qkv.weight" in merged and not any("lora" in k or "base_layer" in k for k in merged)


def test_init_encoder_of_another_size_names_the_path(tmp_path):
    torch.save(create_vit("vit_small_patch16", img_size=32).state_dict(), tmp_path / "small.pth")
    with pytest.raises(CheckpointError, match=r"init_encoder .*small\.pth.*shape mismatch"):
        _module(init_encoder=str(tmp_path / "small.pth"))
    with pytest.raises(FileNotFoundError, match="nope"):
        _module(init_encoder=str(tmp_path / "nope.pth"))


def test_teacher_feature_width_mismatch_names_the_file(tmp_path, repo, symile_root, stage1_run):
    import shutil

    root = tmp_path / "data_npy"
    shutil.copytree(symile_root, root)
    n = len(np.load(root / "train" / "ecg_features.npy", mmap_mode="r"))
    np.save(root / "train" / "ecg_features.npy", np.zeros((n, 768), np.float32))
    with pytest.raises(Exception, match=r"ecg_features\.npy.*768"):
        main(_args(repo, tmp_path / "run", root, stage1_run, "--trainer.max_steps", "1"))


def test_loading_a_checkpoint_checks_its_stage_and_keeps_its_debug_flags():
    """The head-key upgrade on load must not replace StagedModule's: a resumed or tested Stage 2 debug run
    stays one (its checkpoint's ``pacx.debug`` flags), and another stage's checkpoint is refused."""
    module = _module()
    state = module.state_dict()
    module.on_load_checkpoint({"state_dict": dict(state),
                               "pacx": {"stage": "stage2_pacx", "debug": {"limit_train_batches": 2}}})
    assert module.debug_flags == {"limit_train_batches": 2}
    with pytest.raises(CheckpointError, match="stage1_mae"):
        _module().on_load_checkpoint({"state_dict": dict(state),
                                      "pacx": {"stage": "stage1_mae", "debug": {}}})


def test_validation_diagnostics_of_a_one_row_batch_are_finite():
    """The last validation batch can hold one row: its within-batch spread (std over rows) and negative
    cosine do not exist and must not be logged as NaN / 0 (a NaN makes the whole epoch's value NaN); larger
    batches log the numbers as before."""
    module = _module().eval()
    logged: dict = {}
    module.log_stage = lambda stage, metrics, bs, prog_bar=(): logged.update(metrics)
    g = torch.Generator().manual_seed(1)
    teachers = {"ecg": torch.randn(3, 1024, generator=g), "labs": torch.randn(3, 256, generator=g)}
    with torch.no_grad():
        e = module.embed({"cxr": X, "teachers": teachers})
        module._log_diagnostics(e, "val", 3)
        shared = e["cxr_shared"].double().numpy()
        assert float(logged["cxr_std"]) == pytest.approx(shared.std(0, ddof=1).mean(), rel=1e-5)
        n = np.linalg.norm
        sims = (shared / n(shared, axis=1, keepdims=True)) @ (
            (s := e["shared"]["labs"].double().numpy()) / n(s, axis=1, keepdims=True)).T
        assert float(logged["neg_cos_labs"]) == pytest.approx(sims[~np.eye(3, dtype=bool)].mean(), rel=1e-5)
        logged.clear()
        one = module.embed({"cxr": X[:1], "teachers": {t: v[:1] for t, v in teachers.items()}})
        module._log_diagnostics(one, "val", 1)
    assert logged and all(torch.isfinite(torch.as_tensor(v)) for v in logged.values()), logged
    assert not {"cxr_std", "ecg_std", "labs_std", "neg_cos_ecg", "neg_cos_labs"} & set(logged)
    assert float(logged["pos_cos_labs"]) == pytest.approx(
        torch.nn.functional.cosine_similarity(one["cxr_shared"], one["shared"]["labs"]).item(), rel=1e-5)


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_paper_schedule_and_decay_groups_from_configure_optimizers(interval):
    """The paper's Stage 2 optimiser through the module's own configure_optimizers, against the closed form
    written here: 10,000 pairs at global batch 128 (drop_last) = 78 steps per epoch, 50 epochs, 5 warmup
    epochs (390 steps) rising as (s + 1) / 390 (the authors' (e + 1) / 5 per epoch), then
    0.01 + 0.99 · ½(1 + cos) to the end; weight decay 0.05 on the ≥ 2-D weights only (LoRA matrices and
    head weights), none on the encoder's LayerNorms, head biases and LayerNorms, or the logit scale."""
    import math

    module = _module(lr_interval=interval)
    per_epoch, epochs = 10_000 // 128, 50
    lrs = lrs_per_step(module, per_epoch, epochs, batch_size=128)
    cfg = module.configure_optimizers()
    opt = cfg["optimizer"]
    assert cfg["lr_scheduler"]["interval"] == "step"

    def expected(s: int) -> float:
        u, warm, total = ((s, 5 * per_epoch, epochs * per_epoch) if interval == "step"
                          else (s // per_epoch, 5, epochs))
        if u < warm:
            return 1e-4 * (u + 1) / warm
        return 1e-4 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (u - warm) / (total - warm))))

    assert lrs == pytest.approx([expected(s) for s in range(per_epoch * epochs)], rel=1e-9, abs=0)
    assert lrs[0] == pytest.approx(1e-4 / (390 if interval == "step" else 5))  # never 0
    assert min(lrs[390:]) >= 0.01 * 1e-4 * (1 - 1e-9)

    names = {id(p): n for n, p in module.named_parameters()}
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay
    assert decay == {n for n in trainable if "lora_" in n or (n.split(".")[0] in ("proj", "reg")
                                                               and n.endswith(".1.weight"))}
    assert "loss_fn.logit_scale" in no_decay
