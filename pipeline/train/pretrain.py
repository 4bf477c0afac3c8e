"""The pretraining job: VideoMAE masked video modelling on unlabeled clips, through the training driver.

``run_pretrain(cfg)``: the storage is checked, Ray started and the data's sources read on the cluster, the
run scheduled from their size, then pipeline/train/driver.py runs Ray Train with ``PretrainObjective`` on
the clips of ``cfg.data`` (and, with ``probe.every_steps``, the frozen-feature kNN monitor's two small
labeled datasets) and the last checkpoint's model is exported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from pipeline import config as config_lib
from pipeline import runtime, storage
from pipeline.cli import run_job
from pipeline.config import ConfigError
from pipeline.data.errors import ErrorLedger
from pipeline.data.plan import describe, epoch_size
from pipeline.data.section import DataSection
from pipeline.data.sources import prepare_sources
from pipeline.models.section import ModelSection, derived_from_model
from pipeline.models.videomae import VideoMAEForPreTraining
from pipeline.tracking import TrackingSection
from pipeline.train import driver, probe_monitor, startup
from pipeline.train.checkpointing import CheckpointSection, Progress
from pipeline.train.driver import ScalingSection
from pipeline.train.loop import Schedule, TrainSection
from pipeline.train.optim import OptimSection, build_adamw
from pipeline.train.probe_monitor import ProbeSection
from pipeline.train.sharding import check_strategy


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs; see configs/pretrain_*.yaml and docs/training.md."""

    run_name: str = "pretrain-tiny-demo"  # rerunning with the same name resumes the run
    seed: int = 0
    storage_path: str = "runs"  # local folder or s3://bucket/prefix; the run is <storage_path>/<run_name>
    # The original's pretraining encoder ends in a LayerNorm before encoder_to_decoder; in transformers'
    # config that is use_mean_pooling: false (finetuning then pools and uses its own fc_norm).
    model: ModelSection = field(
        default_factory=lambda: config_lib.build(ModelSection, {"use_mean_pooling": False}, prefix="model")
    )
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    probe: ProbeSection = field(default_factory=ProbeSection)  # frozen-feature kNN during training

    # The model dictates the clips' geometry and normalisation; the probe's clips are cut as the training
    # clips (the same sampling rate).
    __derived_keys__ = {**derived_from_model("data"), **derived_from_model("probe.data"),
                        "probe.data.sampling_rate": "data.sampling_rate"}

    def __post_init__(self) -> None:
        clip_format = self.model.build().clip_format()
        self.data = dataclasses.replace(self.data, **clip_format)
        probe_data = dataclasses.replace(
            self.probe.data, **clip_format, sampling_rate=self.data.sampling_rate
        )
        self.probe = dataclasses.replace(self.probe, data=probe_data)

    def validate(self) -> None:
        runtime.check_run_name(self.run_name)
        if not self.storage_path:
            raise ConfigError("storage_path is empty: give a local folder or s3://bucket/prefix")
        if not 0.0 < self.data.mask_ratio < 1.0:
            raise ConfigError(f"data.mask_ratio must lie in (0, 1), got {self.data.mask_ratio}")
        if self.data.mask_type not in ("tube", "random"):
            raise ConfigError(f"data.mask_type must be 'tube' or 'random', got {self.data.mask_type!r}")
        check_strategy(self.scaling.strategy, self.train.precision)
        if self.data.clips_per_video < 1:
            raise ConfigError(f"data.clips_per_video must be >= 1, got {self.data.clips_per_video}")
        if self.data.rand_augment or self.data.random_erasing:  # set here, they would be ignored
            raise ConfigError(
                "data.rand_augment and data.random_erasing are finetuning augmentations; VideoMAE "
                "pretraining uses multi-scale crops and masking only (data.pretrain_scales, data.mask_*)"
            )


class PretrainObjective:
    """Masked video reconstruction: VideoMAEForPreTraining on clips with their tube masks."""

    def build_model(self, cfg: PretrainConfig) -> torch.nn.Module:
        return VideoMAEForPreTraining(cfg.model.build())

    def build_optimizer(self, module: torch.nn.Module, schedule: Schedule, cfg: PretrainConfig):
        return build_adamw(module, schedule.peak_lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps)

    def loss(self, model: torch.nn.Module, batch: dict, pixel_values: torch.Tensor, *, rank: int, step: int,
             micro: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(loss, what the reconstruction picture needs): the masks are the batch's, nothing is drawn."""
        mask = batch["bool_masked_pos"].to(pixel_values.device, non_blocking=True)
        return model(pixel_values, mask).loss, (pixel_values, mask)

    def should_validate(self, *, epoch_end: bool, last_step: bool) -> bool:
        return False  # the frozen-feature probe (probe.*) is the pretraining's evaluation

    def validate(self, module: torch.nn.Module, *, device: torch.device, rank: int,
                 progress: Progress) -> dict[str, float]:
        return {}


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
            lines.append(
                f"  probe          frozen-feature kNN top-1 {100 * first:.1f}% at step {first_step}"
                f" -> {100 * last:.1f}% at step {last_step} (chance {100 * self.probe_chance:.1f}%)"
            )
        if self.mlflow_run_id:
            uri = storage.redact(self.tracking_uri or "")
            lines.append(f"  MLflow         {uri}  run {self.mlflow_run_id}")
        return "\n".join(lines)


def run_pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Run (or resume) the pretraining described by ``cfg`` and export the final model."""
    startup.begin()
    print(f"resolved config:\n{config_lib.to_yaml(cfg)}", flush=True)
    storage_path = driver.checked_storage(cfg.storage_path)
    startup.mark("storage")
    runtime.init_ray(cfg.scaling.ray_address)  # the manifests are read on the cluster
    startup.mark("ray")
    sources = prepare_sources(cfg.data, "pretrain")
    startup.mark("sources")
    epoch_videos = epoch_size(sources, cfg.data.epoch_videos)
    schedule = driver.schedule_run(cfg, epoch_videos * cfg.data.clips_per_video)
    print(
        f"data: {describe(sources, epoch_videos)}; {epoch_videos} videos x {cfg.data.clips_per_video} "
        f"clip(s) per epoch; schedule: {schedule.total_steps} steps "
        f"({schedule.steps_per_epoch}/epoch), warmup {schedule.warmup_steps}, "
        f"global batch {schedule.global_batch}, peak lr {schedule.peak_lr:.3g}",
        flush=True,
    )
    if cfg.data.clips_per_video > 1 and cfg.train.shuffle_buffer_batches < 4 * cfg.data.clips_per_video:
        print(
            f"note: the {cfg.data.clips_per_video} clips of a video arrive together, so without a larger "
            f"train.shuffle_buffer_batches (now {cfg.train.shuffle_buffer_batches}) a batch holds few "
            "videos, which slows learning (docs/training.md, \"Mixing the clips of a video\")",
            flush=True,
        )
    probe_rows, probe_classes = probe_monitor.probe_rows(cfg.probe) if cfg.probe.enabled else ({}, 0)
    startup.mark("probe sets")
    if probe_classes:
        print(
            f"probe: kNN top-1 every {cfg.probe.every_steps} steps, {len(probe_rows['probe_bank'])} "
            f"{cfg.probe.data.split} videos as the bank, {len(probe_rows['probe_query'])} "
            f"{cfg.probe.query_split} videos scored, {probe_classes} classes",
            flush=True,
        )

    params = {"data.num_videos": epoch_videos}
    with driver.session(cfg, "pretrain", storage_path, schedule, params) as session:
        datasets = {"train": session.training_stream(sources, "pretrain")}
        if probe_classes:  # its own ledger: probe videos are not the training data's error budget
            probe_ledger = ErrorLedger.create(f"{cfg.run_name}-probe")
            datasets.update(probe_monitor.probe_datasets(cfg.probe, probe_rows, probe_ledger))
        finished = session.finish(session.fit(PretrainObjective(), datasets, probe_classes))
        export_uri = None
        if finished.checkpoint is not None:
            with finished.checkpoint.as_directory() as directory:
                export_uri = session.export(directory)
        probe = []
        if probe_classes:  # the whole curve, resumed attempts included, as MLflow holds it
            history = session.run.client.get_metric_history(session.run.run_id, "probe/knn_top1")
            probe = sorted({m.step: m.value for m in history}.items())
        out = PretrainResult(run_name=cfg.run_name, run_dir=session.run_dir,
                             checkpoint_uri=finished.checkpoint_uri, export_uri=export_uri,
                             error_report_uri=finished.error_report_uri,
                             tracking_uri=session.run.tracking_uri, mlflow_run_id=session.run.run_id,
                             final_step=finished.final_step, start_step=finished.start_step,
                             metrics=finished.metrics, probe_knn_top1=probe,
                             probe_chance=1 / probe_classes if probe_classes else None)
    print(out.summary(), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: ``--config FILE`` (or a preset name from configs/) and ``--set key=value`` overrides."""
    return run_job(
        argv,
        prog="pretrain",
        default_preset="pretrain_tiny_demo",
        config_example="pretrain_vit_b_k400",
        description="VideoMAE pretraining on Ray Train. With no arguments: a tiny model on the generated "
        "sample dataset, locally.",
        set_example="train.max_steps=100",
        config_cls=PretrainConfig,
        run=run_pretrain,
        succeeded=lambda result: bool(result.checkpoint_uri),
    )
