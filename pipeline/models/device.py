"""Where a model runs and in which precision: one rule for training, evaluation and probing."""

from __future__ import annotations

import torch

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(use_gpu: bool) -> torch.device:
    """CUDA when asked for and present, else the CPU."""
    return torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (fp32 | bf16 | fp16 | auto) on ``device``; None = fp32. ``auto``
    is bf16 on GPUs that have it, fp16 on older GPUs, fp32 on the CPU (where this model's autocast has not
    paid: benchmarks/model_step.py measures it on the machine at hand)."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return PRECISIONS[precision]
