"""Finetuning: a VideoMAEForVideoClassification from a pretrained encoder, with the VideoMAE recipe.

The recipe (presets in configs/finetune_*.yaml): layer-wise LR decay 0.75, drop path 0.1, Mixup 0.8 /
CutMix 1.0 with label smoothing 0.1, linear warmup + cosine, AdamW (0.9, 0.999) with weight decay 0.05,
mean pooling + fc_norm. It runs in the same Ray Train loop as pretraining (pipeline/train/loop.py) with
``FinetuneObjective``: a classifier, soft-target cross entropy on mixed batches, and a validation pass
(top-1, one centre view per video) at the end of every epoch. Rank 0 keeps the best model so far in
``<run>/best/``; Ray Train keeps the last checkpoints for resume; ``<run>/export/`` is the best model in
transformers' format with ``id2label`` when the run ends.

Everything checkable is checked on the driver before Ray starts: the weights (kind, architecture), the
labels of both splits against the label map, empty splits, classes without training examples.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import config as config_lib
from pipeline.cli import run_job
from pipeline.config import (
    CheckpointSection,
    ConfigError,
    ModelSection,
    OptimSection,
    ScalingSection,
    TrackingSection,
    TrainSection,
)
from pipeline.data import storage
from pipeline.data.datasets import DataConfig, build_dataset, torch_collate
from pipeline.data.manifest import ManifestError
from pipeline.data.transforms import random_erasing, to_model_input
from pipeline.eval import labels as label_lib
from pipeline.models.videomae import CheckpointError, VideoMAEConfig, VideoMAEForVideoClassification
from pipeline.train import checkpointing
from pipeline.train.mixup import Mixup, soft_target_cross_entropy
from pipeline.train.optim import build_adamw

GEOMETRY = ("num_frames", "image_size", "patch_size", "tubelet_size")
BEST_DIR, EXPORT_DIR, BEST_RECORD = "best", "export", "best.json"

# The finetuning recipe where it differs from the shared sections' defaults (a partial section in YAML or
# --set keeps them).
DEFAULTS: dict[str, Any] = {
    "model": {"drop_path_rate": 0.1, "use_mean_pooling": True, "head_init_scale": 1e-3},
    "data": {"split": "train", "eval_num_clips": 1, "eval_num_crops": 1},
    "optim": {
        "base_lr": 1e-3,
        "min_lr": 1e-6,
        "warmup_lr": 0.0,
        "warmup_epochs": 5.0,
        "weight_decay": 0.05,
        "betas": [0.9, 0.999],
        "layer_decay": 0.75,
    },
    # several clips per decoded video arrive together: shuffle locally so a batch mixes videos and classes
    "train": {"epochs": 50.0, "shuffle_buffer_batches": 8},
    "tracking": {"experiment": "videomae-finetune"},
}


@dataclass
class MixupSection:
    """Batch mixing and label smoothing; ``mixup_alpha = cutmix_alpha = 0`` turns mixing off."""

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0  # chance a batch is mixed
    switch_prob: float = 0.5  # chance of CutMix rather than Mixup when both are on
    label_smoothing: float = 0.1

    def validate(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ConfigError("mixup.mixup_alpha and mixup.cutmix_alpha must be >= 0")
        for name in ("prob", "switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"mixup.{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"mixup.label_smoothing must lie in [0, 1), got {self.label_smoothing}")


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
    data: DataConfig = field(default_factory=lambda: DataConfig(**DEFAULTS["data"]))
    optim: OptimSection = field(default_factory=lambda: config_lib.build(OptimSection, DEFAULTS["optim"]))
    mixup: MixupSection = field(default_factory=MixupSection)
    train: TrainSection = field(default_factory=lambda: TrainSection(**DEFAULTS["train"]))
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    tracking: TrackingSection = field(default_factory=lambda: TrackingSection(**DEFAULTS["tracking"]))
    scaling: ScalingSection = field(default_factory=ScalingSection)

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", self.run_name):
            raise ConfigError(f"run_name {self.run_name!r} must be 1-128 letters, digits, '.', '_' or '-'")
        if not self.storage_path:
            raise ConfigError("storage_path is empty: give a local folder or s3://bucket/prefix")
        if self.data.clips_per_video < 1:
            raise ConfigError(f"data.clips_per_video must be >= 1, got {self.data.clips_per_video}")


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> FinetuneConfig:
    """FinetuneConfig <- DEFAULTS <- YAML preset at ``path`` <- ``overrides`` (``section.key=value``)."""
    return config_lib.load(FinetuneConfig, path, overrides)


# --- the objective the shared training loop runs -----------------------------------------------------------


class FinetuneObjective:
    """Classification with Mixup/CutMix and soft targets; validation and best-model keeping after epochs.

    Picklable (plain fields); the model, the mixer and the best score are made on each worker.
    """

    def __init__(
        self,
        model_config: dict[str, Any],
        init_from: str,
        mixup: MixupSection,
        seed: int,
        validate: bool,
        best_uri: str,
        val_batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        erasing_prob: float = 0.0,
    ):
        self.model_config, self.init_from = model_config, init_from
        self.erasing_prob = erasing_prob
        self.mixup_cfg, self.seed, self.validate = mixup, seed, validate
        self.best_uri, self.val_batch_size = best_uri, val_batch_size
        self.mean, self.std = tuple(mean), tuple(std)
        self._mixer: Mixup | None = None
        self._best: float | None = None
        self._rank = 0

    def build_model(self, cfg: FinetuneConfig) -> torch.nn.Module:
        config = VideoMAEConfig.from_dict(self.model_config)
        if not self.init_from:
            return VideoMAEForVideoClassification(config)
        from pipeline.train.weights import load_for_finetuning

        overrides = {k: v for k, v in self.model_config.items() if k not in ("id2label", "label2id")}
        return load_for_finetuning(self.init_from, config.id2label, **overrides).train()

    def build_optimizer(self, core: torch.nn.Module, plan, cfg: FinetuneConfig) -> torch.optim.Optimizer:
        import ray.train

        self._rank = ray.train.get_context().get_world_rank()
        o = cfg.optim
        return build_adamw(
            core,
            plan.peak_lr,
            o.weight_decay,
            o.betas,
            o.eps,
            layer_decay=o.layer_decay,
            num_layers=core.config.num_hidden_layers,
        )

    def loss(self, model: torch.nn.Module, batch: dict, pixel_values: torch.Tensor, step: int, micro: int):
        if self._mixer is None:
            m = self.mixup_cfg
            self._mixer = Mixup(
                len(self.model_config["id2label"]),
                m.mixup_alpha,
                m.cutmix_alpha,
                m.prob,
                m.switch_prob,
                m.label_smoothing,
            )
        labels = batch["labels"].to(pixel_values.device, non_blocking=True)
        rng = np.random.default_rng([self.seed, step, self._rank, micro])  # the same mix after a resume
        if self.erasing_prob > 0:  # the recipe's order: erase each clip, then mix the batch
            pixel_values = random_erasing(pixel_values, self.erasing_prob, rng)
        mixed, targets = self._mixer(pixel_values, labels, rng)
        return soft_target_cross_entropy(model(mixed).logits, targets), None

    def after_step(
        self, core: torch.nn.Module, progress: checkpointing.Progress, plan, device: torch.device, rank: int
    ) -> dict[str, float]:
        """At each epoch's end: top-1 on the validation split (all ranks), best model kept (rank 0)."""
        epoch_end = progress.step_in_epoch == plan.steps_per_epoch or progress.step == plan.total_steps
        if not (self.validate and epoch_end):
            return {}
        from pipeline.train.loop import _across_ranks

        correct, total, loss_sum = validate_shard(core, device, self.val_batch_size, self.mean, self.std)
        correct, total, loss_sum = _across_ranks(
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
                    core, self.best_uri, {"val_top1": top1, "step": progress.step, "epoch": progress.epoch}
                )
        return {
            "val/top1": top1,
            "val/loss": loss_sum / total,
            "val/best_top1": self._best,
            "val/videos": total,
        }


def validate_shard(
    model: torch.nn.Module, device: torch.device, batch_size: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[float, float, float]:
    """(correct, clips, summed loss) of ``model`` on this worker's shard of the ``val`` dataset."""
    import ray.train

    shard = ray.train.get_dataset_shard("val")
    correct = total = loss_sum = 0.0
    model.eval()
    with torch.inference_mode():
        for batch in shard.iter_torch_batches(batch_size=batch_size, collate_fn=torch_collate):
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
        checkpointing.unwrap(model).save_pretrained(tmp)
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
            [
                f"run {self.run_name}: finished at step {self.final_step}; best validation top-1 {best}",
                f"  exported model {self.export_uri}  (transformers format with id2label)",
                f"  last checkpoint {self.checkpoint_uri}",
                f"  MLflow         {storage.redact(self.tracking_uri or '')}  run {self.mlflow_run_id}",
            ]
        )


@dataclass
class Prepared:
    """What the driver established before starting Ray."""

    cfg: FinetuneConfig  # with the data geometry of the model
    storage_path: str
    train_rows: list[dict]
    val_rows: list[dict]
    id2label: dict[int, str]
    model_config: dict[str, Any]
    init_from: str  # located weights URI, "" from scratch


def class_names(cfg: FinetuneConfig, rows: list[dict]) -> dict[int, str]:
    names = label_lib.dataset_label_names(cfg.data)
    if names is not None:
        return names
    labeled = [r["label"] for r in rows if r["label"] >= 0]
    return label_lib.default_names(max(labeled, default=-1) + 1)


def prepare(cfg: FinetuneConfig) -> Prepared:
    """Checks without Ray: storage, splits, labels, weights; the model config and the clip geometry."""
    from pipeline.train.trainer import preflight
    from pipeline.train.weights import load_for_finetuning, locate

    try:
        storage_path, train_rows = preflight(cfg)
    except ManifestError as e:
        raise label_lib.LabelError(f"{cfg.data.split} split: {e}") from e
    id2label = class_names(cfg, train_rows)
    counts = label_lib.check_labels(train_rows, id2label, cfg.data.split)
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
            raise CheckpointError(f"init_from: {e} (pretrain first: python jobs/pretrain.py, or set "
                                  "init_from='' to train from scratch)") from e
        model = load_for_finetuning(init_from, id2label, **overrides)  # fails here on a bad checkpoint
        model_config = model.config.to_dict()
        del model
    else:
        init_from = ""
        model_config = cfg.model.build(id2label=id2label, label2id=None).to_dict()
    model_config["architectures"] = None
    data = dataclasses.replace(cfg.data, **{k: model_config[k] for k in GEOMETRY})
    cfg = dataclasses.replace(cfg, data=data)
    return Prepared(cfg, storage_path, train_rows, val_rows, id2label, model_config, init_from)


def val_data(cfg: FinetuneConfig) -> DataConfig:
    """Validation clips: one centre view per video, in order."""
    return dataclasses.replace(
        cfg.data, split=cfg.val_split, eval_num_clips=1, eval_num_crops=1, shuffle=False
    )


def run_finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Run (or resume) the finetuning described by ``cfg``; export the best model with its labels."""
    from pipeline import tracking
    from pipeline.data.errors import ErrorLedger
    from pipeline.train.loop import LoopArgs
    from pipeline.train.trainer import _fit, init_ray, make_plan

    print(f"resolved config:\n{config_lib.to_yaml(cfg)}", flush=True)
    p = prepare(cfg)
    cfg = p.cfg
    run_dir = storage.join(p.storage_path, cfg.run_name)
    plan = make_plan(cfg, len(p.train_rows) * cfg.data.clips_per_video)
    source = storage.redact(p.init_from) if p.init_from else "scratch (random init)"
    mc = p.model_config
    print(
        f"finetune from {source}: {len(p.id2label)} classes, {mc['num_hidden_layers']} layers x "
        f"{mc['hidden_size']}, {mc['num_frames']} frames at {mc['image_size']} px; "
        f"{len(p.train_rows)} train videos x {cfg.data.clips_per_video} clip(s), "
        f"{len(p.val_rows)} val videos; "
        f"plan: {plan.total_steps} steps ({plan.steps_per_epoch}/epoch), warmup {plan.warmup_steps}, "
        f"global batch {plan.global_batch}, peak lr {plan.peak_lr:.3g}",
        flush=True,
    )
    local_root = p.storage_path if not storage.is_s3(p.storage_path) else "runs"
    tracking_uri = cfg.tracking.tracking_uri or tracking.default_tracking_uri(local_root)
    run = tracking.start_run(
        cfg.run_name,
        cfg.tracking.experiment,
        tracking_uri,
        job="finetune",
        parent_run_id=cfg.tracking.parent_run_id,
    )
    print(
        f"MLflow: {storage.redact(tracking_uri)} experiment {cfg.tracking.experiment!r} run {run.run_id}"
        f"{' (resumed)' if run.resumed else ''}",
        flush=True,
    )
    status = "FAILED"
    try:
        config_yaml = config_lib.to_yaml(cfg)
        run.log_params(config_lib.flatten(cfg))
        run.log_params(
            {
                "plan.total_steps": plan.total_steps,
                "plan.steps_per_epoch": plan.steps_per_epoch,
                "plan.warmup_steps": plan.warmup_steps,
                "plan.peak_lr": plan.peak_lr, "plan.min_lr": plan.min_lr, "plan.warmup_lr": plan.warmup_lr,
                "plan.global_batch": plan.global_batch,
                "data.num_videos": len(p.train_rows),
                "data.num_val_videos": len(p.val_rows),
                "model.num_labels": len(p.id2label),
                "init_from.located": p.init_from or "scratch",
            }
        )
        run.log_text(config_yaml, "config/resolved_config.yaml")
        run.log_text(json.dumps({str(k): v for k, v in p.id2label.items()}, indent=1), "config/id2label.json")
        best_uri = storage.join(run_dir, BEST_DIR)
        objective = FinetuneObjective(
            p.model_config,
            p.init_from,
            cfg.mixup,
            cfg.seed,
            bool(p.val_rows),
            best_uri,
            cfg.train.batch_size,
            cfg.data.mean,
            cfg.data.std,
            cfg.data.random_erasing,
        )
        init_ray(cfg)
        ledger = ErrorLedger.create(cfg.run_name)
        datasets = {"train": build_dataset(cfg.data, "finetune", ledger, rows=p.train_rows)}
        if p.val_rows:
            datasets["val"] = build_dataset(val_data(cfg), "eval", ledger, rows=p.val_rows)
        args = LoopArgs(cfg, config_yaml, plan, run, ledger.run_name, objective=objective)
        result = _fit(cfg, p.storage_path, args, datasets)
        out = _finish(cfg, result, run_dir, best_uri if p.val_rows else None, run, ledger)
        status = "FINISHED"
        return out
    except KeyboardInterrupt:
        status = "KILLED"
        print(
            f"interrupted: rerun with run_name={cfg.run_name} to resume from its last checkpoint", flush=True
        )
        raise
    finally:
        run.end(status)


def _finish(cfg: FinetuneConfig, result, run_dir: str, best_uri: str | None, run, ledger) -> FinetuneResult:
    report_uri = storage.join(run_dir, "data_errors.jsonl")
    num_errors = ledger.write_report(report_uri)
    if num_errors:
        print(f"data: {num_errors} videos could not be used: see {report_uri}", flush=True)
    checkpoint, export_uri, checkpoint_uri, final_step = result.checkpoint, None, None, 0
    best = read_best(best_uri) if best_uri else {}
    if checkpoint is not None:
        checkpoint_uri = checkpoint.path if not storage.is_s3(run_dir) else f"s3://{checkpoint.path}"
        export_uri = storage.join(run_dir, EXPORT_DIR)
        with tempfile.TemporaryDirectory() as tmp:
            if best:
                for name in checkpointing.MODEL_FILES:
                    (Path(tmp) / name).write_bytes(storage.read_bytes(storage.join(best_uri, name)))
                source = tmp
            else:
                source = checkpoint.to_directory(tmp)
            checkpointing.export_model(source, export_uri)
            run.log_artifact(Path(source) / "config.json", "model")
            run.log_artifact(Path(source) / "model.safetensors", "model")
        with checkpoint.as_directory() as directory:
            final_step = checkpointing.read_progress(directory).step
    metrics = dict(result.metrics or {})
    if best:
        run.log_metrics({"val/best_top1_final": best["val_top1"]}, step=final_step)
    out = FinetuneResult(
        cfg.run_name,
        run_dir,
        export_uri,
        checkpoint_uri,
        best.get("val_top1"),
        final_step,
        int(metrics.get("start_step", final_step)),
        run.tracking_uri,
        run.run_id,
        metrics,
    )
    print(out.summary(), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: ``--config FILE`` (or a preset in configs/) and ``--set key=value`` overrides."""
    return run_job(
        argv, prog="finetune", default_preset="finetune_tiny_demo", config_example="finetune_vit_b_k400",
        description="Finetune a VideoMAE classifier on Ray Train. With no arguments: the pretraining "
        "demo's model on the sample dataset (configs/finetune_tiny_demo.yaml).",
        set_example="init_from=runs/my-pretrain", config_cls=FinetuneConfig, run=run_finetune,
        succeeded=lambda result: bool(result.export_uri))
