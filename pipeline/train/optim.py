"""AdamW parameter groups and the per-step learning-rate schedule of the VideoMAE recipes.

- No weight decay on 1-d parameters (norm weights, biases) and on the learned tokens / position
  embeddings: decaying them pulls normalisation gains and token embeddings towards zero for no gain in
  generalisation (as MAE / VideoMAE / BEiT do).
- Layer-wise LR decay for finetuning: layer ``i`` of an ``L``-layer encoder gets ``decay ** (L + 1 - i)``
  of the LR; embeddings get the smallest share, the head the full LR.
- The schedule is per optimizer step (linear warmup from ``warmup_lr`` then cosine to ``min_lr``), so a
  resumed run lands on exactly the LR it would have had.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import ConfigError

NO_DECAY_NAMES = ("pos_embed", "position_embeddings", "mask_token", "cls_token", "dist_token")
_LAYER = re.compile(r"^(?:videomae\.)?encoder\.layer\.(\d+)\.")


@dataclass
class OptimSection:
    """AdamW and the per-step LR schedule. Unless ``lr`` is set, the peak, the end and the start of the
    schedule are ``base_lr``, ``min_lr`` and ``warmup_lr`` x videos per step / 256 (the original's linear
    scaling rule, which counts videos: a step of B clips at ``data.clips_per_video`` N holds B / N)."""

    base_lr: float = 1.5e-4  # peak LR per 256 videos of global batch
    lr: float | None = None  # absolute peak LR (overrides base_lr scaling; min_lr / warmup_lr then absolute)
    min_lr: float = 1e-5  # end of the cosine (per 256 videos, unless lr is set)
    warmup_lr: float = 0.0  # start of the linear warmup; the original's schedule starts at 0
    warmup_epochs: float = 40.0
    warmup_steps: int | None = None  # overrides warmup_epochs
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    layer_decay: float | None = None  # layer-wise LR decay (finetuning: 0.75)

    def validate(self) -> None:
        for name in ("base_lr", "min_lr", "warmup_lr", "eps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must lie in [0, 1), got {list(self.betas)}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"optim.layer_decay must lie in (0, 1], got {self.layer_decay}")
        if self.warmup_epochs < 0 or (self.warmup_steps is not None and self.warmup_steps < 0):
            raise ConfigError("optim.warmup_epochs / optim.warmup_steps must be >= 0")



def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of the MAE family: ``base_lr * global_batch / 256``."""
    return base_lr * global_batch / 256


def skip_weight_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or any(token in name for token in NO_DECAY_NAMES)


def layer_id(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise decay, from transformers-style names:
    ``videomae.embeddings.*`` -> 0, ``videomae.encoder.layer.{i}.*`` -> i + 1, everything else
    (final norms, fc_norm, classifier, decoder) -> ``num_layers + 1``."""
    if name.startswith(("videomae.embeddings.", "embeddings.")):
        return 0
    match = _LAYER.search(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None,
                 num_layers: int | None = None) -> list[dict]:
    """AdamW groups: (decay / no decay) x (layer, when ``layer_decay`` is set). Each group carries an
    ``lr_scale`` that :func:`set_lr` multiplies into the scheduled LR."""
    if layer_decay is not None and num_layers is None:
        raise ValueError("layer_decay needs num_layers (the encoder depth)")
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = skip_weight_decay(name, param)
        depth = layer_id(name, num_layers) if layer_decay is not None else 0
        group = groups.setdefault((depth, no_decay), {
            "params": [], "names": [],
            "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_scale": layer_decay ** (num_layers + 1 - depth) if layer_decay is not None else 1.0,
        })
        group["params"].append(param)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                eps: float = 1e-8, layer_decay: float | None = None,
                num_layers: int | None = None) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay, layer_decay, num_layers)
    for g in groups:
        g.pop("names")
    fused = all(p.is_cuda for g in groups for p in g["params"]) or None
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float,
          warmup_lr: float = 0.0) -> float:
    """LR of optimizer step ``step`` (0-based): linear warmup ``warmup_lr -> peak_lr`` over
    ``warmup_steps``, then half a cosine ``peak_lr -> min_lr`` until ``total_steps``."""
    if step < warmup_steps:
        return warmup_lr + (peak_lr - warmup_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Stateful wrapper of :func:`lr_at` with ``state_dict`` for checkpoints (the state is the step)."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, peak_lr: float,
                 min_lr: float, warmup_lr: float = 0.0):
        if warmup_steps > total_steps:
            raise ValueError(f"warmup_steps {warmup_steps} exceeds total_steps {total_steps}")
        self.optimizer = optimizer
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.peak_lr, self.min_lr, self.warmup_lr = peak_lr, min_lr, warmup_lr
        self.step_count = 0
        self._apply()

    @property
    def lr(self) -> float:
        return lr_at(self.step_count, self.total_steps, self.warmup_steps, self.peak_lr, self.min_lr,
                     self.warmup_lr)

    def _apply(self) -> None:
        set_lr(self.optimizer.param_groups, self.lr)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "peak_lr": self.peak_lr, "min_lr": self.min_lr,
                "warmup_lr": self.warmup_lr}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved step. The curve itself comes from the current config, so a run resumed with
        a longer schedule stretches the remaining cosine instead of replaying the old one."""
        self.step_count = int(state["step_count"])
        self._apply()


def set_lr(groups: Iterable[dict], lr: float) -> None:
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
