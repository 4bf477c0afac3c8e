"""The frozen-feature kNN monitor of a pretraining run: is the encoder learning what the labels need?

The reconstruction loss says how well masked pixels are predicted, not whether the encoder's features are
any use (a loss that falls to 0.6 can hide features at chance). With ``probe.every_steps`` > 0 the run
embeds a small labeled set with the current encoder at step 0 (the random init), every N steps and at the
end, and logs the weighted kNN top-1 (pipeline/eval/frozen.py) as ``probe/knn_top1`` to MLflow and the
progress line.

Bounded cost: at most ``probe.max_videos`` videos per split, one centre view each; every rank embeds its
share of the two small Ray datasets (``probe_bank``, ``probe_query``), the features are gathered on rank 0,
which scores them. Training waits for that pass: a few hundred forward passes without the decoder, no
backward. Bad probe videos are counted in the run's probe ledger, not in the training data's budget.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from pipeline.data.clips import torch_collate
from pipeline.data.datasets import build_dataset
from pipeline.data.labels import labeled_splits
from pipeline.data.section import DataSection
from pipeline.data.transforms import to_model_input
from pipeline.eval.frozen import knn_top1, pooled_features
from pipeline.eval.metrics import ViewAccumulator
from pipeline.train import watchdog
from pipeline.train.metrics import say

DATASETS = ("probe_bank", "probe_query")


@dataclass
class ProbeSection:
    """``probe.every_steps`` > 0 turns the monitor on; ``probe.data`` is a labeled set (``uri: ""`` = the
    sample dataset) whose ``split`` is the kNN bank and whose ``query_split`` is scored. Its clip geometry,
    sampling rate and normalisation are the training data's (set there)."""

    every_steps: int = 0  # 0 = off; else at step 0, every N steps and at the end
    data: DataSection = field(
        default_factory=lambda: DataSection(split="train", eval_num_clips=1, eval_num_crops=1, shuffle=False)
    )
    query_split: str = "val"
    max_videos: int = 400  # per split, a fixed random subset: bounds the cost of one probe
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 32

    def validate(self) -> None:
        if self.every_steps < 0 or self.max_videos < 1 or self.batch_size < 1 or self.k < 1:
            raise ValueError("probe.every_steps must be >= 0; probe.max_videos, batch_size and k >= 1")
        if self.temperature <= 0:
            raise ValueError(f"probe.temperature must be > 0, got {self.temperature}")
        if self.every_steps and self.query_split == self.data.split:
            raise ValueError(f"probe.query_split {self.query_split!r} must differ from probe.data.split")

    @property
    def enabled(self) -> bool:
        return self.every_steps > 0


def probe_rows(section: ProbeSection) -> tuple[dict[str, list[dict]], int]:
    """The rows of both probe splits (a seeded subset of at most ``max_videos`` each) and the class count;
    checked on the driver before any worker starts."""

    splits = (section.data.split, section.query_split)
    rows, names = labeled_splits(section.data, splits, section.max_videos, prefix="probe ")
    return dict(zip(DATASETS, rows, strict=True)), len(names)


def probe_datasets(section: ProbeSection, rows: dict[str, list[dict]], ledger: Any) -> dict[str, Any]:
    """The two streaming datasets of one centre view per video, for ``TorchTrainer(datasets=...)``."""

    return {
        name: build_dataset(dataclasses.replace(section.data, split=split), "eval", ledger, rows=rows[name])
        for name, split in zip(DATASETS, (section.data.split, section.query_split), strict=True)
    }


class ProbeMonitor:
    """A training-loop component: ``should_probe(step)`` and ``run(encoder)`` (collective: all ranks)."""

    def __init__(self, section: ProbeSection, num_classes: int, total_steps: int):
        self.section, self.num_classes, self.total_steps = section, num_classes, total_steps

    def should_probe(self, step: int) -> bool:
        every = self.section.every_steps
        return every > 0 and (step % every == 0 or step == self.total_steps)

    def _embed(
        self, encoder: torch.nn.Module, name: str, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        import ray.train


        cfg = self.section.data
        views = ViewAccumulator(encoder.config.hidden_size)  # mean feature per video (views may be several)
        shard = ray.train.get_dataset_shard(name)
        batches = shard.iter_torch_batches(batch_size=self.section.batch_size, collate_fn=torch_collate)
        for batch in watchdog.watch(batches, say):
            x = to_model_input(batch["pixel_values"].to(device), cfg.mean, cfg.std)
            features = pooled_features(encoder, x).float().cpu().numpy()
            views.add(batch["video"], batch["labels"].numpy(), features, batch["video_row"].numpy())
        result = views.result()
        return torch.from_numpy(result.probs).float(), torch.from_numpy(result.labels)

    @torch.inference_mode()
    def run(self, encoder: torch.nn.Module, device: torch.device, rank: int) -> dict[str, float]:
        """Embed this rank's share of both splits; rank 0 gathers and returns the metrics (others: {})."""

        was_training = encoder.training
        encoder.eval()
        parts = [self._embed(encoder, name, device) for name in DATASETS]
        encoder.train(was_training)
        if dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, parts)  # small: (videos, D) floats per split
        else:
            gathered = [parts]
        if rank != 0:
            return {}
        (bank, bank_labels), (queries, query_labels) = (
            (torch.cat([g[i][0] for g in gathered]), torch.cat([g[i][1] for g in gathered])) for i in range(2)
        )
        if len(bank) == 0 or len(queries) == 0:
            raise RuntimeError("a probe split produced no readable video: see the probe's data error report")
        k, temperature = self.section.k, self.section.temperature
        top1 = knn_top1(bank, bank_labels, queries, query_labels, self.num_classes, k, temperature)
        return {"probe/knn_top1": top1, "probe/bank_videos": len(bank), "probe/query_videos": len(queries)}
