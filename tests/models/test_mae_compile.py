"""The MAE training computation under ``torch.compile``: one graph without breaks, and the same numbers.

What is traced is what :class:`pacx.lit.mae.MAEModule` runs per step: ``module.model(imgs,
mask_ratio=hparams.mask_ratio, noise=noise)`` and its masked loss, with masks drawn inside (``noise=None``)
and given noise (what both steps pass), plain and ``norm_pix_loss`` targets. A graph break
would split the compiled step and stop whole-step optimisations (CUDA graphs, cross-op fusion) on the GPU
(issue 17), so the count is pinned at 0. The compiled-vs-eager comparison uses the ``aot_eager`` backend:
it runs Dynamo's graph capture and AOTAutograd's joint forward/backward graph, the parts that could change
the computation, while the kernels stay eager, which keeps the test fast on a CPU.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch._dynamo

from pacx.lit.mae import MAEModule

BATCH = 2


def _module(norm_pix_loss: bool) -> MAEModule:
    torch.manual_seed(0)
    return MAEModule(arch="mae_vit_test", img_size=32, norm_pix_loss=norm_pix_loss).train()


def _batch(module: MAEModule, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cfg = module.model.cfg
    imgs = torch.randn(BATCH, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    return imgs, torch.rand(BATCH, cfg.num_patches, generator=g)


def _loss_fn(module: MAEModule):
    """The step's model call and loss, as ``MAEModule._shared_step`` makes it (without the logging)."""
    ratio = module.hparams.mask_ratio

    def loss(imgs: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return module.model(imgs, mask_ratio=ratio, noise=noise)[0]

    return loss


@pytest.mark.parametrize("norm_pix_loss", [False, True], ids=["pixels", "norm_pix"])
@pytest.mark.parametrize("given_noise", [False, True], ids=["train_masks", "given_noise"])
def test_mae_step_compiles_to_one_graph_without_breaks(norm_pix_loss, given_noise):
    module = _module(norm_pix_loss)
    imgs, noise = _batch(module)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_loss_fn(module))(imgs, noise if given_noise else None)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def _loss_and_grads(module: MAEModule, fn, imgs: torch.Tensor, noise: torch.Tensor | None):
    module.zero_grad(set_to_none=True)
    loss = fn(imgs, noise)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("norm_pix_loss", [False, True], ids=["pixels", "norm_pix"])
def test_compiled_step_matches_eager_loss_and_gradients(norm_pix_loss):
    module = _module(norm_pix_loss)
    imgs, noise = _batch(module)
    eager = _loss_fn(module)
    torch._dynamo.reset()
    compiled = torch.compile(eager, backend="aot_eager", fullgraph=True)  # fullgraph: a break would raise
    for given in (noise, None):  # the validation step's noise, then masks drawn inside (same RNG state)
        torch.manual_seed(3)
        loss_e, grads_e = _loss_and_grads(module, eager, imgs, given)
        torch.manual_seed(3)
        loss_c, grads_c = _loss_and_grads(module, compiled, imgs, given)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
        assert grads_c.keys() == grads_e.keys() and grads_e
        for name, grad in grads_e.items():
            torch.testing.assert_close(grads_c[name], grad, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor on the CPU needs a C++ compiler")
def test_training_step_masks_are_the_eager_masks_under_inductor():
    """With the default backend (inductor), ``torch.rand`` inside the compiled graph draws from inductor's own
    generator: other masks than eager for the same seed. The training step draws its masks eagerly, so
    ``model.compile`` gives the eager step's loss up to rounding (``MAEModule``'s ``compile`` contract)."""
    eager, compiled = _module(False), _module(False)
    compiled.hparams.compile = True
    imgs, _ = _batch(eager)
    torch._dynamo.reset()
    torch.manual_seed(3)
    loss_e = eager._shared_step((imgs,), "train", 0)
    torch.manual_seed(3)
    loss_c = compiled._shared_step((imgs,), "train", 0)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
