"""The chained pipeline: pretrain -> finetune -> evaluate in one command, resumable stage by stage.

Each stage is the ordinary job (its own preset + overrides) with the chain's data, storage and MLflow
settings, and the previous stage's output URI passed in: pretraining's export becomes finetuning's
``init_from``, finetuning's export (the best model) becomes evaluation's ``model_uri``.

Resume: ``<storage_path>/<run_name>/stages.json`` records each finished stage and its outputs (and the
MLflow parent run carries a ``pipeline.stage.<name>=done`` tag). Rerunning the chain skips finished
stages and reruns the unfinished one under the same run name, which continues from its last checkpoint.
MLflow: one parent run for the chain, one child run per stage.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline import config as config_lib
from pipeline import runtime, storage, tracking
from pipeline.cli import run_job
from pipeline.config import ConfigError
from pipeline.data.synthetic import ensure_sample_dataset
from pipeline.eval.evaluate import EvalConfig, run_evaluate
from pipeline.train.finetune import FinetuneConfig, run_finetune
from pipeline.train.pretrain import PretrainConfig, run_pretrain

STAGES = ("pretrain", "finetune", "evaluate")
RECORD = "stages.json"


@dataclass
class PipelineConfig:
    """The chain; ``pretrain`` / ``finetune`` / ``evaluate`` hold overrides for that stage's config."""

    run_name: str = "chain-demo"
    storage_path: str = "runs"  # the chain's folder is <storage_path>/<run_name>; stages run inside it
    data_uri: str = ""  # the dataset of every stage; "" = the generated sample dataset
    sample_cache_dir: str = ".cache/sample-data"
    sample_videos_per_class: int = 100  # size of the generated sample dataset (when data_uri is "")
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite under storage_path
    experiment: str = "videomae-pipeline"
    stages: list[str] = field(
        default_factory=lambda: list(STAGES)
    )  # drop "pretrain" to finetune from scratch
    pretrain_config: str = "pretrain_tiny_demo"  # preset of each stage (a path or a name in configs/)
    finetune_config: str = "finetune_tiny_demo"
    evaluate_config: str | None = None
    pretrain: dict[str, Any] = field(default_factory=dict)  # e.g. {"train": {"epochs": 3}}
    finetune: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise ConfigError(f"stages must be a non-empty subset of {list(STAGES)}, got {self.stages}")
        if [s for s in STAGES if s in self.stages] != list(self.stages):
            raise ConfigError(f"stages must keep the order {list(STAGES)}, got {self.stages}")


def as_overrides(overrides: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``{"train": {"epochs": 3}}`` -> ``["train.epochs=3"]`` (the stage loaders' --set syntax)."""
    out = []
    for key, value in overrides.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out += as_overrides(value, name)
        else:
            out.append(f"{name}={json.dumps(value) if isinstance(value, (list, bool)) else value}")
    return out


class StageRecord:
    """``stages.json`` in the chain folder: which stages finished, with their outputs."""

    def __init__(self, uri: str):
        self.uri = uri
        self.stages: dict[str, dict[str, Any]] = (
            json.loads(storage.read_text(uri)) if storage.exists(uri) else {}
        )

    def done(self, stage: str) -> dict[str, Any] | None:
        entry = self.stages.get(stage)
        return entry if entry and entry.get("status") == "done" else None

    def mark_done(self, stage: str, outputs: dict[str, Any]) -> None:
        self.stages[stage] = {"status": "done",
                              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **outputs}
        storage.write_text(self.uri, json.dumps(self.stages, indent=1))


@dataclass
class PipelineResult:
    chain_dir: str
    outputs: dict[str, dict[str, Any]]
    skipped: list[str]
    mlflow_run_id: str
    tracking_uri: str
    seconds: float
    top1: float | None = None

    def summary(self) -> str:
        lines = [
            f"pipeline {self.chain_dir}: done in {self.seconds:.0f} s"
            + (f" (skipped finished stages: {', '.join(self.skipped)})" if self.skipped else "")
        ]
        for stage, out in self.outputs.items():
            shown = {k: v for k, v in out.items() if k not in ("status", "finished_at")}
            lines.append(f"  {stage:<9} " + "  ".join(f"{k}={v}" for k, v in shown.items()))
        lines.append(f"  MLflow    {storage.redact(self.tracking_uri)}  parent run {self.mlflow_run_id}")
        return "\n".join(lines)


def run_pipeline(cfg: PipelineConfig) -> PipelineResult:
    """Run the chain's unfinished stages in order; see the module docstring."""

    started = time.time()
    print(f"pipeline config:\n{config_lib.to_yaml(cfg)}", flush=True)
    chain_dir = runtime.run_folder(cfg.storage_path, cfg.run_name)
    if storage.is_s3(chain_dir):
        storage.check_reachable(chain_dir)
    else:
        storage.makedirs(chain_dir)
    record = StageRecord(storage.join(chain_dir, RECORD))
    data_uri = cfg.data_uri
    if not data_uri:
        data_uri = ensure_sample_dataset(cfg.sample_cache_dir, videos_per_class=cfg.sample_videos_per_class)
        print(f"sample dataset: {data_uri}", flush=True)
    section = tracking.TrackingSection(tracking_uri=cfg.tracking_uri, experiment=cfg.experiment)
    tracking_uri = section.resolved_uri(cfg.storage_path)
    common = [f"storage_path={chain_dir}", f"data.uri={data_uri}", f"tracking.tracking_uri={tracking_uri}",
              f"tracking.experiment={cfg.experiment}"]

    # Load every stage's config first: a typo in the last stage's overrides fails before hours of training.
    def stage_overrides(stage: str, extra: list[str], parent_id: str = "") -> list[str]:
        own = as_overrides(getattr(cfg, stage))
        parent = [f"tracking.parent_run_id={parent_id}"] if parent_id else []
        return [f"run_name={cfg.run_name}-{stage}", *common, *parent, *extra, *own]

    loaders = {
        "pretrain": lambda extra, pid="": config_lib.load(
            PretrainConfig, cfg.pretrain_config, stage_overrides("pretrain", extra, pid)
        ),
        "finetune": lambda extra, pid="": config_lib.load(
            FinetuneConfig, cfg.finetune_config, stage_overrides("finetune", extra, pid)
        ),
        "evaluate": lambda extra, pid="": config_lib.load(
            EvalConfig, cfg.evaluate_config, stage_overrides("evaluate", extra, pid)
        ),
    }
    placeholder = {"finetune": ["init_from=" + ("/placeholder" if "pretrain" in cfg.stages else "")],
                   "evaluate": ["model_uri=/placeholder"]}
    for stage in cfg.stages:
        loaders[stage](placeholder.get(stage, []))

    outputs: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    hint = f"rerun the same command to resume the chain {cfg.run_name}"
    with tracking.job_run(
        cfg.run_name, section, cfg.storage_path, "pipeline", interrupted_hint=hint
    ) as parent:
        parent.log_params({**config_lib.flatten(cfg), "data.resolved_uri": data_uri})
        for stage in cfg.stages:
            finished = record.done(stage)
            if finished:
                print(f"== {stage}: finished earlier, skipping ({finished})", flush=True)
                outputs[stage] = finished
                skipped.append(stage)
                continue
            print(f"== {stage}: starting", flush=True)
            parent.set_tags({f"pipeline.stage.{stage}": "running"})
            t0 = time.time()
            if stage == "pretrain":
                result = run_pretrain(loaders[stage]([], parent.run_id))
                out = {"export_uri": result.export_uri, "checkpoint_uri": result.checkpoint_uri,
                       "mlflow_run_id": result.mlflow_run_id, "final_step": result.final_step}
            elif stage == "finetune":
                init = outputs["pretrain"]["export_uri"] if "pretrain" in outputs else ""
                result = run_finetune(
                    loaders[stage]([f"init_from={init}"] if "pretrain" in cfg.stages else [], parent.run_id)
                )
                out = {"export_uri": result.export_uri, "checkpoint_uri": result.checkpoint_uri,
                       "best_val_top1": result.best_val_top1, "mlflow_run_id": result.mlflow_run_id}
            else:
                model = outputs["finetune"]["export_uri"] if "finetune" in outputs else None
                result = run_evaluate(loaders[stage]([f"model_uri={model}"] if model else [], parent.run_id))
                out = {"output_uri": result.output_uri, "top1": result.report.top1,
                       "top5": result.report.top5, "mlflow_run_id": result.mlflow_run_id}
            out["seconds"] = round(time.time() - t0, 1)
            record.mark_done(stage, out)
            outputs[stage] = record.stages[stage]
            parent.set_tags({f"pipeline.stage.{stage}": "done"})
            print(f"== {stage}: done in {out['seconds']:.0f} s", flush=True)
        top1 = outputs.get("evaluate", {}).get("top1")
        if top1 is not None:
            parent.log_metrics({"test/top1": top1, "test/top5": outputs["evaluate"]["top5"]}, step=0)
        parent.log_text(json.dumps(record.stages, indent=1), "pipeline/stages.json")
    out = PipelineResult(
        chain_dir, outputs, skipped, parent.run_id, tracking_uri, time.time() - started, top1
    )
    print(out.summary(), flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``--config FILE`` and ``--set key=value`` (e.g. ``--set finetune.train.epochs=10``)."""
    return run_job(
        argv,
        prog="pipeline",
        default_preset="chain_tiny_demo",
        config_example="chain_tiny_demo",
        description="pretrain -> finetune -> evaluate in one command; rerun to resume. With no arguments: "
        "the tiny demo chain on a generated sample dataset, locally.",
        set_example="finetune.train.epochs=10",
        config_cls=PipelineConfig,
        run=run_pipeline,
        succeeded=lambda result: bool(result.outputs),
    )
