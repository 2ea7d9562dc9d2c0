"""Helpers the tests share (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` as a module (registered in ``sys.modules``: dataclasses need that)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# The paper's Stage 2 settings where the demo config departs from them (configs/demo/stage2_pacx.yaml explains
# why): for tests that check the LoRA path or compare against the raw teacher embeddings.
PAPER_STAGE2 = ("--model.init_args.tuning", "lora", "--model.init_args.teacher_norm", "raw",
                "--model.init_args.teacher_components", "null", "--model.init_args.head_norm", "false")


def stage2_args(run: Path, root: Path, init: Path, *extra: str) -> list[str]:
    """``Stage2_PACX.py fit`` on a synthetic Symile release: the demo config at test size (vit_test, 32 px,
    16-d shared space, the release teachers' 1024-d ECG features)."""
    return ["fit", "--config", str(REPO / "configs/demo/stage2_pacx.yaml"), "--data.root", str(root),
            "--trainer.default_root_dir", str(run), "--model.init_args.init_encoder", str(init),
            "--model.init_args.encoder_arch", "vit_test",
            "--model.init_args.shared_dim", "16", "--model.init_args.teacher_dims", "{ecg: 1024}",
            "--data.img_size", "32", "--data.batch_size", "8", "--data.num_workers", "0",
            "--trainer.enable_progress_bar", "false", "--wandb", "disabled", "--trainer.log_every_n_steps",
            "1", *extra]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_rank() -> Iterator[tuple[int, int]]:
    """Inside a rank started by :func:`run_ranks`: one CPU thread, the gloo process group of the env
    (RANK, WORLD_SIZE, MASTER_*), yielding ``(rank, world)``; on a clean exit a barrier, so that no rank tears
    gloo down while another still uses it (a teardown abort), then the group is destroyed."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        yield rank, world
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(worker: str, world: int = 2, timeout: float = 120.0,
              env: Mapping[str, str] | None = None) -> None:
    """Start ``world`` real processes that each call ``worker`` (``"module:function"``, importable from the
    repository root) with a torchrun-style environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT on a free local port, one CPU thread, gloo on the loopback device) plus ``env``; wait for
    all. A rank that fails or outlives ``timeout`` s fails the test with every rank's output."""
    module, function = worker.split(":")
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(world), "NODE_RANK": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            **(env or {})}
    if "GLOO_SOCKET_IFNAME" not in base and Path("/sys/class/net/lo").exists():
        base["GLOO_SOCKET_IFNAME"] = "lo"
    cmd = [sys.executable, "-c", f"from {module} import {function}; {function}()"]
    procs = [subprocess.Popen(cmd, cwd=REPO, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    for rank, p in enumerate(procs):
        try:
            log, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            log = p.communicate()[0] + f"\n[rank {rank} timed out after {timeout} s]"
        logs.append(log)
    if any(p.returncode != 0 for p in procs):
        pytest.fail("DDP ranks failed:\n" + "\n".join(
            f"--- rank {r} (exit {p.returncode}) ---\n{log}" for r, (p, log) in enumerate(zip(procs, logs))))


def lrs_per_step(module, steps_per_epoch: int, epochs: int, batch_size: int = 8) -> list[float]:
    """The first group's lr at every optimizer step of ``module.configure_optimizers()``, under a stand-in
    trainer of one device (no gradients: the optimizer steps only keep the order Lightning keeps)."""
    from types import SimpleNamespace

    module._trainer = SimpleNamespace(
        estimated_stepping_batches=steps_per_epoch * epochs, num_training_batches=steps_per_epoch,
        accumulate_grad_batches=1, world_size=1, train_dataloader=SimpleNamespace(batch_size=batch_size))
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(steps_per_epoch * epochs):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs
