"""What the training loop trains: an objective builds the model and its optimizer, turns a batch into a
loss, and may validate at an epoch's end. Pretraining (pipeline/train/pretrain.py) and finetuning
(finetune.py) implement it; the loop (loop.py) knows nothing else of either."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from pipeline.train.checkpointing import Progress


class Objective(Protocol):
    """Picklable: the driver builds it, and Ray Train ships it to every worker."""

    def build_model(self, cfg: Any) -> torch.nn.Module:
        """The model to train, from the job's config (``cfg.model``), on the CPU."""
        ...

    def build_optimizer(self, module: torch.nn.Module, schedule: Any, cfg: Any) -> torch.optim.Optimizer:
        """The optimizer of the unwrapped ``module``, at the schedule's peak LR (the loop's WarmupCosine
        scales it)."""
        ...

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], pixel_values: torch.Tensor, *, rank: int,
             step: int, micro: int) -> tuple[torch.Tensor, Any]:
        """(mean loss of the micro-batch, what the reconstruction picture needs or None). ``pixel_values``
        are normalised (B, T, C, H, W); (rank, step, micro) seed anything random, so a resumed run repeats
        it."""
        ...

    def should_validate(self, *, epoch_end: bool, last_step: bool) -> bool:
        ...

    def validate(self, module: torch.nn.Module, *, device: torch.device, rank: int,
                 progress: Progress) -> dict[str, float]:
        """Metrics over the validation split, the same on every rank (all ranks take part)."""
        ...
