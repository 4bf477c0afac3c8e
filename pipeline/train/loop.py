"""The per-worker training loop, run by Ray Train on every rank. Reads top to bottom:

restore (or start) -> for each optimizer step: wait for a batch, forward/backward (with accumulation and
autocast), clip, step, schedule -> every N steps: log (rank 0), picture (rank 0), checkpoint (all ranks),
frozen-feature kNN probe (all ranks embed, rank 0 scores; also at step 0: pipeline/train/probe_monitor.py).

Data position: training is counted in optimizer steps. An epoch is one pass over the worker's shard,
capped at ``steps_per_epoch``; ``Progress`` stores the epoch and the step inside it. A run resumed in the
middle of epoch ``e`` at step ``k`` of it starts a fresh pass of the data for the epoch's remaining
``steps_per_epoch - k`` steps (streamed datasets cannot seek; re-decoding ``k`` batches to skip them would
cost as much as training on them). The per-worker shuffle buffer is seeded by (seed, epoch, rank).

What is trained is an *objective* (``LoopArgs.objective``): it builds the model and optimizer, turns a
batch into a loss, and may evaluate after a step. ``PretrainObjective`` (masked reconstruction) is the
default; finetuning's lives in pipeline/train/finetune.py.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline.config import PretrainConfig
from pipeline.data.transforms import to_model_input
from pipeline.models.videomae import VideoMAEForPreTraining
from pipeline.tracking import Run, RunLogger
from pipeline.train import checkpointing as ckpt
from pipeline.train.metrics import StepMeter, peak_rss_mb, progress_line
from pipeline.train.optim import WarmupCosine, build_adamw
from pipeline.train.probe_monitor import ProbeMonitor


@dataclass
class Plan:
    """The run's length and LR, fixed by the driver from the config and the dataset size."""

    total_steps: int
    steps_per_epoch: int
    warmup_steps: int
    peak_lr: float
    global_batch: int  # clips per optimizer step, over all workers
    min_lr: float = 0.0  # end of the cosine
    warmup_lr: float = 0.0  # start of the warmup


@dataclass
class LoopArgs:
    """What the driver hands every worker (picklable: a config, numbers and ids)."""

    config: PretrainConfig
    config_yaml: str
    plan: Plan
    run: Run | None = None  # the MLflow run rank 0 logs into
    ledger_name: str | None = None  # the data error ledger's run name (ErrorLedger.get)
    objective: Any = None  # None: PretrainObjective; see finetune.FinetuneObjective
    probe_classes: int = 0  # > 0: the kNN monitor is on (config.probe), over this many classes


class PretrainObjective:
    """Masked video reconstruction: VideoMAEForPreTraining on clips with their tube masks."""

    def build_model(self, cfg: PretrainConfig) -> torch.nn.Module:
        return VideoMAEForPreTraining(cfg.model.build())

    def build_optimizer(self, core: torch.nn.Module, plan: Plan, cfg: PretrainConfig):
        return build_adamw(core, plan.peak_lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps)

    def loss(self, model: torch.nn.Module, batch: dict, pixel_values: torch.Tensor, step: int, micro: int):
        """(loss, what the reconstruction picture needs)."""
        mask = batch["bool_masked_pos"].to(pixel_values.device, non_blocking=True)
        return model(pixel_values, mask).loss, (pixel_values, mask)

    def after_step(self, core: torch.nn.Module, progress: ckpt.Progress, plan: Plan, device: torch.device,
                   rank: int) -> dict[str, float]:
        """Metrics of an evaluation run after this step (collective: every rank calls it); none here."""
        return {}


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: None = fp32. ``auto`` is bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU
    (CPU autocast is slower than fp32 for these models)."""
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _across_ranks(values: list[float], device: torch.device, op: dist.ReduceOp) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, device=device, dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.tolist()


def _error_metrics(ledger_name: str | None) -> dict[str, float]:
    if not ledger_name:
        return {}
    from pipeline.data.errors import ErrorLedger

    try:
        snap = ErrorLedger.get(ledger_name).snapshot()
    except ValueError:  # no ledger (e.g. a data path that does not record errors)
        return {}
    out = {"data/videos": snap["videos"], "data/errors": snap["errors"]}
    out.update({f"data/errors/{reason}": n for reason, n in snap["by_reason"].items()})
    return out


class _Rank0:
    """Rank 0's side jobs: progress lines, MLflow metrics, reconstruction pictures, the error report."""

    def __init__(self, args: LoopArgs):
        self.args = args
        cfg = args.config.tracking
        self.logger = None
        if args.run:
            self.logger = RunLogger(args.run, cfg.system_metrics, cfg.system_metrics_interval_s)

    def log(self, step: int, epoch: int, lr: float, window: dict[str, float]) -> None:
        print(progress_line(step, self.args.plan.total_steps, epoch, lr, window), flush=True)
        if self.logger:
            metrics = {"lr": lr, "epoch": epoch, **window, **_error_metrics(self.args.ledger_name)}
            metrics.pop("eta_s")
            self.logger.log_metrics(metrics, step)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        print(f"step {step}/{self.args.plan.total_steps} | "
              + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        if self.logger:
            self.logger.log_metrics(metrics, step)

    def picture(self, model: torch.nn.Module, pixel_values: torch.Tensor, mask: torch.Tensor,
                step: int) -> None:
        if not self.logger:
            return
        from pipeline.viz import reconstruct, save_reconstruction_png

        original, masked, recon = reconstruct(model, pixel_values[:2], mask[:2])
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / f"reconstruction_step{step:08d}.png"
            title = f"{self.args.config.run_name} step {step}"
            save_reconstruction_png(png, original, masked, recon, title=title)
            self.logger.log_artifact(png, "reconstructions")

    def close(self) -> None:
        if self.logger:
            self.logger.close()


def pretrain_worker(loop_config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: VideoMAE pretraining, or ``args.objective`` (finetuning)."""
    args: LoopArgs = loop_config["args"]
    cfg, plan = args.config, args.plan
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    ckpt.seed_everything(cfg.seed * 1000 + rank)

    objective = args.objective or PretrainObjective()
    model = ray.train.torch.prepare_model(objective.build_model(cfg))
    core = ckpt.unwrap(model)
    optimizer = objective.build_optimizer(core, plan, cfg)
    scheduler = WarmupCosine(optimizer, plan.total_steps, plan.warmup_steps, plan.peak_lr, plan.min_lr,
                             plan.warmup_lr)
    amp_dtype = resolve_precision(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    progress = ckpt.Progress(world_size=world)
    restored = ray.train.get_checkpoint()
    if restored:
        with restored.as_directory() as directory:
            progress = ckpt.load(directory, rank=rank, model=model, optimizer=optimizer, scheduler=scheduler,
                                 scaler=scaler)
            if not (Path(directory) / f"rng_rank{rank}.pt").exists():  # new rank after a resize
                ckpt.seed_everything(cfg.seed * 1000 + rank + 7919 * progress.step)
        progress.world_size = world
    start_step = progress.step
    side = _Rank0(args) if rank == 0 else None
    if side:
        where = f"resuming from step {start_step} (epoch {progress.epoch})" if restored else "starting"
        print(f"[{cfg.run_name}] {where}: {plan.total_steps} steps, {plan.steps_per_epoch} per epoch, "
              f"global batch {plan.global_batch}, peak lr {plan.peak_lr:.3g}, {world} worker(s) on {device}, "
              f"precision {amp_dtype or torch.float32}", flush=True)

    monitor = ProbeMonitor(cfg.probe, args.probe_classes, plan.total_steps) if args.probe_classes else None
    if monitor and start_step == 0:  # the random init's score: the baseline of the curve
        probed = monitor.run(core.videomae, device, rank)
        if side:
            side.log_eval(0, probed)

    shard = ray.train.get_dataset_shard("train")
    meter = StepMeter(plan.total_steps, start_step, world)
    accum, batch_size = cfg.train.grad_accum_steps, cfg.train.batch_size
    mean, std = cfg.data.mean, cfg.data.std
    last_batch = None
    model.train()
    try:
        while progress.step < plan.total_steps:
            if progress.step_in_epoch >= plan.steps_per_epoch:  # the checkpoint was taken at an epoch's end
                progress.epoch += 1
                progress.step_in_epoch = 0
            buffer = cfg.train.shuffle_buffer_batches * batch_size or None
            batches = iter(shard.iter_torch_batches(
                batch_size=batch_size, drop_last=True, prefetch_batches=cfg.train.prefetch_batches,
                local_shuffle_buffer_size=buffer,
                local_shuffle_seed=(cfg.seed * 1_000_003 + progress.epoch * 1009 + rank) if buffer else None))
            steps_this_epoch = 0
            while progress.step_in_epoch < plan.steps_per_epoch and progress.step < plan.total_steps:
                loss_sum, clips, exhausted = 0.0, 0, False
                for micro in range(accum):
                    waited = time.perf_counter()
                    batch = next(batches, None)
                    meter.data_wait(time.perf_counter() - waited)
                    if batch is None:
                        exhausted = True
                        break
                    frames = batch["pixel_values"].to(device, non_blocking=True)  # uint8 (B, T, H, W, C)
                    pixel_values = to_model_input(frames, mean, std)  # float (B, T, C, H, W)
                    sync = micro == accum - 1 or not hasattr(model, "no_sync")
                    with (contextlib.nullcontext() if sync else model.no_sync()), \
                            torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        loss, last_batch = objective.loss(model, batch, pixel_values, progress.step, micro)
                        loss = loss / accum
                    (scaler.scale(loss) if scaler else loss).backward()
                    loss_sum += loss.item()
                    clips += pixel_values.shape[0]
                if exhausted:  # every rank's shard holds the same number of batches: all stop here
                    optimizer.zero_grad(set_to_none=True)
                    break
                if scaler:
                    scaler.unscale_(optimizer)
                if cfg.train.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                lr = scheduler.lr
                scheduler.step()
                progress.step += 1
                progress.step_in_epoch += 1
                progress.clips_seen += clips * world
                steps_this_epoch += 1
                meter.step_done(clips, loss_sum)

                step = progress.step
                done = step == plan.total_steps
                evaluated = objective.after_step(core, progress, plan, device, rank)
                if monitor and monitor.should_probe(step):
                    evaluated.update(monitor.run(core.videomae, device, rank))
                if side and evaluated:
                    side.log_eval(step, evaluated)
                if step % cfg.train.log_every_steps == 0 or done:
                    window = meter.window(step)
                    (loss_total,) = _across_ranks([window["loss"]], device, dist.ReduceOp.SUM)
                    (peak_max,) = _across_ranks([peak_rss_mb()], device, dist.ReduceOp.MAX)
                    window.update(loss=loss_total / world, peak_rss_mb_max_worker=peak_max)
                    if side:
                        side.log(step, progress.epoch, lr, window)
                recon_every = cfg.tracking.recon_every_steps
                if side and last_batch is not None and ((recon_every and step % recon_every == 0) or done):
                    side.picture(core, *last_batch, step)
                if step % cfg.checkpoint.every_steps == 0 or done:
                    _save_and_report(args, rank, model, optimizer, scheduler, scaler, progress, start_step,
                                     loss_sum)
            if steps_this_epoch == 0:
                raise RuntimeError(
                    f"epoch {progress.epoch} gave rank {rank} no full batch of {batch_size} clips: the "
                    f"dataset has too few readable videos for {world} worker(s) x batch_size {batch_size} "
                    "(see the data error report)")
            if progress.step < plan.total_steps:  # the pass ended: the epoch's quota or the data ran out
                progress.epoch += 1
                progress.step_in_epoch = 0
    finally:
        if side:
            side.close()


def _save_and_report(args: LoopArgs, rank: int, model, optimizer, scheduler, scaler, progress: ckpt.Progress,
                     start_step: int, loss: float) -> None:
    """Every rank writes its share into a local folder; Ray Train uploads them into one checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt.save(tmp, rank=rank, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                  progress=progress, job_config_yaml=args.config_yaml)
        metrics = {"step": progress.step, "epoch": progress.epoch, "loss": loss, "start_step": start_step,
                   "clips_seen": progress.clips_seen, "peak_rss_mb": peak_rss_mb()}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{progress.step:08d}")
