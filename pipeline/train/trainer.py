"""The pretraining job on the driver: check everything that can be checked before Ray starts, then run
Ray Train's TorchTrainer and hand back where the results went.

Order matters for users: config, storage, data listing and MLflow are checked first (seconds, clear
errors), Ray and the workers start only when those pass, and the export happens only after training
succeeded. Resume is automatic: Ray Train finds ``<storage_path>/<run_name>``'s last checkpoint both
after a worker failure (``FailureConfig(max_failures)``) and when the job is run again with the same name.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import config as config_lib
from pipeline.cli import run_job
from pipeline.config import ConfigError, PretrainConfig
from pipeline.data import storage
from pipeline.data.datasets import build_dataset, resolve_rows
from pipeline.data.errors import ErrorLedger
from pipeline.train import checkpointing, probe_monitor
from pipeline.train.loop import LoopArgs, Plan, pretrain_worker
from pipeline.train.optim import scaled_lr


@dataclass
class PretrainResult:
    run_name: str
    run_dir: str  # <storage_path>/<run_name>: checkpoints, export, error report
    checkpoint_uri: str | None
    export_uri: str | None
    error_report_uri: str | None
    tracking_uri: str | None
    mlflow_run_id: str | None
    final_step: int
    start_step: int  # the step the last training attempt started from (0 unless it resumed)
    metrics: dict
    probe_knn_top1: list[tuple[int, float]] = field(default_factory=list)  # (step, kNN top-1) of the monitor
    probe_chance: float | None = None

    def summary(self) -> str:
        lines = [f"run {self.run_name}: finished at step {self.final_step}",
                 f"  checkpoint     {self.checkpoint_uri}",
                 f"  exported model {self.export_uri}  (transformers format: from_pretrained)",
                 f"  error report   {self.error_report_uri}"]
        if self.probe_knn_top1:
            (first_step, first), (last_step, last) = self.probe_knn_top1[0], self.probe_knn_top1[-1]
            lines.append(f"  probe          frozen-feature kNN top-1 {100 * first:.1f}% at step {first_step}"
                         f" -> {100 * last:.1f}% at step {last_step} (chance {100 * self.probe_chance:.1f}%)")
        if self.mlflow_run_id:
            uri = storage.redact(self.tracking_uri or "")
            lines.append(f"  MLflow         {uri}  run {self.mlflow_run_id}")
        return "\n".join(lines)


def absolute_storage(uri: str) -> str:
    """Local storage paths become absolute (Ray Train and the workers need one meaning for them)."""
    return uri if storage.is_s3(uri) else str(Path(storage.resolve(uri)[1]))


def make_plan(cfg: PretrainConfig, num_clips: int) -> Plan:
    """Steps per epoch (a full batch on every rank, as Ray's equal split delivers), total and warmup steps,
    and the LRs by the linear scaling rule.

    As in the original scripts, the rule counts *videos* per step, not clips: with ``clips_per_video`` N
    (the original's ``num_sample``) a step of B clips holds B / N videos, and ``base_lr``, ``min_lr`` and
    ``warmup_lr`` are all scaled by that / 256. An absolute ``optim.lr`` is used as given, with the
    configured ``min_lr`` and ``warmup_lr``.
    """
    t, world = cfg.train, cfg.scaling.num_workers
    global_batch = t.batch_size * world * t.grad_accum_steps
    per_epoch = t.steps_per_epoch or (num_clips // world) // t.batch_size // t.grad_accum_steps
    if per_epoch < 1:
        raise ConfigError(
            f"the dataset has {num_clips} clips per epoch, fewer than one global batch of {global_batch} "
            f"(train.batch_size {t.batch_size} x scaling.num_workers {world} x train.grad_accum_steps "
            f"{t.grad_accum_steps}): use more videos or a smaller batch")
    total = t.max_steps or max(1, math.ceil(t.epochs * per_epoch))
    warmup = cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None \
        else round(cfg.optim.warmup_epochs * per_epoch)
    o = cfg.optim
    videos_per_step = global_batch / cfg.data.clips_per_video
    if o.lr:
        peak, floor, start = o.lr, o.min_lr, o.warmup_lr
    else:
        peak, floor, start = (scaled_lr(v, videos_per_step) for v in (o.base_lr, o.min_lr, o.warmup_lr))
    return Plan(total_steps=total, steps_per_epoch=per_epoch, warmup_steps=min(warmup, total), peak_lr=peak,
                global_batch=global_batch, min_lr=floor, warmup_lr=start)


def preflight(cfg: PretrainConfig) -> tuple[str, list[dict]]:
    """Checks that need no Ray: the storage location is reachable and the data lists. Returns the absolute
    run folder and the manifest rows."""
    storage_path = absolute_storage(cfg.storage_path)
    try:
        if storage.is_s3(storage_path):
            storage.check_reachable(storage.join(storage_path, cfg.run_name))
        else:
            storage.makedirs(storage_path)
    except storage.StorageError as e:
        raise storage.StorageError(f"storage_path: {e}") from e
    rows = resolve_rows(cfg.data)
    if not rows:
        raise ConfigError(f"data.uri {storage.redact(cfg.data.uri)!r} holds no videos")
    return storage_path, rows


def init_ray(cfg: PretrainConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    # Under `ray job submit`, RAY_ADDRESS points at the cluster; otherwise start a private local Ray rather
    # than joining whichever cluster happens to run on this machine.
    address = cfg.scaling.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, log_to_driver=True)


def resolve_use_gpu(cfg: PretrainConfig) -> bool:
    if cfg.scaling.use_gpu is not None:
        return cfg.scaling.use_gpu
    import ray

    return ray.cluster_resources().get("GPU", 0) >= cfg.scaling.num_workers


def run_pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Run (or resume) the pretraining described by ``cfg`` and export the final model."""
    from pipeline import tracking

    print(f"resolved config:\n{config_lib.to_yaml(cfg)}", flush=True)
    storage_path, rows = preflight(cfg)
    run_dir = storage.join(storage_path, cfg.run_name)
    plan = make_plan(cfg, len(rows) * cfg.data.clips_per_video)
    if cfg.data.clips_per_video > 1 and cfg.train.shuffle_buffer_batches < 4 * cfg.data.clips_per_video:
        print(f"note: the {cfg.data.clips_per_video} clips of a video arrive together, so without a larger "
              f"train.shuffle_buffer_batches (now {cfg.train.shuffle_buffer_batches}) a batch holds few "
              "videos; measured here that slows learning several-fold (docs/training.md)", flush=True)
    probe_rows, probe_classes = probe_monitor.probe_rows(cfg.probe) if cfg.probe.enabled else ({}, 0)
    if probe_classes:
        print(f"probe: kNN top-1 every {cfg.probe.every_steps} steps, {len(probe_rows['probe_bank'])} "
              f"{cfg.probe.data.split} videos as the bank, {len(probe_rows['probe_query'])} "
              f"{cfg.probe.query_split} videos scored, {probe_classes} classes", flush=True)
    print(f"data: {len(rows)} videos x {cfg.data.clips_per_video} clip(s); plan: {plan.total_steps} steps "
          f"({plan.steps_per_epoch}/epoch), warmup {plan.warmup_steps}, global batch {plan.global_batch}, "
          f"peak lr {plan.peak_lr:.3g}", flush=True)

    local_root = storage_path if not storage.is_s3(storage_path) else "runs"
    tracking_uri = cfg.tracking.tracking_uri or tracking.default_tracking_uri(local_root)
    run = tracking.start_run(cfg.run_name, cfg.tracking.experiment, tracking_uri, job="pretrain",
                             parent_run_id=cfg.tracking.parent_run_id)
    print(f"MLflow: {storage.redact(tracking_uri)} experiment {cfg.tracking.experiment!r} run {run.run_id}"
          f"{' (resumed)' if run.resumed else ''}", flush=True)
    status = "FAILED"
    try:
        config_yaml = config_lib.to_yaml(cfg)
        run.log_params(config_lib.flatten(cfg))
        run.log_params({"plan.total_steps": plan.total_steps, "plan.steps_per_epoch": plan.steps_per_epoch,
                        "plan.warmup_steps": plan.warmup_steps, "plan.peak_lr": plan.peak_lr,
                        "plan.min_lr": plan.min_lr, "plan.warmup_lr": plan.warmup_lr,
                        "plan.global_batch": plan.global_batch, "data.num_videos": len(rows)})
        run.log_text(config_yaml, "config/resolved_config.yaml")
        init_ray(cfg)
        ledger = ErrorLedger.create(cfg.run_name)
        probe_ledger = ErrorLedger.create(f"{cfg.run_name}-probe") if probe_classes else None
        datasets = {"train": build_dataset(cfg.data, "pretrain", ledger, rows=rows)}
        if probe_classes:
            datasets.update(probe_monitor.probe_datasets(cfg.probe, probe_rows, probe_ledger))
        args = LoopArgs(cfg, config_yaml, plan, run, ledger.run_name, probe_classes=probe_classes)
        result = _fit(cfg, storage_path, args, datasets)
        out = _finish(cfg, result, run_dir, run, ledger, probe_classes)
        status = "FINISHED"
        return out
    except KeyboardInterrupt:
        status = "KILLED"
        print(f"interrupted: rerun with run_name={cfg.run_name} to resume from its last checkpoint",
              flush=True)
        raise
    finally:
        run.end(status)


def _fit(cfg: PretrainConfig, storage_path: str, args: LoopArgs, datasets: dict[str, Any]):
    """Run the TorchTrainer of ``args`` on ``datasets`` (pretraining's clips, or finetuning's splits)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    init_ray(cfg)
    use_gpu = resolve_use_gpu(cfg)
    fs, path = (storage.s3_filesystem(), storage.resolve(storage_path)[1]) if storage.is_s3(storage_path) \
        else (None, storage_path)
    trainer = TorchTrainer(
        pretrain_worker,
        train_loop_config={"args": args},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=cfg.run_name, storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
        ),
        datasets=datasets,
    )
    started = time.time()
    result = trainer.fit()
    print(f"training finished in {time.time() - started:.0f} s", flush=True)
    return result


def _finish(cfg: PretrainConfig, result, run_dir: str, run, ledger: ErrorLedger,
            probe_classes: int = 0) -> PretrainResult:
    report_uri = storage.join(run_dir, "data_errors.jsonl")
    num_errors = ledger.write_report(report_uri)
    snap = ledger.snapshot()
    run.log_metrics({"data/videos_total": snap["videos"], "data/errors_total": snap["errors"],
                     **{f"data/errors_total/{k}": v for k, v in snap["by_reason"].items()}},
                    step=int((result.metrics or {}).get("step", 0)))
    with tempfile.TemporaryDirectory() as tmp:
        local_report = Path(tmp) / "data_errors.jsonl"
        local_report.write_text(storage.read_text(report_uri))
        run.log_artifact(local_report, "data")
    if num_errors:
        print(f"data: {num_errors} of {snap['videos']} videos could not be used, by reason "
              f"{snap['by_reason']}: see {report_uri}", flush=True)

    checkpoint = result.checkpoint
    export_uri = None
    checkpoint_uri = None
    if checkpoint is not None:
        checkpoint_uri = checkpoint.path if not storage.is_s3(run_dir) else f"s3://{checkpoint.path}"
        export_uri = storage.join(run_dir, "export")
        with checkpoint.as_directory() as directory:
            checkpointing.export_model(directory, export_uri)
            run.log_artifact(Path(directory) / "config.json", "model")
            run.log_artifact(Path(directory) / "model.safetensors", "model")
            final_step = checkpointing.read_progress(directory).step
    else:
        final_step = 0
    metrics = dict(result.metrics or {})
    probe = []
    if probe_classes:  # the whole curve, resumed attempts included, as MLflow holds it
        history = run.client.get_metric_history(run.run_id, "probe/knn_top1")
        probe = sorted({m.step: m.value for m in history}.items())
    out = PretrainResult(
        run_name=cfg.run_name, run_dir=run_dir, checkpoint_uri=checkpoint_uri, export_uri=export_uri,
        error_report_uri=report_uri, tracking_uri=run.tracking_uri, mlflow_run_id=run.run_id,
        final_step=final_step, start_step=int(metrics.get("start_step", final_step)), metrics=metrics,
        probe_knn_top1=probe, probe_chance=1 / probe_classes if probe_classes else None)
    print(out.summary(), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: ``--config FILE`` (or a preset name from configs/) and ``--set key=value`` overrides."""
    return run_job(
        argv, prog="pretrain", default_preset="pretrain_tiny_demo", config_example="pretrain_vit_b_k400",
        description="VideoMAE pretraining on Ray Train. With no arguments: a tiny model on the generated "
        "sample dataset, locally.", set_example="train.max_steps=100",
        config_cls=PretrainConfig,
        run=run_pretrain, succeeded=lambda result: bool(result.checkpoint_uri))
