"""Mixup / CutMix on video batches with label smoothing, and the soft-target loss they need.

The VideoMAE finetuning recipe mixes every batch: with probability ``switch_prob`` a CutMix box (the same
box in every frame, so the pasted region moves coherently through time) else a Mixup blend, each paired
with the batch reversed. Targets become soft: smoothed one-hots mixed with the same weight ``lam``.
Mixing runs on the trainer after normalisation, on ``(B, T, C, H, W)`` float clips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError


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


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B,) int labels -> (B, num_classes) targets; ``smoothing`` mass spread evenly over all classes."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross entropy against a distribution per sample (mixed / smoothed labels), averaged over the batch."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box covering about ``1 - lam`` of the frame, centred uniformly at random and clipped to the frame.

    Returns ``(y0, y1, x0, x1)``. Clipping can shrink the box, so callers recompute ``lam`` from its area.
    """
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    return int(y0), int(y1), int(x0), int(x1)


class Mixup:
    """Batch-wise Mixup / CutMix for ``(B, T, C, H, W)`` clips; returns mixed clips and soft targets.

    ``mixup_alpha`` / ``cutmix_alpha`` are the Beta(alpha, alpha) parameters of the mixing weight (0
    disables that kind); ``prob`` is the chance a batch is mixed at all; ``switch_prob`` the chance of
    CutMix when both are enabled. Unmixed batches still get label smoothing.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        seed: int | None = None,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"mixup needs at least 2 classes, got {num_classes}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob = prob, switch_prob
        self.label_smoothing = label_smoothing
        self.rng = np.random.default_rng(seed)

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def _draw(self, rng: np.random.Generator) -> tuple[float, bool]:
        """(lam, use_cutmix) for one batch; lam = 1 means no mixing."""
        if not self.enabled or rng.random() >= self.prob:
            return 1.0, False
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return float(rng.beta(alpha, alpha)), use_cutmix

    def __call__(
        self, clips: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix ``clips`` (B, T, C, H, W) with the batch reversed; ``labels`` (B,) ints -> targets (B, K).

        Pass ``rng`` (e.g. seeded from the step) to make mixing reproducible across resumes.
        """
        if clips.ndim != 5:
            raise ValueError(f"expected clips of shape (B, T, C, H, W), got {tuple(clips.shape)}")
        rng = self.rng if rng is None else rng
        lam, use_cutmix = self._draw(rng)
        targets = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        if lam == 1.0:
            return clips, targets
        partner = clips.flip(0)
        if use_cutmix:
            h, w = clips.shape[-2:]
            y0, y1, x0, x1 = cutmix_box(h, w, lam, rng)
            clips = clips.clone()
            clips[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
        else:
            clips = clips * lam + partner * (1.0 - lam)
        return clips, targets * lam + targets.flip(0) * (1.0 - lam)
