"""FSDP2 (``scaling.strategy: fsdp``, pipeline/train/sharding.py) against DDP, on CPU with gloo in two real
processes: the same loss and gradients, the same weights after optimizer steps; its checkpoint saved by each
rank into its own folder (as Ray Train gathers them), whole, resumed to the same next step, resumed by a
group of another size, torn when a rank's shard is missing, and exported as a whole transformers-format
model."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from helpers.configs import tiny_model
from helpers.runs import tiny_config
from torch.nn.parallel import DistributedDataParallel

from pipeline.models.videomae import VideoMAEForPreTraining
from pipeline.models.videomae.masking import make_mask
from pipeline.train import checkpointing as ckpt
from pipeline.train.driver import schedule_run
from pipeline.train.optim import WarmupCosine, build_adamw
from pipeline.train.sharding import Placement, full_state_dict

WORLD = 2


def _model() -> VideoMAEForPreTraining:
    torch.manual_seed(0)
    return VideoMAEForPreTraining(tiny_model(use_mean_pooling=False))


def _batch(rank: int, step: int, config) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's clips at ``step``: different on each rank, as DDP and FSDP shards of a batch are."""
    import numpy as np

    generator = torch.Generator().manual_seed(100 * rank + step)
    pixels = torch.randn(2, config.num_frames, 3, config.image_size, config.image_size, generator=generator)
    rng = np.random.default_rng(100 * rank + step)
    masks = torch.from_numpy(np.stack([make_mask("tube", config.grid, 0.75, rng) for _ in range(2)]))
    return pixels, masks


def _train_step(model, optimizer, scheduler, rank: int, step: int, config) -> float:
    pixels, masks = _batch(rank, step, config)
    loss = model(pixels, bool_masked_pos=masks).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def _fsdp(module) -> tuple[Placement, torch.optim.Optimizer, WarmupCosine]:
    placement = Placement(module, "fsdp", torch.device("cpu"), param_dtype=None, compile_with=None,
                          build_replica=_model)
    optimizer = build_adamw(module, 1e-3, 0.05, (0.9, 0.95))
    return placement, optimizer, WarmupCosine(optimizer, 10, 2, 1e-3, 1e-5, 0.0)


def _save(placement, optimizer, scheduler, rank: int, step: int, folder: Path) -> None:
    progress = ckpt.Progress(step=step, world_size=WORLD)
    ckpt.save(folder, rank=rank, model=placement.model, optimizer=optimizer, scheduler=scheduler,
              scaler=None, progress=progress, job_config_yaml="")


def _two_ranks(rank: int, port: int, work: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    work_dir = Path(work)
    config = _model().config
    # one step: the same loss and gradients
    reference = DistributedDataParallel(_model())
    placement, optimizer, scheduler = _fsdp(_model())
    pixels, masks = _batch(rank, 0, config)
    ddp_loss = reference(pixels, bool_masked_pos=masks).loss
    ddp_loss.backward()
    fsdp_loss = placement.model(pixels, bool_masked_pos=masks).loss
    fsdp_loss.backward()
    torch.testing.assert_close(fsdp_loss, ddp_loss)
    ddp_grads = dict(reference.module.named_parameters())
    for name, param in placement.module.named_parameters():
        torch.testing.assert_close(param.grad.full_tensor(), ddp_grads[name].grad, rtol=1e-5, atol=1e-7,
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")
    # three AdamW steps each (the first with the gradients above): the same weights
    reference_opt = build_adamw(reference.module, 1e-3, 0.05, (0.9, 0.95))
    reference_sched = WarmupCosine(reference_opt, 10, 2, 1e-3, 1e-5, 0.0)
    for opt, sched in ((reference_opt, reference_sched), (optimizer, scheduler)):
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    for step in (1, 2):
        a = _train_step(reference, reference_opt, reference_sched, rank, step, config)
        b = _train_step(placement.model, optimizer, scheduler, rank, step, config)
        assert abs(a - b) < 1e-5, (step, a, b)
    whole = full_state_dict(placement.model, rank0_only=False)
    for name, value in reference.module.state_dict().items():
        torch.testing.assert_close(whole[name], value, rtol=1e-5, atol=1e-6)
    # a checkpoint: each rank into its own folder, then gathered into one (Ray Train's upload does that)
    _save(placement, optimizer, scheduler, rank, 3, work_dir / f"rank{rank}")
    dist.barrier()
    if rank == 0:
        merged = work_dir / "checkpoint"
        for part in ("rank0", "rank1"):
            shutil.copytree(work_dir / part, merged, dirs_exist_ok=True)
        assert ckpt.torn_reason(merged) is None
        torn = work_dir / "torn"
        shutil.copytree(merged, torn)
        (torn / ckpt.SHARDED / "__1_0.distcp").unlink()
        assert "__1_0.distcp missing" in ckpt.torn_reason(torn)
        exported = VideoMAEForPreTraining.from_pretrained(merged)  # the whole model, transformers' layout
        for name, value in exported.state_dict().items():
            torch.testing.assert_close(value, whole[name])
    dist.barrier()
    # resumed into a fresh sharded model and optimizer: the next step is the same as the uninterrupted one
    resumed, resumed_opt, resumed_sched = _fsdp(_model())
    with torch.no_grad():  # nothing of the original survives but the checkpoint
        for param in resumed.module.parameters():
            param.zero_()
    progress = ckpt.load(work_dir / "checkpoint", rank=rank, model=resumed.model, optimizer=resumed_opt,
                         scheduler=resumed_sched, scaler=None)
    assert progress.step == 3
    go_on = _train_step(placement.model, optimizer, scheduler, rank, 3, config)
    again = _train_step(resumed.model, resumed_opt, resumed_sched, rank, 3, config)
    assert go_on == again, (go_on, again)
    # the replica that probes and pictures use is the whole model as of its step
    replica = placement.replica(4)
    for name, value in full_state_dict(placement.model, rank0_only=False).items():
        torch.testing.assert_close(replica.state_dict()[name], value)
    # a DDP run refuses the FSDP checkpoint, naming the strategy
    with pytest.raises(Exception, match="scaling.strategy=fsdp"):
        ckpt.load(work_dir / "checkpoint", rank=rank, model=DistributedDataParallel(_model()),
                  optimizer=reference_opt, scheduler=reference_sched, scaler=None)
    if rank == 0:
        torch.save(whole, work_dir / "whole_at_3.pt")
    dist.destroy_process_group()


def _one_rank(rank: int, port: int, work: str) -> None:
    """The two ranks' checkpoint resumed by a group of one (an elastic group that shrank)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=1)
    placement, optimizer, scheduler = _fsdp(_model())
    progress = ckpt.load(Path(work) / "checkpoint", rank=rank, model=placement.model, optimizer=optimizer,
                         scheduler=scheduler, scaler=None)
    assert progress.step == 3
    saved = torch.load(Path(work) / "whole_at_3.pt", weights_only=True)
    for name, value in full_state_dict(placement.model, rank0_only=False).items():
        torch.testing.assert_close(value, saved[name])
    dist.destroy_process_group()


def test_fsdp_matches_ddp_and_its_checkpoints_resume_on_any_group_size():
    work = tempfile.mkdtemp(prefix="fsdp-")
    try:
        mp.spawn(_two_ranks, args=(free_port(), work), nprocs=WORLD, join=True)
        mp.spawn(_one_rank, args=(free_port(), work), nprocs=1, join=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_fsdp_refuses_fp16_and_uneven_groups_before_any_worker_starts():
    from pipeline import config as C
    from pipeline.config import ConfigError
    from pipeline.train.pretrain import PretrainConfig

    with pytest.raises(ConfigError, match="scaling.strategy=fsdp trains in fp32 or bf16"):
        C.load(PretrainConfig, None, ["run_name=x", "scaling.strategy=fsdp", "train.precision=fp16"])
    with pytest.raises(ConfigError, match="scaling.strategy: 'zero3' is not one of"):
        C.load(PretrainConfig, None, ["run_name=x", "scaling.strategy=zero3"])
    elastic = C.load(PretrainConfig, None,
                     ["run_name=x", "scaling.strategy=fsdp", "scaling.num_workers=[2,3]"])
    with pytest.raises(ConfigError, match="a group of 2 worker\\(s\\) would not"):
        schedule_run(elastic, num_clips=1000)  # 3 micro-batches a step: 2 ranks would take 2 + 1
    elastic.train.grad_accum_steps = 2  # 6 micro-batches: 3 each on 2 ranks, 2 each on 3
    assert schedule_run(elastic, num_clips=1000).global_batch == 2 * 3 * elastic.train.batch_size



def test_an_fsdp_job_trains_checkpoints_and_exports(ray_session, sample_videos, tmp_path):
    """The whole job under ``scaling.strategy=fsdp`` on two Ray Train workers: each checkpoint whole, with
    both ranks' shards in one folder (Ray Train's upload merges the ranks' folders; resuming such a folder
    is the test above), the reconstruction picture drawn from the model gathered on rank 0, and an export
    that loads as a whole model."""
    from mlflow.tracking import MlflowClient

    from pipeline.train.pretrain import run_pretrain

    sets = {"run_name": "fsdp", "scaling.strategy": "fsdp", "train.max_steps": "4",
            "checkpoint.every_steps": "2", "tracking.recon_every_steps": "2"}
    result = run_pretrain(tiny_config(tmp_path, str(sample_videos), **sets))
    assert result.final_step == 4
    for step in (2, 4):
        checkpoint = tmp_path / "runs" / "fsdp" / f"checkpoint_{step:08d}"
        assert ckpt.torn_reason(checkpoint) is None
        shards = sorted(p.name for p in (checkpoint / ckpt.SHARDED).glob("*.distcp"))
        assert shards == ["__0_0.distcp", "__1_0.distcp"]
    exported = VideoMAEForPreTraining.from_pretrained(result.export_uri)
    final = VideoMAEForPreTraining.from_pretrained(checkpoint)
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, final.state_dict()[name])
    client = MlflowClient(result.tracking_uri)
    pictures = [a.path for a in client.list_artifacts(result.mlflow_run_id, "reconstructions")]
    assert len([p for p in pictures if p.endswith(".png")]) == 2, pictures  # steps 2 and 4
