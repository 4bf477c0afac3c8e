"""Finetuning: a VideoMAEForVideoClassification from a pretrained encoder, with the VideoMAE recipe.

The recipe (presets in configs/finetune_*.yaml): layer-wise LR decay 0.75, drop path 0.1, Mixup 0.8 /
CutMix 1.0 with label smoothing 0.1, linear warmup + cosine, AdamW (0.9, 0.999) with weight decay 0.05,
mean pooling + fc_norm. It runs in the same Ray Train loop as pretraining (pipeline/train/loop.py) with
``FinetuneObjective``: a classifier, soft-target cross entropy on mixed batches, and a validation pass
(top-1, one centre view per video) at the end of every epoch. Rank 0 keeps the best model so far in
``<run>/best/``; Ray Train keeps the last checkpoints for resume; ``<run>/export/`` is the best model in
transformers' format with ``id2label`` when the run ends.

Everything checkable is checked on the driver before any training worker starts: the storage first, then,
with Ray started, the training split (its sources read and their labels counted on the cluster) and the
validation split against the label map, empty splits, classes without training examples, and the weights
(kind, architecture).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import config as config_lib
from pipeline import runtime, storage
from pipeline.cli import run_job
from pipeline.config import ConfigError
from pipeline.data import labels as label_lib
from pipeline.data.clips import torch_collate
from pipeline.data.datasets import build_dataset
from pipeline.data.manifest import ManifestError
from pipeline.data.plan import describe, epoch_size
from pipeline.data.section import DataSection
from pipeline.data.sources import Source, prepare_sources, source_specs
from pipeline.data.transforms import random_erasing, to_model_input
from pipeline.models.section import ModelSection, derived_from_model
from pipeline.models.videomae import CheckpointError, VideoMAEConfig, VideoMAEForVideoClassification
from pipeline.models.weights import load_for_finetuning, locate
from pipeline.tracking import TrackingSection
from pipeline.train import checkpointing, driver, startup, watchdog
from pipeline.train.checkpointing import CheckpointSection
from pipeline.train.driver import ScalingSection
from pipeline.train.loop import Schedule, TrainSection
from pipeline.train.metrics import say
from pipeline.train.mixup import Mixup, MixupSection, soft_target_cross_entropy
from pipeline.train.optim import OptimSection, build_adamw
from pipeline.train.ranks import across_ranks
from pipeline.train.sharding import check_strategy, unwrap

BEST_DIR, BEST_RECORD = "best", "best.json"

# The finetuning recipe where it differs from the shared sections' defaults (a partial section in YAML or
# --set keeps them).
DEFAULTS: dict[str, Any] = {
    "model": {"drop_path_rate": 0.1, "use_mean_pooling": True, "head_init_scale": 1e-3},
    "data": {"split": "train", "eval_num_clips": 1, "eval_num_crops": 1},
    "optim": {"base_lr": 1e-3, "min_lr": 1e-6, "warmup_lr": 0.0, "warmup_epochs": 5.0, "weight_decay": 0.05,
              "betas": [0.9, 0.999], "layer_decay": 0.75},
    # several clips per decoded video arrive together: shuffle locally so a batch mixes videos and classes
    "train": {"epochs": 50.0, "shuffle_buffer_batches": 8},
    "tracking": {"experiment": "videomae-finetune"},
}


@dataclass
class FinetuneConfig:
    """A finetuning run; see configs/finetune_*.yaml and docs/finetune_eval.md."""

    run_name: str = "finetune-demo"  # rerunning with the same name resumes the run
    seed: int = 0
    storage_path: str = "runs"  # the run is <storage_path>/<run_name>
    # Weights to start from: a run folder / checkpoint / export of ours, a transformers directory, an
    # original VideoMAE .pth (local or s3://). "" trains from scratch (random init, the baseline).
    init_from: str = ""
    val_split: str = "val"  # validated every epoch (top-1); "" = no validation, the last model is exported
    model: ModelSection = field(
        default_factory=lambda: config_lib.build(ModelSection, DEFAULTS["model"], prefix="model")
    )
    data: DataSection = field(default_factory=lambda: DataSection(**DEFAULTS["data"]))
    optim: OptimSection = field(default_factory=lambda: config_lib.build(OptimSection, DEFAULTS["optim"]))
    mixup: MixupSection = field(default_factory=MixupSection)
    train: TrainSection = field(default_factory=lambda: TrainSection(**DEFAULTS["train"]))
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    tracking: TrackingSection = field(default_factory=lambda: TrackingSection(**DEFAULTS["tracking"]))
    scaling: ScalingSection = field(default_factory=ScalingSection)

    # the clips' geometry and normalisation are the model's: the checkpoint's, with model.* on top
    __derived_keys__ = derived_from_model("data")

    def validate(self) -> None:
        runtime.check_run_name(self.run_name)
        if not self.storage_path:
            raise ConfigError("storage_path is empty: give a local folder or s3://bucket/prefix")
        check_strategy(self.scaling.strategy, self.train.precision)
        if self.data.clips_per_video < 1:
            raise ConfigError(f"data.clips_per_video must be >= 1, got {self.data.clips_per_video}")


# --- the objective the shared training loop runs -----------------------------------------------------------


@dataclass(kw_only=True)
class FinetuneObjective:
    """Classification with Mixup/CutMix and soft targets; validation and best-model keeping after epochs.

    Picklable (plain fields); the model, the mixer and the best score are made on each worker.
    """

    model_config: dict[str, Any]  # VideoMAEConfig.to_dict() with the labels
    init_from: str  # weights to start from ("" = a random init)
    mixup: MixupSection
    seed: int
    has_validation: bool
    best_uri: str  # where the best model by val/top1 is kept
    val_batch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    erasing_prob: float = 0.0
    _mixer: Mixup | None = field(default=None, init=False, repr=False)
    _best: float | None = field(default=None, init=False, repr=False)

    def build_model(self, cfg: FinetuneConfig) -> torch.nn.Module:
        config = VideoMAEConfig.from_dict(self.model_config)
        if not self.init_from:
            return VideoMAEForVideoClassification(config)

        overrides = {k: v for k, v in self.model_config.items() if k not in ("id2label", "label2id")}
        return load_for_finetuning(self.init_from, config.id2label, **overrides).train()

    def build_optimizer(
        self, module: torch.nn.Module, schedule: Schedule, cfg: FinetuneConfig
    ) -> torch.optim.Optimizer:
        o = cfg.optim
        return build_adamw(module, schedule.peak_lr, o.weight_decay, o.betas, o.eps,
                           layer_decay=o.layer_decay, num_layers=module.config.num_hidden_layers)

    def loss(self, model: torch.nn.Module, batch: dict, pixel_values: torch.Tensor, *, rank: int, step: int,
             micro: int) -> tuple[torch.Tensor, None]:
        if self._mixer is None:
            m = self.mixup
            self._mixer = Mixup(len(self.model_config["id2label"]), m.mixup_alpha, m.cutmix_alpha, m.prob,
                                m.switch_prob, m.label_smoothing)
        labels = batch["labels"].to(pixel_values.device, non_blocking=True)
        rng = np.random.default_rng([self.seed, step, rank, micro])  # the same mix after a resume
        if self.erasing_prob > 0:  # the recipe's order: erase each clip, then mix the batch
            pixel_values = random_erasing(pixel_values, self.erasing_prob, rng)
        mixed, targets = self._mixer(pixel_values, labels, rng)
        return soft_target_cross_entropy(model(mixed).logits, targets), None

    def should_validate(self, *, epoch_end: bool, last_step: bool) -> bool:
        """At each epoch's end, however its pass ended (pipeline/train/loop.py), and at the run's last
        step, when there is a validation split."""
        return self.has_validation and (epoch_end or last_step)

    def validate(self, module: torch.nn.Module, *, device: torch.device, rank: int,
                 progress: checkpointing.Progress) -> dict[str, float]:
        """Top-1 on the validation split (all ranks), the best model kept (rank 0)."""
        correct, total, loss_sum = validate_shard(module, device, self.val_batch_size, self.mean, self.std)
        correct, total, loss_sum = across_ranks(
            [correct, total, loss_sum], device, torch.distributed.ReduceOp.SUM
        )
        if total == 0:
            raise RuntimeError("the validation split produced no readable clip (see the data error report)")
        top1 = correct / total
        if self._best is None:
            self._best = read_best(self.best_uri).get("val_top1", -1.0)
        if top1 > self._best:
            self._best = top1
            if rank == 0:
                save_best(
                    module, self.best_uri, {"val_top1": top1, "step": progress.step, "epoch": progress.epoch}
                )
        return {"val/top1": top1, "val/loss": loss_sum / total, "val/best_top1": self._best,
                "val/videos": total}


def validate_shard(
    model: torch.nn.Module, device: torch.device, batch_size: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[float, float, float]:
    """(correct, clips, summed loss) of ``model`` on this worker's shard of the ``val`` dataset."""
    import ray.train

    shard = ray.train.get_dataset_shard("val")
    correct = total = loss_sum = 0.0
    model.eval()
    with torch.inference_mode():
        for batch in watchdog.watch(shard.iter_torch_batches(batch_size=batch_size, collate_fn=torch_collate),
                                    say):
            logits = model(to_model_input(batch["pixel_values"].to(device), mean, std)).logits.float()
            labels = batch["labels"].to(device)
            correct += (logits.argmax(-1) == labels).sum().item()
            total += labels.numel()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
    model.train()
    return correct, total, loss_sum


def read_best(best_uri: str) -> dict[str, Any]:
    record = storage.join(best_uri, BEST_RECORD)
    return json.loads(storage.read_text(record)) if storage.exists(record) else {}


def save_best(model: torch.nn.Module, best_uri: str, record: dict[str, Any]) -> None:
    """The model (transformers format, with id2label) and its score; the record is written last."""
    with tempfile.TemporaryDirectory() as tmp:
        unwrap(model).save_pretrained(tmp)
        checkpointing.export_model(tmp, best_uri)
    storage.write_text(storage.join(best_uri, BEST_RECORD), json.dumps(record))


# --- the driver -------------------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    run_name: str
    run_dir: str
    export_uri: str | None  # the best model (or the last, without validation), transformers format
    checkpoint_uri: str | None  # the last checkpoint (resume)
    best_val_top1: float | None
    final_step: int
    start_step: int
    tracking_uri: str | None
    mlflow_run_id: str | None
    metrics: dict = field(default_factory=dict)

    def summary(self) -> str:
        best = "n/a" if self.best_val_top1 is None else f"{100 * self.best_val_top1:.2f}%"
        return "\n".join(
            [f"run {self.run_name}: finished at step {self.final_step}; best validation top-1 {best}",
             f"  exported model {self.export_uri}  (transformers format with id2label)",
             f"  last checkpoint {self.checkpoint_uri}",
             f"  MLflow         {storage.redact(self.tracking_uri or '')}  run {self.mlflow_run_id}"]
        )


@dataclass
class FinetuneInputs:
    """What the driver established before any training worker starts."""

    cfg: FinetuneConfig  # with the data geometry and normalisation of the model
    storage_path: str
    train_sources: list[Source]  # read and label-counted on the cluster
    val_rows: list[dict]
    id2label: dict[int, str]
    model_config: dict[str, Any]
    init_from: str  # located weights URI, "" from scratch

    @property
    def num_train_videos(self) -> int:
        return sum(s.num_videos for s in self.train_sources)


def class_names(cfg: FinetuneConfig, counts: Counter) -> dict[int, str]:
    """From the label map (``data.label_map`` or the first source's labels.json), else class_<i>."""
    data = cfg.data
    if data.sources and not data.label_map:
        data = dataclasses.replace(data, uri=source_specs(data)[0].uri)
    names = label_lib.dataset_label_names(data)
    if names is not None:
        return names
    return label_lib.default_names(max((label for label in counts if label >= 0), default=-1) + 1)


def check_finetune_inputs(cfg: FinetuneConfig) -> FinetuneInputs:
    """Checks before any training worker starts: storage, splits and labels (the training sources are read
    and their labels counted on the cluster), weights; the model config and its clip format."""

    storage_path = driver.checked_storage(cfg.storage_path)
    startup.mark("storage")
    runtime.init_ray(cfg.scaling.ray_address)
    startup.mark("ray")
    try:
        sources = prepare_sources(cfg.data, "finetune")
    except ManifestError as e:
        raise label_lib.LabelError(f"{cfg.data.split} split: {e}") from e
    startup.mark("sources")
    counts: Counter = Counter()
    for source in sources:
        counts.update(source.labels or {})
    id2label = class_names(cfg, counts)
    label_lib.check_label_counts(counts, id2label, cfg.data.split)
    empty = label_lib.missing_classes(counts, id2label)
    if empty:
        raise label_lib.LabelError(
            f"{len(empty)} of {len(id2label)} classes have no example in the {cfg.data.split} split: "
            f"{', '.join(empty[:20])}: the classifier cannot learn them (fix the split or the label map)"
        )
    val_rows: list[dict] = []
    if cfg.val_split:
        val_rows = label_lib.read_rows(val_data(cfg))
        val_counts = label_lib.check_labels(val_rows, id2label, cfg.val_split)
        missing = label_lib.missing_classes(val_counts, id2label)
        if missing:
            print(
                f"note: {len(missing)} classes have no example in the {cfg.val_split} split "
                f"({', '.join(missing[:10])}); validation top-1 does not measure them",
                flush=True,
            )
    overrides = dict(cfg.model.overrides)
    if cfg.init_from:
        try:
            init_from = locate(cfg.init_from)
        except CheckpointError as e:
            raise CheckpointError(
                f"init_from: {e} (pretrain first: python jobs/pretrain.py, or set "
                "init_from='' to train from scratch)"
            ) from e
        model_config = load_for_finetuning(init_from, id2label, **overrides).config  # fails on a bad one
    else:
        init_from = ""
        model_config = cfg.model.build(id2label=id2label, label2id=None)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **model_config.clip_format()))
    model_config = model_config.to_dict() | {"architectures": None}
    return FinetuneInputs(cfg, storage_path, sources, val_rows, id2label, model_config, init_from)


def val_data(cfg: FinetuneConfig) -> DataSection:
    """Validation clips: one centre view per video, in order."""
    return dataclasses.replace(
        cfg.data, split=cfg.val_split, eval_num_clips=1, eval_num_crops=1, shuffle=False
    )


def run_finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Run (or resume) the finetuning described by ``cfg``; export the best model with its labels."""
    startup.begin()
    print(f"resolved config:\n{config_lib.to_yaml(cfg)}", flush=True)
    inputs = check_finetune_inputs(cfg)
    cfg = inputs.cfg
    epoch_videos = epoch_size(inputs.train_sources, cfg.data.epoch_videos)
    schedule = driver.schedule_run(cfg, epoch_videos * cfg.data.clips_per_video)
    source = storage.redact(inputs.init_from) if inputs.init_from else "scratch (random init)"
    mc = inputs.model_config
    print(
        f"finetune from {source}: {len(inputs.id2label)} classes, {mc['num_hidden_layers']} layers x "
        f"{mc['hidden_size']}, {mc['num_frames']} frames at {mc['image_size']} px; "
        f"{describe(inputs.train_sources, epoch_videos)}: {epoch_videos} train videos x "
        f"{cfg.data.clips_per_video} clip(s) per epoch, "
        f"{len(inputs.val_rows)} val videos; "
        f"schedule: {schedule.total_steps} steps ({schedule.steps_per_epoch}/epoch), "
        f"warmup {schedule.warmup_steps}, global batch {schedule.global_batch}, "
        f"peak lr {schedule.peak_lr:.3g}",
        flush=True,
    )
    params = {"data.num_videos": epoch_videos, "data.num_val_videos": len(inputs.val_rows),
              "model.num_labels": len(inputs.id2label), "init_from.located": inputs.init_from or "scratch"}
    with driver.session(cfg, "finetune", inputs.storage_path, schedule, params) as session:
        session.run.log_text(
            json.dumps({str(k): v for k, v in inputs.id2label.items()}, indent=1), "config/id2label.json"
        )
        best_uri = storage.join(session.run_dir, BEST_DIR)
        objective = FinetuneObjective(
            model_config=inputs.model_config, init_from=inputs.init_from, mixup=cfg.mixup, seed=cfg.seed,
            has_validation=bool(inputs.val_rows), best_uri=best_uri, val_batch_size=cfg.train.batch_size,
            mean=tuple(cfg.data.mean), std=tuple(cfg.data.std), erasing_prob=cfg.data.random_erasing)
        datasets = {"train": session.training_stream(inputs.train_sources, "finetune")}
        if inputs.val_rows:
            datasets["val"] = build_dataset(val_data(cfg), "eval", session.ledger, rows=inputs.val_rows)
        finished = session.finish(session.fit(objective, datasets))
        best = read_best(best_uri) if inputs.val_rows else {}
        export_uri = None
        if finished.checkpoint is not None:
            with tempfile.TemporaryDirectory() as tmp:
                if best:  # the best model by validation top-1
                    for name in checkpointing.MODEL_FILES:
                        (Path(tmp) / name).write_bytes(storage.read_bytes(storage.join(best_uri, name)))
                    source_dir = tmp
                else:  # without validation, the last one
                    source_dir = finished.checkpoint.to_directory(tmp)
                export_uri = session.export(source_dir)
        if best:
            session.run.log_metrics({"val/best_top1_final": best["val_top1"]}, step=finished.final_step)
        out = FinetuneResult(cfg.run_name, session.run_dir, export_uri, finished.checkpoint_uri,
                             best.get("val_top1"), finished.final_step, finished.start_step,
                             session.run.tracking_uri, session.run.run_id, finished.metrics)
    print(out.summary(), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: ``--config FILE`` (or a preset in configs/) and ``--set key=value`` overrides."""
    return run_job(
        argv,
        prog="finetune",
        default_preset="finetune_tiny_demo",
        config_example="finetune_vit_b_k400",
        description="Finetune a VideoMAE classifier on Ray Train. With no arguments: the pretraining "
        "demo's model on the sample dataset (configs/finetune_tiny_demo.yaml).",
        set_example="init_from=runs/my-pretrain",
        config_cls=FinetuneConfig,
        run=run_finetune,
        succeeded=lambda result: bool(result.export_uri),
    )
