"""The per-worker training loop, run by Ray Train on every rank, for pretraining and finetuning alike.

``train_loop_per_worker`` is ``TrainLoop(args).run()``, which reads as verbs::

    restore (or start) -> probe (step 0) -> per epoch, per optimizer step: train_step ->
        should_validate? validate | should_probe? probe | should_log? log | should_picture? picture |
        should_checkpoint? checkpoint

What is trained is an *objective* (``LoopArgs.objective``): it builds the model and optimizer, turns a
batch into a loss and may validate (pipeline/train/pretrain.py, finetune.py). The loss stays on the device
between log steps: one host sync per log step, not per micro-step.

Epochs: training is counted in optimizer steps; an epoch is one pass of the training stream, and it ends
when the pass ends: its quota of ``steps_per_epoch`` steps met, or its data exhausted (unreadable videos
make a pass short). Everything keyed to an epoch's end (validation and ``best/``, the ``epoch/steps``
metric, the next pass) runs at that moment, whatever the step count. The LR schedule and the run's length
are in steps, fixed by the ``Schedule``, so short epochs mean the run covers a few more of them
(docs/training.md, "Epochs").

Data position: ``Progress`` stores the epoch, the steps taken in it and the videos of it trained on (a
bitmap over its positions, gathered at each checkpoint). A resumed run reopens the epoch and the stream
skips the done videos before decoding (pipeline/data/resume.py): it trains on the videos not yet trained
on, and an epoch whose pass has nothing left ends at once. The bitmap holds only for the data it was made
on: ``data_fingerprint`` ties it to the plan's inputs, and a run resumed on other data starts the epoch
afresh, saying what changed. The per-worker shuffle buffer is seeded by (seed, epoch, rank) and gives its
first batch after a couple of batches have arrived (pipeline/data/shuffle.py); once a rank's stream has
ended, the next epoch's pass starts while the buffer drains, so the seam between epochs does not idle the
decoders (``start_next_pass``).
"""

from __future__ import annotations

import base64
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.data.clips import torch_collate
from pipeline.data.errors import ErrorLedger
from pipeline.data.plan import describe_change, fingerprint
from pipeline.data.resume import Consumption, get_cursor
from pipeline.data.shuffle import RampedShuffle, num_rows
from pipeline.data.sources import source_specs
from pipeline.data.transforms import to_model_input
from pipeline.models.device import autocast_dtype
from pipeline.tracking import Run, RunLogger
from pipeline.train import checkpointing as ckpt
from pipeline.train.metrics import StepMeter, peak_rss_mb, progress_line, say
from pipeline.train.nonfinite import NonFiniteGuard, NonFiniteTraining
from pipeline.train.objective import Objective
from pipeline.train.optim import WarmupCosine
from pipeline.train.probe_monitor import ProbeMonitor
from pipeline.train.ranks import across_ranks, barrier, derive_seed, distributed
from pipeline.train.sharding import Placement, plain_tensor
from pipeline.train.startup import Startup
from pipeline.train.watchdog import Watched, diagnose_stream, set_stall_timeout
from pipeline.viz import reconstruct, save_reconstruction_png


@dataclass
class TrainSection:
    """Batch, length and numerics of the optimisation loop."""

    batch_size: int = 8  # clips per worker per micro-step; global batch = this x workers x grad_accum_steps
    grad_accum_steps: int = 1
    # clips per optimizer step over all workers, the same whatever scaling.num_workers is: its
    # global_batch_size / batch_size micro-batches are split over the workers (the remainder rotates), so
    # one worker accumulates what two share and the LR, the schedule and what is learned stay the same.
    # None: batch_size x num_workers x grad_accum_steps
    global_batch_size: int | None = None
    epochs: float = 800.0
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    steps_per_epoch: int | None = None  # None = clips per epoch // global batch, from the manifest
    grad_clip: float | None = None  # max global grad norm; None = no clipping
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 (or fp16) on GPU, fp32 on CPU
    compile: bool = False  # torch.compile the model before DDP wraps it; the first steps pay the compilation
    # (benchmarks/gpu_step.py measures what it gives). Checkpoints and exports hold the model itself
    compile_backend: str = "inductor"  # torch.compile's backend (aot_eager: tracing only, no code generation)
    prefetch_batches: int = 2  # batches Ray Data prepares ahead of the loop on each worker
    shuffle_buffer_batches: int = 0  # per-worker shuffle buffer (x batch_size clips), seeded by epoch, rank
    shuffle_buffer_initial_batches: int = 2  # it starts giving batches once it holds this many and fills up
    # as it goes (pipeline/data/shuffle.py); = shuffle_buffer_batches: fill it before the first step
    overlap_epochs: bool = True  # once a worker's stream has ended, the next epoch's pass starts while it
    # drains its buffer, so decoding goes on over the seam
    log_every_steps: int = 10  # progress line + MLflow metrics
    stall_timeout_s: float = 300.0  # no batch for this long: print what the data stream waits for; for
    # twice as long: fail with it (pipeline/train/watchdog.py). Above the slowest decode task; 0 = off
    audit_dir: str = ""  # a local folder on the workers: each appends "<step> <epoch> <position> <clip>
    # <uri>" per trained clip (consumed-<pid>.txt; resume.read_audit), an audit of what every step and epoch
    # trained on (exact resume)
    # a step with a non-finite loss or gradient is skipped; this many in a row roll back to the last
    # checkpoint, and more than max_nonfinite_rollbacks rollbacks stop the run (pipeline/train/nonfinite.py)
    max_nonfinite_in_a_row: int = 5
    max_nonfinite_rollbacks: int = 2

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum_steps", "log_every_steps", "max_nonfinite_in_a_row",
                     "shuffle_buffer_initial_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs <= 0 and self.max_steps is None:
            raise ConfigError(f"train.epochs must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.stall_timeout_s < 0:
            raise ConfigError(f"train.stall_timeout_s must be >= 0 (0: no watchdog), got "
                              f"{self.stall_timeout_s}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ConfigError(f"train.steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if self.max_nonfinite_rollbacks < 0:
            raise ConfigError(
                f"train.max_nonfinite_rollbacks must be >= 0, got {self.max_nonfinite_rollbacks}"
            )
        if self.shuffle_buffer_batches < 0:
            raise ConfigError(f"train.shuffle_buffer_batches must be >= 0, got {self.shuffle_buffer_batches}")
        if self.global_batch_size is not None:
            if self.global_batch_size < self.batch_size or self.global_batch_size % self.batch_size:
                raise ConfigError(
                    f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                    f"train.batch_size ({self.batch_size}): a step is whole micro-batches"
                )
            if self.grad_accum_steps != 1:
                raise ConfigError(
                    "set train.global_batch_size or train.grad_accum_steps, not both: the global batch "
                    "fixes how many micro-batches each worker accumulates"
                )
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"train.grad_clip must be > 0 (or null for no clipping), got {self.grad_clip}")

    def global_batch(self, workers: int) -> int:
        """Clips per optimizer step for a group of (at most) ``workers``."""
        return self.global_batch_size or self.batch_size * workers * self.grad_accum_steps


@dataclass
class Schedule:
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

    config: Any  # the job's config: run_name, seed, data, optim, train, checkpoint, tracking sections
    config_yaml: str
    schedule: Schedule
    objective: Objective  # what is trained: PretrainObjective, FinetuneObjective
    run: Run | None = None  # the MLflow run rank 0 logs into
    ledger_name: str | None = None  # the data error ledger's run name (ErrorLedger.get)
    probe_classes: int = 0  # > 0: the kNN monitor is on (config.probe), over this many classes
    run_dir: str | None = None  # <storage_path>/<run_name>: where the checkpoints are (rollback, torn ones)
    cursor: str | None = None  # the training stream's cursor actor (pipeline/data/resume.py): exact resume
    data_inputs: list[dict] | None = None  # the epoch plan's inputs (plan_inputs): resume checks them
    data_requests: str = ""  # what the stream's tasks ask Ray for (the resource plan): a stall's diagnosis
    startup: Startup | None = None  # the driver's start-up marks; rank 0 adds its own, prints at step 1


Verdict = Literal["step", "overflow", "skip", "rollback"]  # what became of an optimizer step


@dataclass
class MicroBatches:
    """What one step's forward and backward passes leave on this rank."""

    loss: torch.Tensor  # summed weighted micro-batch losses, on the device
    clips: int = 0
    videos: list[str] = field(default_factory=list)  # named when the step is not finite
    trained: list[dict] = field(default_factory=list)  # the stream's batches: their clips count as trained


def micro_steps(global_batch: int, batch_size: int, world: int, rank: int, step: int = 0) -> int:
    """This rank's micro-steps at optimizer step ``step``: the schedule's global batch split over ``world``
    ranks (elastic training: the global batch is the config's at any group size). The remainder goes to
    ranks that rotate with the step, so over any ``world`` consecutive steps every rank takes the same
    number of micro-batches: Ray's split gives every rank as many rows, and the ranks' shards then run out
    together (a fixed remainder for rank 0 left a third of each rank's rows untrained with 3 ranks)."""
    total = global_batch // batch_size
    return total // world + ((rank - step) % world < total % world)


def micro_loss_weight(global_batch: int, batch_size: int, world: int) -> float:
    """The factor on each micro-batch's mean loss so that DDP's average of the ranks' summed gradients is
    the gradient of the mean loss over the global batch, however unevenly the ranks split it."""
    return world * batch_size / global_batch


def _error_metrics(ledger_name: str | None) -> dict[str, float]:
    if not ledger_name:
        return {}

    try:
        snap = ErrorLedger.get(ledger_name).snapshot()
    except ValueError:  # no ledger (e.g. a data path that does not record errors)
        return {}
    out = {"data/videos": snap["videos"], "data/errors": snap["errors"]}
    out.update({f"data/errors/{reason}": n for reason, n in snap["by_reason"].items()})
    out.update({f"data/decoded_by/{backend}": n for backend, n in snap.get("by_backend", {}).items()})
    return out


class Rank0Reporter:
    """Rank 0's side jobs: progress lines, MLflow metrics, reconstruction pictures."""

    def __init__(self, args: LoopArgs):
        self.args = args
        cfg = args.config.tracking
        self.logger = (
            RunLogger(args.run, cfg.system_metrics, cfg.system_metrics_interval_s) if args.run else None
        )

    def log(self, step: int, epoch: int, lr: float, window: dict[str, float]) -> None:
        say(progress_line(step, self.args.schedule.total_steps, epoch, lr, window), flush=True)
        if self.logger:
            metrics = {"lr": lr, "epoch": epoch, **window, **_error_metrics(self.args.ledger_name)}
            metrics.pop("eta_s")
            self.logger.log_metrics(metrics, step)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        say(
            f"step {step}/{self.args.schedule.total_steps} | "
            + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
            flush=True,
        )
        if self.logger:
            self.logger.log_metrics(metrics, step)

    def picture(
        self, model: torch.nn.Module, pixel_values: torch.Tensor, mask: torch.Tensor, step: int
    ) -> None:
        if not self.logger:
            return

        original, masked, recon = reconstruct(model, pixel_values[:2], mask[:2])
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / f"reconstruction_step{step:08d}.png"
            title = f"{self.args.config.run_name} step {step}"
            save_reconstruction_png(png, original, masked, recon, title=title)
            self.logger.log_artifact(png, "reconstructions")

    def close(self) -> None:
        if self.logger:
            self.logger.close()


class TrainLoop:
    """One rank's training: the model, its optimizer and schedule, the data shard, the components."""

    def __init__(self, args: LoopArgs):
        self.args, self.cfg, self.schedule = args, args.config, args.schedule
        self.startup: Startup | None = args.startup or Startup(time.time())  # None once printed
        self.startup.mark("worker group")
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        # Ray Train creates the stream's split coordinator, an actor in a fresh process, at the group's first
        # request for the shard: asked for now, it starts while the model is built rather than after (it
        # reads nothing until a pass begins, so the cursor is still set first)
        ray.train.get_dataset_shard("train")
        # elastic: fewer ranks accumulate more micro-steps, so the global batch (and LR) stay the schedule's
        batch, world = self.cfg.train.batch_size, self.world
        self.even = (args.schedule.global_batch // batch) % world == 0  # every rank the same micro-steps
        self.loss_weight = micro_loss_weight(args.schedule.global_batch, batch, world)
        self.device = ray.train.torch.get_device()
        self.fetcher = ThreadPoolExecutor(1, thread_name_prefix="batches")  # the stall watchdog's next()
        self.next_pass: tuple[int, Callable] | None = None  # (epoch, its batches) started ahead
        set_stall_timeout(self.cfg.train.stall_timeout_s)  # validation and probe passes are watched too
        ckpt.seed_everything(derive_seed(self.cfg.seed, self.rank))
        self.objective = args.objective
        self.module = self.objective.build_model(self.cfg)  # the model itself: checkpoints, probes, pictures
        t = self.cfg.train
        self.amp_dtype = autocast_dtype(t.precision, self.device)
        # the model as trained: DDP-wrapped, or sharded in place by FSDP (scaling.strategy)
        self.placement = Placement(
            self.module, self.cfg.scaling.strategy, self.device,
            param_dtype=self.amp_dtype if self.amp_dtype == torch.bfloat16 else None,
            compile_with=t.compile_backend if t.compile else None,
            build_replica=lambda: self.objective.build_model(self.cfg))
        self.model = self.placement.model
        self.optimizer = self.objective.build_optimizer(self.module, self.schedule, self.cfg)
        p = self.schedule
        self.scheduler = WarmupCosine(
            self.optimizer, p.total_steps, p.warmup_steps, p.peak_lr, p.min_lr, p.warmup_lr
        )
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.checkpointer = ckpt.Checkpointer(
            ckpt.TrainState(self.model, self.optimizer, self.scheduler, self.scaler), rank=self.rank,
            world=self.world, seed=self.cfg.seed, run_name=self.cfg.run_name, run_dir=args.run_dir,
            upload=self.cfg.checkpoint.upload, job_config_yaml=args.config_yaml)
        self.rolled_back = False  # the last step ended in a rollback
        self.guard = NonFiniteGuard(t.max_nonfinite_in_a_row, t.max_nonfinite_rollbacks)
        self.data_fingerprint = fingerprint(args.data_inputs) if args.data_inputs else ""
        self.startup.mark("model, optimizer")
        self.resumed, self.progress = self.restore()
        self.startup.mark("restore")
        self.start_step = self.progress.step
        self.reporter = Rank0Reporter(args) if self.rank == 0 else None
        self.monitor = (
            ProbeMonitor(self.cfg.probe, args.probe_classes, p.total_steps) if args.probe_classes else None
        )
        self.meter = StepMeter(p.total_steps, self.start_step, self.world)
        # which videos this rank trained on (exact resume)
        self.consumption = Consumption(self.cfg.data.clips_per_video, self.cfg.train.audit_dir)
        self.source_names = [spec.label() for spec in source_specs(self.cfg.data)]
        self.clips_by_source = np.zeros(len(self.source_names))  # in the current log window
        self.last_batch: tuple | None = None  # what the reconstruction picture needs
        self.last_loss: torch.Tensor | None = None

    def restore(self) -> tuple[bool, ckpt.Progress]:
        """(resumed?, progress): the checkpointer's choice (past torn ones), the data position checked
        against this run's data; else a fresh start."""
        progress = self.checkpointer.load()
        if progress is None:
            return False, ckpt.Progress(world_size=self.world, data_fingerprint=self.data_fingerprint)
        progress.world_size = self.world
        self.check_data(progress)
        return True, progress

    def check_data(self, progress: ckpt.Progress) -> None:
        """A checkpoint's done-bitmap indexes the positions of the data it was made on: on other data (a
        changed manifest, other pieces) the epoch starts afresh, and rank 0 says what changed."""
        theirs, mine = progress.data_fingerprint, self.data_fingerprint
        if theirs and mine and theirs != mine and (progress.epoch_done or progress.step_in_epoch):
            if self.rank == 0:
                change = describe_change(progress.data_inputs, self.args.data_inputs or [])
                say(f"[{self.cfg.run_name}] warning: the data differs from the checkpoint's ({change}): "
                    f"epoch {progress.epoch} starts afresh at step {progress.step}", flush=True)
            progress.step_in_epoch, progress.epoch_done, progress.epoch_begun = 0, "", []
        progress.data_fingerprint = mine
        progress.data_inputs = self.args.data_inputs or []

    def run(self) -> None:
        alive = threading.Event()
        if self.rank == 0 and self.args.cursor is not None and self.cfg.scaling.group_timeout_s:
            threading.Thread(target=self.beat, args=(alive,), daemon=True, name="beat").start()
        try:
            self.announce()
            if self.monitor and self.start_step == 0:  # the random init's score: the baseline of the curve
                self.report(0, self.monitor.run(self.placement.replica(0).videomae, self.device, self.rank))
            while self.progress.step < self.schedule.total_steps:
                self.train_epoch()
        finally:
            alive.set()
            if self.reporter:
                self.reporter.close()

    def beat(self, stop: threading.Event) -> None:
        """Rank 0's signs of life while the group runs, for the driver's watch (watchdog.GroupWatch)."""
        cursor = get_cursor(self.args.cursor)
        while not stop.wait(max(1.0, self.cfg.scaling.group_timeout_s / 10)):
            cursor.beat.remote()

    def announce(self) -> None:
        if not self.reporter:
            return
        p, progress = self.schedule, self.progress
        where = f"resuming from step {progress.step} (epoch {progress.epoch})" if self.resumed else "starting"
        say(
            f"[{self.cfg.run_name}] {where}: {p.total_steps} steps, {p.steps_per_epoch} per epoch, "
            f"global batch {p.global_batch}, peak lr {p.peak_lr:.3g}, {self.world} worker(s) x "
            f"{self.micro_steps_shown()} micro-step(s) on "
            f"{self.device}, precision {self.amp_dtype or torch.float32}",
            flush=True,
        )

    def start_pass(self, started_ahead: bool = False) -> None:
        """Point the stream at this epoch, its done videos and clips skipped (a resumed epoch), before a
        rank reads; ``started_ahead``: this rank began the pass early (``start_next_pass``), rank 0 having
        pointed the cursor at the fresh epoch then."""
        progress = self.progress
        done = Consumption.unpack(base64.b64decode(progress.epoch_done)) if progress.epoch_done else None
        begun = {int(p): int(m) for p, m in progress.epoch_begun}
        self.consumption.start_epoch(progress.epoch, done, begun)
        if self.args.cursor is None:
            return
        if self.rank == 0 and not started_ahead:
            cursor = get_cursor(self.args.cursor)
            ray.get(cursor.set.remote(progress.epoch, self.consumption.packed(), begun))
        barrier()

    def open_pass(self) -> Iterator[dict[str, np.ndarray]]:
        """This rank's split of a new pass of the stream, in numpy batches of ``batch_size`` rows. Its first
        ``next()`` waits in Ray Data's split coordinator until every rank has asked for the pass."""
        t = self.cfg.train
        shard = ray.train.get_dataset_shard("train")
        return iter(shard.iter_batches(batch_size=t.batch_size, batch_format="numpy",
                                       prefetch_batches=t.prefetch_batches))

    def start_next_pass(self, epoch: int) -> None:
        """This rank's stream of the epoch before ``epoch`` has ended (its rows are in the shuffle buffer):
        start the pass of ``epoch`` now, in a thread that reads its batches ahead, up to a full shuffle
        buffer's worth, while the current buffer drains; the new pass's buffer then starts at full depth
        instead of ramping up after the seam. Rank 0 first points the cursor at the fresh epoch; the pass's
        first operator reads it only once every rank has joined the pass (the split coordinator's
        barrier), so no rank reads the old epoch's."""
        t = self.cfg.train
        depth = max(t.shuffle_buffer_batches, t.shuffle_buffer_initial_batches)  # batches read ahead at most
        read: list[dict[str, np.ndarray]] = []
        state: dict[str, Any] = {}
        taken = threading.Event()  # the pass has begun: the thread stops reading ahead

        def read_ahead() -> None:
            try:
                if self.rank == 0 and self.args.cursor is not None:
                    ray.get(get_cursor(self.args.cursor).set.remote(epoch, b"", {}))
                upstream = state["upstream"] = self.open_pass()
                while len(read) < depth and not taken.is_set():
                    batch = next(upstream, None)
                    if batch is None:
                        state["ended"] = True
                        break
                    read.append(batch)
            except BaseException as e:  # raised in the loop's thread when it reads the pass
                state["error"] = e

        thread = threading.Thread(target=read_ahead, name=f"pass-{epoch}", daemon=True)  # a run ending in
        thread.start()  # the drain leaves it waiting for ranks that stopped: it must not hold the process

        def batches(at_hand: Callable[[int], None]) -> Iterator[dict[str, np.ndarray]]:
            taken.set()
            thread.join()  # at most the batch it is reading: the upstream is then this thread's alone
            if "error" in state:
                raise state["error"]
            at_hand(sum(map(num_rows, read)))  # the buffer starts this deep
            yield from read
            if not state.get("ended"):
                yield from state["upstream"]

        self.next_pass = (epoch, batches)

    def epoch_batches(self):
        """An iterator over this rank's shard for the current epoch through the seeded shuffle buffer
        (pipeline/data/shuffle.py), under the stall watchdog. When this rank's stream ends and another epoch
        follows, the next pass starts (``train.overlap_epochs``)."""
        t, progress, schedule = self.cfg.train, self.progress, self.schedule
        ahead, self.next_pass = self.next_pass, None
        if ahead is not None and ahead[0] != progress.epoch:
            raise RuntimeError(f"the pass started ahead is epoch {ahead[0]}'s, but epoch {progress.epoch} "
                               "comes next")
        self.start_pass(started_ahead=ahead is not None)
        epoch = progress.epoch
        upstream = (ahead[1](lambda rows: shuffled.start_deeper(rows)) if ahead is not None
                    else self.open_pass())
        epoch_ends_at = progress.step - progress.step_in_epoch + schedule.steps_per_epoch  # (or sooner)
        another_follows = epoch_ends_at < schedule.total_steps

        def then_start_next() -> Iterator[dict[str, np.ndarray]]:
            yield from upstream
            if t.overlap_epochs and another_follows:
                self.start_next_pass(epoch + 1)

        shuffled = RampedShuffle(then_start_next(), t.batch_size, t.shuffle_buffer_batches * t.batch_size,
                                 t.shuffle_buffer_initial_batches * t.batch_size,
                                 derive_seed(self.cfg.seed, epoch, self.rank))
        return Watched(map(torch_collate, shuffled), t.stall_timeout_s,
                       lambda: diagnose_stream(self.args.data_requests),
                       lambda line: say(f"[rank {self.rank}] {line}"), self.fetcher)

    def train_epoch(self) -> None:
        """One pass of the stream. It ends when the epoch's quota of steps is met or its data runs out (then
        on every rank at the same step); either way the epoch's end runs before the next pass starts."""
        progress, schedule = self.progress, self.schedule
        if progress.step_in_epoch >= schedule.steps_per_epoch:  # the checkpoint was taken at an epoch's end
            self.next_epoch()
        reopened = progress.step_in_epoch > 0 or bool(progress.epoch_done or progress.epoch_begun)
        batches = self.epoch_batches()
        steps_this_pass, ran_out = 0, False
        while progress.step < schedule.total_steps:
            if not self.train_step(batches):
                ran_out = True
                break
            steps_this_pass += 1
            quota_met = progress.step_in_epoch >= schedule.steps_per_epoch
            if self.rolled_back:  # back at a step already checkpointed and logged: nothing to redo there
                self.rolled_back = False
            else:
                self.after_step(epoch_end=quota_met)
            if quota_met:
                break
        if steps_this_pass == 0 and not reopened:
            raise RuntimeError(
                f"epoch {progress.epoch} gave rank {self.rank} no full batch of {self.cfg.train.batch_size} "
                f"clips: the dataset has too few readable videos for {self.world} worker(s) x batch_size "
                f"{self.cfg.train.batch_size} (see the data error report)"
            )
        if ran_out:  # a short epoch (or a reopened one with nothing left): its end is now
            self.report(progress.step, self.end_of_epoch(last_step=False))
        if progress.step < schedule.total_steps:
            self.next_epoch()

    def next_epoch(self) -> None:
        progress = self.progress
        progress.epoch += 1
        progress.step_in_epoch, progress.epoch_done, progress.epoch_begun = 0, "", []

    def end_of_epoch(self, last_step: bool) -> dict[str, float]:
        """What runs when an epoch's pass ends (``last_step``: or the run ends inside one): validation and
        ``best/`` (finetuning); the steps the epoch took, as a metric."""
        out: dict[str, float] = {}
        if self.objective.should_validate(epoch_end=not last_step, last_step=last_step):
            out.update(self.objective.validate(self.placement.replica(self.progress.step), device=self.device,
                                               rank=self.rank, progress=self.progress))
        if not last_step:
            out["epoch/steps"] = self.progress.step_in_epoch
        return out

    def next_batches(self, batches):
        """This step's micro-batches, lazily; None when the shard ran out. With every rank taking the same
        number of micro-batches the shards run out at the same step; with uneven counts (an elastic group
        whose size does not divide the global batch) the step's batches are fetched first and the ranks
        agree that all have theirs before any computes (else one would wait in DDP's all-reduce)."""

        def fetch():
            waited = time.perf_counter()
            batch = next(batches, None)
            self.meter.data_wait(time.perf_counter() - waited)
            if self.startup is not None and self.startup.marks[-1][0] == "restore":
                self.startup.mark("first batch")
            return batch

        accum = self.micro_steps_now()
        if self.even:
            return (fetch() for _ in range(accum))
        fetched = [fetch() for _ in range(accum)]
        have_all = float(all(b is not None for b in fetched))
        (everyone,) = across_ranks([have_all], self.device, dist.ReduceOp.MIN)
        return iter(fetched) if everyone else None

    def micro_steps_shown(self) -> str:
        """Micro-steps per rank and step: ``N``, or ``N-M`` when the group's size does not divide the
        global batch's micro-batches (the remainder rotates over the ranks)."""
        total = self.schedule.global_batch // self.cfg.train.batch_size
        low = total // self.world
        return str(low) if self.even else f"{low}-{low + 1}"

    def micro_steps_now(self) -> int:
        """This rank's micro-batches at the coming step (see micro_steps: the remainder rotates)."""
        return micro_steps(self.schedule.global_batch, self.cfg.train.batch_size, self.world, self.rank,
                           self.progress.step)

    def train_step(self, batches) -> bool:
        """One optimizer step over this rank's micro-batches; False when a shard ran out (then on every
        rank at the same step)."""
        step_batches = self.next_batches(batches)
        done = None if step_batches is None else self.forward_backward(step_batches)
        if done is None:
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.record_consumption(done.trained)
        verdict = self.update(done)
        self.lr = self.scheduler.lr
        self.scheduler.step()
        progress = self.progress
        progress.step += 1
        progress.step_in_epoch += 1
        progress.clips_seen += self.schedule.global_batch  # (uneven micro-steps: not clips x world)
        self.meter.step_done(done.clips, done.loss if verdict in ("step", "overflow") else None)
        if verdict in ("step", "overflow"):
            self.last_loss = done.loss
        if verdict == "rollback":
            self.roll_back()
        if self.startup is not None:  # where the seconds to this first step went, once
            self.startup.mark("first step")
            if self.rank == 0:
                say(f"[{self.cfg.run_name}] {self.startup.line()}", flush=True)
            self.startup = None
        return True

    def forward_backward(self, step_batches) -> MicroBatches | None:
        """Loss and gradients of this rank's micro-batches (DDP all-reduces on the last one only); None
        when the shard ran out mid-step. The loss stays on the device: no host sync per micro-step."""
        cfg, accum = self.cfg, self.micro_steps_now()
        done = MicroBatches(torch.zeros((), device=self.device))
        for micro, batch in enumerate(step_batches):
            if batch is None:
                return None
            frames = batch["pixel_values"].to(self.device, non_blocking=True)  # uint8 (B, T, H, W, C)
            pixel_values = to_model_input(frames, cfg.data.mean, cfg.data.std)  # float (B, T, C, H, W)
            with (self.placement.gradient_sync(micro == accum - 1),
                  torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)):
                loss, self.last_batch = self.objective.loss(self.model, batch, pixel_values, rank=self.rank,
                                                            step=self.progress.step, micro=micro)
                loss = loss * self.loss_weight  # 1 / micro-steps when every rank takes as many
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            done.loss += loss.detach()
            done.clips += pixel_values.shape[0]
            done.videos.extend(batch.get("video", []))
            if "position" in batch:
                done.trained.append(batch)
        return done

    def record_consumption(self, trained: list[dict]) -> None:
        """The step's clips, recorded once it has all its micro-batches (a shard may run out mid-step)."""
        for batch in trained:
            self.consumption.add(batch["epoch"].numpy(), batch["position"].numpy(), batch["clip"].numpy(),
                                 self.progress.step + 1, batch.get("video"))
            np.add.at(self.clips_by_source, batch["source"].numpy(), 1)

    def update(self, done: MicroBatches) -> Verdict:
        """Clip the gradients and take the optimizer step when loss and gradients are finite; otherwise
        skip it (the guard counts, and asks for a rollback past its bound)."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.train.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, self.cfg.train.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        grad_norm = plain_tensor(grad_norm)  # FSDP: a DTensor over the ranks' shards
        loss_ok, grads_ok = self.guard.check(done.loss, grad_norm)
        verdict: Verdict
        if loss_ok and grads_ok:
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.guard.stepped()
            verdict = "step"
        elif loss_ok and self.scaler:  # fp16 overflow: GradScaler skips the step and lowers its scale
            self.scaler.update()
            verdict = "overflow"
        else:  # weights and optimizer state untouched; under fp16 the scaler lowers its scale
            if self.scaler:
                self.scaler.update()
            step = self.progress.step + 1
            batch = f"rank {self.rank}'s last batch (its own loss {float(done.loss):.4g})"
            verdict = self.guard.skipped(step, done.videos, batch)
            if self.rank == 0:
                in_a_row = self.guard.in_a_row or self.guard.in_a_row_limit
                say(f"step {step}: loss {float(done.loss):.4g}, gradient norm {float(grad_norm):.4g}: not "
                    f"finite, step skipped ({in_a_row} in a row, {self.guard.total} in all)", flush=True)
        self.optimizer.zero_grad(set_to_none=True)
        return verdict

    def roll_back(self) -> None:
        """Every rank (they decide together) reloads the last checkpoint's weights, optimizer, schedule and
        step; under fp16 with a lower loss scale. The data stream goes on: the batches that failed are not
        replayed, and the data position (epoch, its done videos, this pass's consumption) stays the
        pass's, so a later checkpoint never stores one epoch with another's positions."""
        try:
            loaded, uri = self.checkpointer.roll_back()
        except ckpt.NothingToRollBackTo:
            raise NonFiniteTraining(
                f"step {self.progress.step}: {self.guard.in_a_row_limit} non-finite steps in a row before "
                "the first checkpoint, nothing to roll back to: lower optim.lr (or base_lr) or set "
                "train.grad_clip"
            ) from None
        if self.scaler:  # the checkpoint's loss scale, halved per rollback so far: fp16 overflowed there
            restored = self.scaler.get_scale()
            self.scaler.update(new_scale=restored / 2**self.guard.rollbacks)
            self.report(loaded.step, {"rollback/checkpoint_loss_scale": restored,
                                      "rollback/loss_scale": self.scaler.get_scale()})
        for name in ("step", "clips_seen"):  # in place: the epoch loop holds this object
            setattr(self.progress, name, getattr(loaded, name))
        self.rolled_back = True
        self.progress.world_size = self.world
        if self.rank == 0:
            say(f"[{self.cfg.run_name}] rolled back to {storage.redact(uri)} (step {loaded.step}), "
                f"rollback {self.guard.rollbacks} of at most {self.guard.rollback_limit}", flush=True)

    def after_step(self, epoch_end: bool = False) -> None:
        """The step's side jobs; ``epoch_end``: the step met the epoch's quota, so the epoch ends here."""
        step = self.progress.step
        evaluated: dict[str, float] = {}
        if epoch_end or self.done(step):
            evaluated.update(self.end_of_epoch(last_step=not epoch_end))
        if self.should_probe(step):
            evaluated.update(self.monitor.run(self.placement.replica(step).videomae, self.device, self.rank))
        self.report(step, evaluated)
        if self.should_log(step):
            self.log(step)
        if self.should_picture(step):  # on every rank: under FSDP the whole model is gathered for it
            module = self.placement.replica(step)
            if self.reporter is not None:
                self.reporter.picture(module, *self.last_batch, step)
        if self.should_checkpoint(step):
            self.checkpoint()

    def done(self, step: int) -> bool:
        return step == self.schedule.total_steps

    def should_probe(self, step: int) -> bool:
        return self.monitor is not None and self.monitor.should_probe(step)

    def should_log(self, step: int) -> bool:
        return step % self.cfg.train.log_every_steps == 0 or self.done(step)

    def should_picture(self, step: int) -> bool:
        every = self.cfg.tracking.recon_every_steps
        return (
            self.args.run is not None  # rank 0's MLflow run, which the picture goes to
            and self.last_batch is not None
            and ((every and step % every == 0) or self.done(step))
        )

    def should_checkpoint(self, step: int) -> bool:
        """Never inside a run of non-finite steps (a rollback must go to weights from before it), except at
        the end: skipped steps leave the weights as they were."""
        return self.done(step) or (step % self.cfg.checkpoint.every_steps == 0 and self.guard.in_a_row == 0)

    def report(self, step: int, metrics: dict[str, float]) -> None:
        if self.reporter and metrics:
            self.reporter.log_eval(step, metrics)

    def log(self, step: int) -> None:
        """Progress line and MLflow metrics: the loss averaged over ranks (a host sync: log steps only)."""
        window = self.meter.window(step)
        (loss_total,) = across_ranks([window["loss"]], self.device, dist.ReduceOp.SUM)
        (peak_max,) = across_ranks([peak_rss_mb()], self.device, dist.ReduceOp.MAX)
        by_source = across_ranks(self.clips_by_source.tolist(), self.device, dist.ReduceOp.SUM)
        self.clips_by_source[:] = 0
        window.update(loss=loss_total / self.world, peak_rss_mb_max_worker=peak_max,
                      nonfinite_steps=self.guard.total, nonfinite_rollbacks=self.guard.rollbacks,
                      torn_checkpoints=self.checkpointer.torn_found)
        window.update({f"data/clips/{name}": n for name, n in zip(self.source_names, by_source, strict=True)})
        if self.reporter:
            self.reporter.log(step, self.progress.epoch, self.lr, window)

    def checkpoint(self) -> None:
        """The epoch's record gathered over the ranks, then every rank's share saved (ckpt.Checkpointer)."""
        progress = self.progress
        self.gather_consumption()
        loss = float(self.last_loss) if self.last_loss is not None else float("nan")
        self.checkpointer.save(progress, {"step": progress.step, "epoch": progress.epoch, "loss": loss,
                                          "start_step": self.start_step, "clips_seen": progress.clips_seen,
                                          "peak_rss_mb": peak_rss_mb()})

    def gather_consumption(self) -> None:
        """Every rank's trained clips into the epoch's record (the same on every rank), kept in the
        progress the checkpoint saves: the done videos' bitmap and the begun videos' clip masks."""
        mine = self.consumption.local()
        if distributed():
            everyone: list = [None] * self.world
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        self.consumption.merge(everyone)
        self.progress.epoch_done = base64.b64encode(self.consumption.packed()).decode()
        self.progress.epoch_begun = [[p, m] for p, m in sorted(self.consumption.partial.items())]


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's entry point on every worker."""
    TrainLoop(loop_config["args"]).run()
