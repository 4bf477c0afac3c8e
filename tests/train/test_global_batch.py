"""``train.global_batch_size``: one worker and two learn alike. The same global batch of micro-batches,
split over a group of one (which accumulates them all; Ray Train does not wrap a group of one in DDP) or
two (DDP averaging the ranks' gradients), gives the same weights after every AdamW step: the loop's split
(``micro_steps``), loss weight (``micro_loss_weight``) and gradient sync on a step's last micro-batch
only, on the real model, in a real gloo process group."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from helpers.configs import tiny_model
from torch.nn.parallel import DistributedDataParallel

from pipeline.models.videomae import VideoMAEForPreTraining
from pipeline.models.videomae.masking import make_mask
from pipeline.train.loop import micro_loss_weight, micro_steps
from pipeline.train.optim import build_adamw

BATCH, GLOBAL_BATCH, STEPS = 2, 6, 3  # 3 micro-batches a step: a group of two splits them 2 + 1, rotating


def _micro_batch(index: int, step: int, config) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch's ``index``-th micro-batch at ``step``, whichever rank takes it."""
    generator = torch.Generator().manual_seed(1000 * step + index)
    shape = (BATCH, config.num_frames, 3, config.image_size, config.image_size)
    pixels = torch.randn(shape, generator=generator)
    rng = np.random.default_rng(1000 * step + index)
    masks = torch.from_numpy(np.stack([make_mask("tube", config.grid, 0.75, rng) for _ in range(BATCH)]))
    return pixels, masks


def _train(model: torch.nn.Module, rank: int, world: int) -> dict[str, torch.Tensor]:
    """STEPS optimizer steps of this rank's share of each global batch, as the loop takes them."""
    module = model.module if isinstance(model, DistributedDataParallel) else model
    optimizer = build_adamw(module, 1e-3, 0.05, (0.9, 0.95))
    weight = micro_loss_weight(GLOBAL_BATCH, BATCH, world)
    for step in range(STEPS):
        counts = [micro_steps(GLOBAL_BATCH, BATCH, world, r, step) for r in range(world)]
        first = sum(counts[:rank])  # the ranks take consecutive micro-batches of the global batch
        for micro in range(counts[rank]):
            pixels, masks = _micro_batch(first + micro, step, module.config)
            accumulate = micro < counts[rank] - 1 and world > 1
            with model.no_sync() if accumulate else contextlib.nullcontext():
                (model(pixels, bool_masked_pos=masks).loss * weight).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return module.state_dict()


def _model() -> VideoMAEForPreTraining:
    torch.manual_seed(0)
    return VideoMAEForPreTraining(tiny_model(use_mean_pooling=False))


def _groups(rank: int, port: int, out: str) -> None:
    if rank == 0:
        torch.save(_train(_model(), 0, 1), Path(out) / "world1.pt")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    two = _train(DistributedDataParallel(_model()), rank, 2)
    if rank == 0:
        torch.save(two, Path(out) / "world2.pt")
    dist.destroy_process_group()


def test_one_worker_and_two_take_the_same_steps_with_one_global_batch_size():
    work = tempfile.mkdtemp(prefix="global-batch-")
    try:
        mp.spawn(_groups, args=(free_port(), work), nprocs=2, join=True)
        one, two = (torch.load(Path(work) / f"world{w}.pt", weights_only=True) for w in (1, 2))
        start = _model().state_dict()
        moved = [name for name in one if not torch.equal(one[name], start[name])]
        assert len(moved) > len(one) // 2  # the steps did train
        for name, value in one.items():
            torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=name: f"{n} after {STEPS} steps: {m}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
