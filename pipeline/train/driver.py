"""The one training driver: what pretraining and finetuning do on the driver, in the order a user needs.

The storage location is checked first, before Ray (``checked_storage``: seconds, a clear error). The job
then starts Ray, reads its sources on the cluster (their sizes fix the schedule: steps, warmup, LRs by the
original's scaling rule, ``schedule_run``), makes its own checks (labels, weights), and inside
``session(...)``:

1. the MLflow run is (re)opened by name and gets the config and the schedule (tracking.job_run);
2. the run gets a fresh error ledger and the stream's cursor; the job builds its datasets with them;
3. ``session.fit(objective, datasets)``: Ray Train's TorchTrainer runs ``loop.train_loop_per_worker``;
   resume is automatic (``<storage_path>/<run_name>``'s last checkpoint, after a worker failure or a rerun);
4. ``session.finish(result)``: the data error report, the final checkpoint; ``session.export(dir)`` copies
   the model the job chooses into ``export/``.

The pretraining and finetuning jobs (pipeline/train/pretrain.py, finetune.py) differ only in their
config, checks, datasets, objective and what they export.
"""

from __future__ import annotations

import _thread
import math
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import config as config_lib
from pipeline import runtime, storage, tracking
from pipeline.config import ConfigError
from pipeline.data import stream
from pipeline.data.errors import ErrorLedger
from pipeline.data.plan import plan_inputs, source_quotas
from pipeline.data.resume import create_cursor
from pipeline.train import checkpointing, resources, startup, watchdog
from pipeline.train.loop import LoopArgs, Schedule, train_loop_per_worker
from pipeline.train.optim import scaled_lr
from pipeline.train.sharding import Strategy


@dataclass
class ScalingSection:
    # Ray Train workers (DDP ranks): a count, or [min, max] for elastic training: a lost node shrinks the
    # group to the workers left (not below min), returning capacity grows it back (docs/training.md)
    num_workers: int | tuple[int, int] = 1
    use_gpu: bool | None = None  # None: GPUs if the cluster has at least min workers' worth of them
    cpus_per_worker: float = 1.0
    resources_per_worker: dict = field(default_factory=dict)  # custom resources too, e.g. {"train_slot": 1}
    max_failures: int = 3  # worker failures Ray Train recovers from (restart from the last checkpoint)
    resize_interval_s: float = 60.0  # elastic: how often a healthy group looks for room to grow (then it
    # restarts from the last checkpoint with more workers)
    ray_address: str | None = None  # None: RAY_ADDRESS (set under `ray job submit`), else a local Ray
    group_timeout_s: float = 300.0  # a worker group with no sign of life this long (it cannot be placed,
    # or cannot re-form after a failure): the driver prints why; twice as long: it stops the run. 0 = off
    check_resources: bool = True  # refuse a plan whose data stream cannot run beside the workers on the
    # cluster as it is (pipeline/train/resources.py); false for an autoscaling cluster whose nodes come later
    strategy: Strategy = "ddp"  # ddp: a whole model per rank; fsdp: FSDP2, parameters, gradients and
    # optimizer state sharded over the ranks (pipeline/train/sharding.py), for models one device cannot hold

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    def validate(self) -> None:
        if self.min_workers < 1 or self.max_workers < self.min_workers:
            raise ConfigError(f"scaling.num_workers must be >= 1, or [min, max] with 1 <= min <= max, got "
                              f"{self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"scaling.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.resize_interval_s <= 0:
            raise ConfigError(f"scaling.resize_interval_s must be > 0, got {self.resize_interval_s}")
        if self.group_timeout_s < 0:
            raise ConfigError(f"scaling.group_timeout_s must be >= 0 (0: no watch), got "
                              f"{self.group_timeout_s}")
        if self.max_failures < -1:
            raise ConfigError(f"scaling.max_failures must be >= -1 (-1 = unlimited), got {self.max_failures}")

    def worker_request(self, use_gpu: bool) -> dict[str, float]:
        """What one training worker asks Ray for."""
        return {"CPU": self.cpus_per_worker, **({"GPU": 1.0} if use_gpu else {}), **self.resources_per_worker}

    def ray_scaling(self, use_gpu: bool):
        """Ray Train's ScalingConfig: a fixed group, or an elastic (min, max) one."""
        import ray.train

        workers = self.num_workers if isinstance(self.num_workers, int) else tuple(self.num_workers)
        if workers == (self.min_workers,) * 2:
            workers = self.min_workers
        interval = self.resize_interval_s
        elastic = {} if isinstance(workers, int) else {"elastic_resize_monitor_interval_s": interval}
        resources = {k: v for k, v in self.worker_request(use_gpu).items() if k != "GPU"}
        return ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources,
                                       **elastic)


def checked_storage(storage_path: str) -> str:
    """The absolute storage location, reachable (an s3:// bucket must exist; a local folder is made)."""
    path = storage.absolute(storage_path)
    try:
        if storage.is_s3(path):
            storage.check_reachable(path)
        else:
            storage.makedirs(path)
    except storage.StorageError as e:
        raise storage.StorageError(f"storage_path: {e}") from e
    return path


def schedule_run(cfg: Any, num_clips: int) -> Schedule:
    """Steps per epoch (a full batch on every rank, as Ray's equal split delivers), total and warmup steps,
    and the LRs by the linear scaling rule.

    As in the original scripts, the rule counts *videos* per step, not clips: with ``clips_per_video`` N
    (the original's ``num_sample``) a step of B clips holds B / N videos, and ``base_lr``, ``min_lr`` and
    ``warmup_lr`` are all scaled by that / 256. An absolute ``optim.lr`` is used as given, with the
    configured ``min_lr`` and ``warmup_lr``.
    """
    t, world = cfg.train, cfg.scaling.max_workers
    global_batch = t.global_batch(world)
    micro = global_batch // t.batch_size  # a step's micro-batches, spread over however many ranks there are
    if micro < world:
        raise ConfigError(
            f"train.global_batch_size {global_batch} is {micro} micro-batch(es) of train.batch_size "
            f"{t.batch_size}, fewer than scaling.num_workers {world}: every worker needs one per step "
            "(lower train.batch_size or raise the global batch)"
        )
    per_epoch = t.steps_per_epoch or (num_clips // world) // t.batch_size * world // micro
    if per_epoch < 1:
        raise ConfigError(
            f"the dataset has {num_clips} clips per epoch, fewer than one global batch of {global_batch} "
            f"(train.batch_size {t.batch_size} x scaling.num_workers {world} x train.grad_accum_steps "
            f"{t.grad_accum_steps}, or train.global_batch_size): use more videos or a smaller batch"
        )
    uneven = [n for n in range(cfg.scaling.min_workers, world + 1) if micro % n]
    if cfg.scaling.strategy == "fsdp" and uneven:  # DDP takes the remainder on some ranks; FSDP cannot
        raise ConfigError(
            f"scaling.strategy=fsdp needs every group size to split a step's {micro} micro-batches evenly "
            f"(each micro-batch's forward gathers the parameters on all ranks together), and a group of "
            f"{', '.join(map(str, uneven))} worker(s) would not: choose scaling.num_workers and "
            "train.grad_accum_steps (or train.global_batch_size) so that it does")
    total = t.max_steps or max(1, math.ceil(t.epochs * per_epoch))
    o = cfg.optim
    warmup = o.warmup_steps if o.warmup_steps is not None else round(o.warmup_epochs * per_epoch)
    videos_per_step = global_batch / cfg.data.clips_per_video
    if o.lr:
        peak, floor, start = o.lr, o.min_lr, o.warmup_lr
    else:
        peak, floor, start = (scaled_lr(v, videos_per_step) for v in (o.base_lr, o.min_lr, o.warmup_lr))
    return Schedule(total_steps=total, steps_per_epoch=per_epoch, warmup_steps=min(warmup, total),
                    peak_lr=peak, global_batch=global_batch, min_lr=floor, warmup_lr=start)


def resolve_use_gpu(scaling: ScalingSection) -> bool:
    if scaling.use_gpu is not None:
        return scaling.use_gpu
    import ray

    return ray.cluster_resources().get("GPU", 0) >= scaling.min_workers


@dataclass
class Finished:
    """What a training attempt left behind."""

    checkpoint: Any  # the last ray.train.Checkpoint, or None
    checkpoint_uri: str | None
    final_step: int
    start_step: int  # the step the last attempt started from (0 unless it resumed)
    metrics: dict
    error_report_uri: str
    num_errors: int


class Session:
    """A training job's MLflow run, error ledger and Ray Train run (see the module docstring)."""

    def __init__(self, cfg: Any, run: tracking.Run, schedule: Schedule, storage_path: str):
        self.cfg, self.run, self.schedule, self.storage_path = cfg, run, schedule, storage_path
        self.run_dir = storage.join(storage_path, cfg.run_name)
        self.config_yaml = config_lib.to_yaml(cfg)
        self.ledger = ErrorLedger.create(cfg.run_name)
        self.cursor = create_cursor(self.ledger.run_name)  # which epoch a pass reads, what is done
        self.data_inputs: list[dict] | None = None  # set by training_stream
        startup.mark("mlflow run, ledger")

    def training_stream(self, sources: list, mode: str):
        """The ``train`` dataset: the seeded epoch plan over ``sources``, resumable (data/plan.py,
        data/resume.py); what the plan depends on is kept for the checkpoints (a resume on other data is
        seen)."""
        data = self.cfg.data
        quotas = source_quotas(sources, data.epoch_videos)
        self.data_inputs = plan_inputs(sources, quotas, data.group_pieces, self.cfg.seed, data.shuffle)
        return stream.build_stream(data, mode, sources, self.ledger, self.cfg.seed, self.ledger.run_name)

    def fit(self, objective: Any, datasets: dict[str, Any], probe_classes: int = 0):
        """Run the TorchTrainer of ``objective`` over ``datasets`` to the schedule's last step."""
        import ray
        import ray.train
        from ray.train.torch import TorchTrainer

        cfg = self.cfg
        use_gpu = resolve_use_gpu(cfg.scaling)
        stages = {name: resources.stages(name, ds) for name, ds in datasets.items()}
        if cfg.scaling.check_resources:
            self.check_resources(stages, use_gpu)
        requests = ", ".join(f"{stage.name.removeprefix('train: ')} {{{resources.show(stage.request)}}}"
                             for stage in stages.get("train", []))
        startup.mark("datasets, resource plan")
        args = LoopArgs(cfg, self.config_yaml, self.schedule, objective, self.run, self.ledger.run_name,
                        probe_classes, self.run_dir, cursor=self.ledger.run_name,
                        data_inputs=self.data_inputs, data_requests=requests, startup=startup.current())
        fs, path = (
            (storage.s3_filesystem_for_uploads(), storage.resolve(self.storage_path)[1])
            if storage.is_s3(self.storage_path)
            else (None, self.storage_path)
        )
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"args": args},
            scaling_config=cfg.scaling.ray_scaling(use_gpu),
            run_config=ray.train.RunConfig(
                name=cfg.run_name,
                storage_path=path,
                storage_filesystem=fs,
                failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            ),
            datasets=datasets,
        )
        started = time.time()
        # Ray Train aborts its run on SIGINT (Ctrl-C) when fit() runs on the main thread: the group watch
        # raises one there (watchdog.GroupWatch); elsewhere (a driver in a thread) it can only warn
        main = threading.current_thread() is threading.main_thread()
        s = cfg.scaling
        request = s.worker_request(use_gpu)
        beats = lambda: ray.get(self.cursor.count_beats.remote(), timeout=30)  # noqa: E731
        diagnose = lambda: watchdog.diagnose_group(request, s.min_workers, s.max_workers)  # noqa: E731
        abort = (lambda: _thread.interrupt_main(signal.SIGINT)) if main else None
        with watchdog.GroupWatch(beats, cfg.scaling.group_timeout_s, diagnose, abort) as watch:
            try:
                result = trainer.fit()
            except BaseException as e:
                if watch.failure:
                    raise watchdog.GroupStall(watch.failure) from e
                raise
        if watch.failure:
            raise watchdog.GroupStall(watch.failure)
        print(f"training finished in {time.time() - started:.0f} s", flush=True)
        return result

    def check_resources(self, stages: dict[str, list[resources.Stage]], use_gpu: bool) -> None:
        """Refuse, before anything starts, a resource plan whose data stream could never run beside the
        workers (resources.check); warn of one whose stages must take turns."""
        s = self.cfg.scaling
        for warning in resources.check(resources.cluster_nodes(), s.worker_request(use_gpu), s.min_workers,
                                       s.max_workers, stages):
            print(f"warning: {warning}", flush=True)

    def finish(self, result) -> Finished:
        """The data error report (storage and MLflow), and where the last checkpoint is."""
        report_uri = storage.join(self.run_dir, "data_errors.jsonl")
        num_errors = self.ledger.write_report(report_uri)
        snap = self.ledger.snapshot()
        metrics = dict(result.metrics or {})
        self.run.log_metrics(
            {"data/videos_total": snap["videos"], "data/errors_total": snap["errors"],
             **{f"data/errors_total/{k}": v for k, v in snap["by_reason"].items()},
             **{f"data/decoded_by_total/{k}": v for k, v in snap["by_backend"].items()}},
            step=int(metrics.get("step", 0)),
        )
        with tempfile.TemporaryDirectory() as tmp:
            local_report = Path(tmp) / "data_errors.jsonl"
            local_report.write_text(storage.read_text(report_uri))
            self.run.log_artifact(local_report, "data")
        if num_errors:
            print(
                f"data: {num_errors} of {snap['videos']} videos could not be used, by reason "
                f"{snap['by_reason']}: see {report_uri}",
                flush=True,
            )
        checkpoint, checkpoint_uri, final_step = result.checkpoint, None, 0
        if checkpoint is not None:
            checkpoint_uri = checkpoint.path if not storage.is_s3(self.run_dir) else f"s3://{checkpoint.path}"
            with checkpoint.as_directory() as directory:
                final_step = checkpointing.read_progress(directory).step
        return Finished(checkpoint, checkpoint_uri, final_step, int(metrics.get("start_step", final_step)),
                        metrics, report_uri, num_errors)

    def export(self, model_dir: str | Path) -> str:
        """Copy the transformers-format model in ``model_dir`` to ``<run>/export`` and into MLflow."""
        export_uri = storage.join(self.run_dir, "export")
        checkpointing.export_model(model_dir, export_uri)
        for name in checkpointing.MODEL_FILES:
            self.run.log_artifact(Path(model_dir) / name, "model")
        return export_uri


@contextmanager
def session(cfg: Any, job: str, storage_path: str, schedule: Schedule,
            params: dict[str, Any]) -> Iterator[Session]:
    """The job's MLflow run with its params (the config, the schedule, ``params``), Ray, an error ledger."""
    hint = f"rerun with run_name={cfg.run_name} to resume from its last checkpoint"
    with tracking.job_run(cfg.run_name, cfg.tracking, storage_path, job, interrupted_hint=hint) as run:
        run.log_params(config_lib.flatten(cfg))
        run.log_params({f"schedule.{k}": v for k, v in vars(schedule).items()} | params)
        run.log_text(config_lib.to_yaml(cfg), "config/resolved_config.yaml")
        runtime.init_ray(cfg.scaling.ray_address)
        yield Session(cfg, run, schedule, storage_path)
