"""Multi-view inference as Ray Data batch inference: the model lives in actors, views stream through.

Decode tasks (pipeline/data) emit one row per view (``eval_num_clips x eval_num_crops`` per video); a pool
of ``ViewClassifier`` actors each loads the model once and turns batches of views into softmax
probabilities; the driver sums them per video as they arrive (``ViewAccumulator``). Only the small
``(video, label, probs)`` columns travel back, never the frames.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from pipeline.config import ConfigError
from pipeline.data.transforms import to_model_input
from pipeline.eval.metrics import VideoScores, ViewAccumulator
from pipeline.models.device import autocast_dtype, pick_device
from pipeline.models.weights import load_classifier


@dataclass
class InferenceSection:
    batch_size: int = 16  # views per forward pass of one actor
    num_actors: int = 1  # model replicas (Ray actors) scoring views in parallel
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None  # None: 1 if the cluster has GPUs, else 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"

    def validate(self) -> None:
        if self.batch_size < 1 or self.num_actors < 1:
            raise ConfigError("inference.batch_size and inference.num_actors must be >= 1")

    def resolved_gpus(self) -> float:
        """GPUs per actor: as configured, else 1 when the cluster has GPUs (call after Ray started)."""
        if self.gpus_per_actor is not None:
            return self.gpus_per_actor
        import ray

        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


class ViewModel:
    """A Ray Data callable class's common part: one model per actor, on its device, fed normalised views.
    Subclasses load their model in ``__init__`` and turn ``self.inputs(batch)`` into their columns."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], use_gpu: bool) -> None:
        self.device = pick_device(use_gpu)
        self.mean, self.std = tuple(mean), tuple(std)

    def inputs(self, batch: dict[str, np.ndarray]) -> torch.Tensor:
        """The batch's uint8 views as the model's normalised (B, T, C, H, W) input on this actor's device."""
        frames = torch.from_numpy(np.ascontiguousarray(batch["pixel_values"])).to(self.device)
        return to_model_input(frames, self.mean, self.std)


def map_views(dataset: Any, model_class: type[ViewModel], constructor_kwargs: dict[str, Any], batch_size: int,
              num_actors: int, cpus_per_actor: float, gpus_per_actor: float) -> Any:
    """``dataset`` through a pool of ``num_actors`` actors of ``model_class`` (Ray Data batch inference)."""
    return dataset.map_batches(
        model_class,
        fn_constructor_kwargs={**constructor_kwargs, "use_gpu": gpus_per_actor > 0},
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=num_actors,
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None,
    )


class ViewClassifier(ViewModel):
    """Ray Data callable class: loads the classifier at ``model_uri`` once per actor."""

    def __init__(self, model_uri: str, mean: Sequence[float], std: Sequence[float], use_gpu: bool = False,
                 precision: str = "fp32"):
        super().__init__(mean, std, use_gpu)
        self.model = load_classifier(model_uri).to(self.device)
        self.dtype = autocast_dtype(precision, self.device)
        if self.device.type == "cpu" and self.dtype == torch.float16:
            self.dtype = None  # inference in fp16 on a CPU: fall back to fp32

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = self.model(self.inputs(batch)).logits
        probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return {"video": batch["video"], "labels": batch["labels"], "clip_index": batch["clip_index"],
                "crop_index": batch["crop_index"], "video_row": batch["video_row"], "probs": probs}


def predict_views(dataset: Any, model_uri: str, num_classes: int, mean: Sequence[float], std: Sequence[float],
                  batch_size: int = 16, num_actors: int = 1, cpus_per_actor: float = 1.0,
                  gpus_per_actor: float = 0.0, precision: str = "fp32", expected_views: int | None = None,
                  progress_every_s: float = 10.0) -> VideoScores:
    """Run the actor pool over ``dataset`` (eval rows) and average the views of each video."""
    predictions = map_views(dataset, ViewClassifier,
                            {"model_uri": model_uri, "mean": mean, "std": std, "precision": precision},
                            batch_size, num_actors, cpus_per_actor, gpus_per_actor)
    acc = ViewAccumulator(num_classes)
    views, started, last = 0, time.monotonic(), time.monotonic()
    for batch in predictions.iter_batches(batch_size=None, batch_format="numpy"):
        acc.add([str(v) for v in batch["video"]], batch["labels"], batch["probs"], batch["video_row"])
        views += len(batch["labels"])
        if time.monotonic() - last > progress_every_s:
            last = time.monotonic()
            total = f"/{expected_views}" if expected_views else ""
            print(
                f"evaluate: {views}{total} views scored, {views / (last - started):.1f} views/s", flush=True
            )
    return acc.result()
