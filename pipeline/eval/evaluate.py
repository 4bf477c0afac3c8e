"""The evaluation job: multi-view testing of a finetuned classifier, distributed with Ray Data.

Everything checkable is checked on the driver before Ray starts (the model is a classifier, the split is
non-empty, every label is one the model knows, the dataset's class names match the model's). Results
go to ``<storage_path>/<run_name>/`` and to an MLflow run:

    metrics.json             top-1, top-5, mean class accuracy, per-class accuracy, confusion, gaps
    predictions.parquet      per video: path, label, top-5 classes and scores, views scored, correct
    confusion_matrix.png     row-normalised, counts in the cells
    data_errors.jsonl        videos that could not be read (they are reported as a gap, not a crash)
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import config as config_lib
from pipeline import runtime, storage
from pipeline.cli import run_job
from pipeline.config import ConfigError
from pipeline.data import labels as label_lib
from pipeline.data.datasets import build_dataset
from pipeline.data.errors import ErrorLedger
from pipeline.data.section import DataSection
from pipeline.eval.inference import InferenceSection, predict_views
from pipeline.eval.metrics import EvalReport, evaluate_scores
from pipeline.eval.report import confusion_matrix_png, parquet_bytes, predictions_table, report_json
from pipeline.models.section import derived_from_model
from pipeline.models.weights import load_classifier, locate
from pipeline.tracking import TrackingSection, job_run

# Defaults that differ from the shared sections' own (a partial section in YAML or --set keeps them).
DEFAULTS: dict = {
    "data": {"split": "test", "eval_num_clips": 2, "eval_num_crops": 3, "shuffle": False, "hflip": False},
    "tracking": {"experiment": "videomae-evaluate"},
}


@dataclass
class EvalConfig:
    """An evaluation run; the clip geometry (frames, size, patch, tubelet) is taken from the model."""

    run_name: str = "evaluate-demo"
    model_uri: str = "runs/finetune-demo"  # a classifier: run folder, checkpoint or transformers directory
    storage_path: str = "runs"  # results under <storage_path>/<run_name>
    ray_address: str | None = None  # None: RAY_ADDRESS (under `ray job submit`), else a local Ray
    data: DataSection = field(default_factory=lambda: DataSection(**DEFAULTS["data"]))
    inference: InferenceSection = field(default_factory=InferenceSection)
    tracking: TrackingSection = field(default_factory=lambda: TrackingSection(**DEFAULTS["tracking"]))

    __derived_keys__ = derived_from_model("data", source="the model at model_uri")

    def validate(self) -> None:
        runtime.check_run_name(self.run_name)
        if not self.model_uri:
            raise ConfigError(
                "model_uri is empty: give the finetuned model (run folder, checkpoint or "
                "transformers directory)"
            )
        if self.data.eval_num_clips < 1 or self.data.eval_num_crops not in (1, 3):
            raise ConfigError("data.eval_num_clips must be >= 1 and data.eval_num_crops 1 or 3")


@dataclass
class EvalResult:
    report: EvalReport
    output_uri: str
    mlflow_run_id: str | None
    tracking_uri: str | None
    seconds: float

    def summary(self) -> str:
        return "\n".join(
            [self.report.summary(), f"results: {self.output_uri}",
             f"MLflow: {storage.redact(self.tracking_uri or '')} run {self.mlflow_run_id}"]
        )


def check_eval_inputs(cfg: EvalConfig):
    """Driver-side checks and inputs: (classifier, data config in the model's clip format, rows, names)."""

    model_uri = locate(cfg.model_uri)
    model = load_classifier(model_uri)
    mc = model.config
    data = dataclasses.replace(cfg.data, **mc.clip_format())
    rows = label_lib.read_rows(data)
    id2label = dict(mc.id2label)
    names = label_lib.dataset_label_names(data)
    if names is not None and names != id2label:
        differ = [
            f"{i}: data {names.get(i)!r} vs model {id2label.get(i)!r}"
            for i in sorted(set(names) | set(id2label))
            if names.get(i) != id2label.get(i)
        ]
        raise label_lib.LabelError(
            f"the dataset's label map and the model's id2label differ: "
            f"{'; '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}"
        )
    label_lib.check_labels(rows, id2label, data.split)
    return model_uri, model, data, rows, [id2label[i] for i in range(len(id2label))]


def run_evaluate(cfg: EvalConfig) -> EvalResult:
    """Score every video of ``cfg.data``'s split and write the report (see the module docstring)."""

    started = time.time()
    print(f"resolved config:\n{config_lib.to_yaml(cfg)}", flush=True)
    model_uri, model, data, rows, class_names = check_eval_inputs(cfg)
    views = data.eval_num_clips * data.eval_num_crops
    print(
        f"evaluate: {storage.redact(model_uri)} ({len(class_names)} classes, {_geometry(model)}) on "
        f"{len(rows)} videos x {views} views ({data.eval_num_clips} clips x {data.eval_num_crops} crops)",
        flush=True,
    )
    output = runtime.run_folder(cfg.storage_path, cfg.run_name)
    with job_run(cfg.run_name, cfg.tracking, cfg.storage_path, "evaluate") as run:
        run.log_params(
            {**config_lib.flatten(cfg), "model.located_uri": model_uri, "data.num_videos": len(rows)}
        )
        runtime.init_ray(cfg.ray_address)
        ledger = ErrorLedger.create(cfg.run_name)
        dataset = build_dataset(data, "eval", ledger, rows=rows)
        scores = predict_views(dataset, model_uri, len(class_names), data.mean, data.std,
                               cfg.inference.batch_size, cfg.inference.num_actors,
                               cfg.inference.cpus_per_actor, cfg.inference.resolved_gpus(),
                               cfg.inference.precision, expected_views=len(rows) * views)
        report = evaluate_scores(scores, class_names, views, expected_videos=len(rows))
        num_errors = ledger.write_report(storage.join(output, "data_errors.jsonl"))
        if num_errors:
            report.gaps.append(
                f"{num_errors} videos could not be read: see {storage.join(output, 'data_errors.jsonl')}"
            )
        _write_outputs(report, scores, output, run)
        run.log_metrics({k: v for k, v in report.metrics().items() if v == v}, step=0)  # v == v: not NaN
    result = EvalResult(report, output, run.run_id, run.tracking_uri, time.time() - started)
    print(result.summary(), flush=True)
    return result


def _geometry(model) -> str:
    c = model.config
    return f"{c.num_frames} frames at {c.image_size}px"


def _write_outputs(report: EvalReport, scores, output: str, run) -> None:
    files = {"metrics.json": report_json(report).encode(),
             "predictions.parquet": parquet_bytes(predictions_table(scores, report.class_names)),
             "confusion_matrix.png": confusion_matrix_png(report.confusion, report.class_names)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            storage.write_bytes(storage.join(output, name), data)
            (Path(tmp) / name).write_bytes(data)
            run.log_artifact(Path(tmp) / name, "evaluation")


def main(argv: list[str] | None = None) -> int:
    """CLI: ``--config FILE`` (or a preset in configs/) and ``--set key=value`` overrides."""
    return run_job(
        argv,
        prog="evaluate",
        default_preset=None,
        config_example="eval_k400",
        description="Multi-view evaluation of a finetuned VideoMAE classifier with Ray Data. With no "
        "arguments: the demo finetune run's model on the sample dataset's test split.",
        set_example="model_uri=runs/my-finetune",
        config_cls=EvalConfig,
        run=run_evaluate,
        succeeded=lambda result: True,
    )
