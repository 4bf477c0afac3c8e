"""The probe job: frozen-feature kNN and linear-probe top-1 of any encoder on a labeled train / test split.

It answers "did the pretraining teach the encoder anything the labels need?" without finetuning: embed
the ``data.split`` videos (the kNN bank and the linear probe's training set) and the ``test_split``
videos with the frozen encoder, then score (pipeline/eval/frozen.py). ``model_uri`` takes anything
``init_from`` takes (a run folder, checkpoint or export of ours, a transformers directory, an original
``.pth``); ``model_uri: ""`` probes a random init of ``model.*`` (seeded by ``seed``), the baseline a
pretrained encoder has to beat.

Checked before Ray starts, with errors naming the input: the model, both splits non-empty and labeled,
labels within the label map. Unreadable videos are skipped and counted as in evaluation. Results go to
``<storage_path>/<run_name>/probe.json`` and to an MLflow run (``probe/knn_top1``,
``probe/linear_top1``).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline import config as config_lib
from pipeline import runtime, storage
from pipeline.cli import run_job
from pipeline.config import ConfigError
from pipeline.data import labels as label_lib
from pipeline.data.datasets import build_dataset
from pipeline.data.errors import ErrorLedger
from pipeline.data.section import DataSection
from pipeline.eval import frozen
from pipeline.eval.frozen import KnnSection
from pipeline.eval.inference import InferenceSection
from pipeline.models.section import ModelSection, derived_from_model
from pipeline.models.videomae import CheckpointError, VideoMAEConfig, VideoMAEModel
from pipeline.models.weights import CONVERT_FIELDS, locate, read_config
from pipeline.tracking import TrackingSection, job_run

RESULT_FILE = "probe.json"


@dataclass
class ProbeConfig:
    """A probe run; the clip geometry (frames, size, patch, tubelet) is the model's."""

    run_name: str = "probe-demo"
    # The encoder: a run folder / checkpoint / export of ours, a transformers dir, an original .pth (local
    # or s3://); "" = a random init of `model` (the baseline).
    model_uri: str = "runs/pretrain-tiny-demo"
    seed: int = 0  # the random init's seed (model_uri "")
    # the random init's architecture (model_uri ""); as pretraining's, with the encoder's final LayerNorm
    model: ModelSection = field(
        default_factory=lambda: config_lib.build(ModelSection, {"use_mean_pooling": False}, prefix="model")
    )
    storage_path: str = "runs"
    ray_address: str | None = None  # None: RAY_ADDRESS (under `ray job submit`), else a local Ray
    # the kNN bank and the linear probe's training videos: data.split; scored: test_split
    data: DataSection = field(
        default_factory=lambda: DataSection(
            split="train", sampling_rate=2, eval_num_clips=1, eval_num_crops=1, shuffle=False, hflip=False
        )  # sampling_rate 2: the pretraining demo's
    )
    test_split: str = "test"
    knn: KnnSection = field(default_factory=KnnSection)
    linear: bool = True  # also fit the linear probe
    inference: InferenceSection = field(default_factory=lambda: InferenceSection(batch_size=32))
    tracking: TrackingSection = field(default_factory=lambda: TrackingSection(experiment="videomae-probe"))

    __derived_keys__ = derived_from_model("data", source="the model (model_uri, or model.* when it is empty)")

    def validate(self) -> None:
        runtime.check_run_name(self.run_name)
        if not self.test_split or self.test_split == self.data.split:
            raise ConfigError(
                f"test_split {self.test_split!r} must name another split than data.split {self.data.split!r}"
            )
        if self.data.eval_num_crops not in (1, 3) or self.data.eval_num_clips < 1:
            raise ConfigError("data.eval_num_clips must be >= 1 and data.eval_num_crops 1 or 3")


@dataclass
class ProbeResult:
    knn_top1: float
    linear_top1: float | None
    linear_weight_decay: float | None
    num_train: int
    num_test: int
    num_classes: int
    model: str
    output_uri: str
    mlflow_run_id: str | None
    seconds: float

    def summary(self) -> str:
        linear = "n/a" if self.linear_top1 is None else f"{100 * self.linear_top1:.2f}%"
        return (
            f"probe of {self.model}: kNN top-1 {100 * self.knn_top1:.2f}%, linear probe top-1 {linear} "
            f"({self.num_train} train / {self.num_test} test videos, {self.num_classes} classes, chance "
            f"{100 / self.num_classes:.1f}%); results in {self.output_uri}"
        )


def _locate(cfg: ProbeConfig) -> tuple[str, VideoMAEConfig, dict]:
    """(located model URI or "" for a random init, its model config, conversion settings for an original
    .pth); errors name ``model_uri``."""

    if not cfg.model_uri:
        return "", cfg.model.build(), {}
    try:
        located = locate(cfg.model_uri)
    except CheckpointError as e:
        raise CheckpointError(f"model_uri: {e}") from e
    convert = {k: v for k, v in cfg.model.overrides.items() if k in CONVERT_FIELDS}
    return located, read_config(located, convert), convert


def _save_random_init(cfg: ProbeConfig, output: str) -> str:
    """A seeded random init of ``cfg.model`` under the run folder, where every actor can load it."""
    torch.manual_seed(cfg.seed)
    encoder = VideoMAEModel(cfg.model.build())
    target = storage.join(output, "random_init")
    with tempfile.TemporaryDirectory() as tmp:
        encoder.save_pretrained(tmp)
        for name in ("config.json", "model.safetensors"):
            storage.write_bytes(storage.join(target, name), (Path(tmp) / name).read_bytes())
    return target


def run_probe(cfg: ProbeConfig) -> ProbeResult:
    """Embed both splits with the frozen encoder, score kNN and the linear probe, write the results."""

    started = time.time()
    print(f"resolved config:\n{config_lib.to_yaml(cfg)}", flush=True)
    output = runtime.run_folder(cfg.storage_path, cfg.run_name)
    model_uri, model_config, convert = _locate(cfg)
    model_name = storage.redact(model_uri) if model_uri else f"random init (seed {cfg.seed})"
    data = dataclasses.replace(cfg.data, **model_config.clip_format())
    test_data = dataclasses.replace(data, split=cfg.test_split)
    (train_rows, test_rows), names = label_lib.labeled_splits(data, (data.split, cfg.test_split))
    print(
        f"probe: {model_name} ({model_config.num_hidden_layers} layers x {model_config.hidden_size}, "
        f"{model_config.num_frames} frames at {model_config.image_size} px) on {len(train_rows)} "
        f"{data.split} / {len(test_rows)} {cfg.test_split} videos, {len(names)} classes",
        flush=True,
    )
    with job_run(cfg.run_name, cfg.tracking, cfg.storage_path, "probe") as run:
        run.log_params(
            {**config_lib.flatten(cfg), "model.located_uri": model_name, "data.num_videos": len(train_rows),
             "data.num_test_videos": len(test_rows)}
        )
        model_uri = model_uri or _save_random_init(cfg, output)
        runtime.init_ray(cfg.ray_address)
        ledger = ErrorLedger.create(cfg.run_name)
        features = {}
        for split_data, rows in ((data, train_rows), (test_data, test_rows)):
            dataset = build_dataset(split_data, "eval", ledger, rows=rows)
            features[split_data.split] = frozen.embed_views(dataset, model_uri, model_config.hidden_size,
                                                            data.mean, data.std, cfg.inference.batch_size,
                                                            cfg.inference.num_actors,
                                                            cfg.inference.cpus_per_actor,
                                                            cfg.inference.resolved_gpus(), convert)
            print(
                f"probe: embedded {len(features[split_data.split][1])} {split_data.split} videos", flush=True
            )
        (train_x, train_y, _), (test_x, test_y, _) = features[data.split], features[cfg.test_split]
        if len(train_y) == 0 or len(test_y) == 0:
            raise RuntimeError("no readable video in one of the splits: see the data error report")
        knn = frozen.knn_top1(train_x, train_y, test_x, test_y, len(names), cfg.knn.k, cfg.knn.temperature)
        linear, decay = (None, None)
        if cfg.linear:
            linear, decay = frozen.linear_probe_top1(
                train_x, train_y, test_x, test_y, len(names), seed=cfg.seed
            )
        result = ProbeResult(knn, linear, decay, len(train_y), len(test_y), len(names), model_name, output,
                             run.run_id, time.time() - started)
        num_errors = ledger.write_report(storage.join(output, "data_errors.jsonl"))
        record = {k: v for k, v in dataclasses.asdict(result).items() if k != "mlflow_run_id"}
        record.update(unreadable_videos=num_errors, k=cfg.knn.k, temperature=cfg.knn.temperature)
        storage.write_text(storage.join(output, RESULT_FILE), json.dumps(record, indent=1))
        run.log_metrics(
            {"probe/knn_top1": knn, "probe/linear_top1": linear, "probe/train_videos": len(train_y),
             "probe/test_videos": len(test_y)},
            step=0,
        )
    print(result.summary(), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    """CLI: ``--config FILE`` and ``--set key=value`` overrides."""
    return run_job(
        argv,
        prog="probe",
        default_preset=None,
        config_example="my_probe.yaml",
        description="Frozen-feature kNN and linear-probe top-1 of a VideoMAE encoder (Ray Data batch "
        "inference). With no arguments: the pretraining demo's encoder on the sample dataset.",
        set_example="model_uri=runs/my-pretrain",
        config_cls=ProbeConfig,
        run=run_probe,
        succeeded=lambda result: True,
    )
