"""Clip transforms on uint8 torch tensors, vectorised over the frames of a clip.

Clips are ``(T, H, W, C)`` uint8; every frame of a clip gets the same crop (a clip is one view of one
moment). Resizing is bilinear with antialiasing on uint8 (torch's fast channels-last path), which
matches PIL's bilinear resize used by the original code within rounding.

- ``multi_scale_crop``: pretraining (the original's GroupMultiScaleCrop: crop sides from
  ``min(H, W) * (1, .875, .75, .66)`` with aspect distortion of at most one step, at one of 13 fixed
  positions, resized to the output size).
- ``random_resized_crop`` (+ ``hflip``): finetuning (area scale (0.08, 1), ratio (3/4, 4/3)).
- ``short_side_resize`` + ``spatial_crops``: evaluation (centre crop or three crops along the long side).
- ``to_model_input``: on the training worker, uint8 ``(B, T, H, W, C)`` -> normalised float
  ``(B, T, C, H, W)`` on the tensor's own device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.models.videomae.configuration import IMAGENET_MEAN, IMAGENET_STD

PRETRAIN_SCALES = (1.0, 0.875, 0.75, 0.66)

Box = tuple[int, int, int, int]  # top, left, height, width


def resize(clip: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(T, H, W, C) uint8 -> (T, h, w, C) uint8, bilinear with antialiasing."""
    if tuple(clip.shape[1:3]) == tuple(size):
        return clip.contiguous()
    out = F.interpolate(
        clip.permute(0, 3, 1, 2), size=size, mode="bilinear", antialias=True, align_corners=False
    )
    return out.permute(0, 2, 3, 1).contiguous()


def crop(clip: torch.Tensor, box: Box) -> torch.Tensor:
    top, left, h, w = box
    return clip[:, top : top + h, left : left + w]


def multi_scale_crop_box(
    height: int,
    width: int,
    out_size: int,
    rng: np.random.Generator,
    scales: Sequence[float] = PRETRAIN_SCALES,
    max_distort: int = 1,
) -> Box:
    """The original's multi-scale crop: sides from the scales of the short side, 13 fixed positions."""
    base = min(height, width)
    sides = [int(base * s) for s in scales]
    sides = [
        out_size if abs(s - out_size) < 3 else s for s in sides
    ]  # snap near-output sizes, as the original
    pairs = [(h, w) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= max_distort]
    ch, cw = pairs[rng.integers(len(pairs))]
    ch, cw = min(ch, height), min(cw, width)
    ys, xs = (height - ch) // 4, (width - cw) // 4
    grid = [
        (0, 0),
        (0, 4),
        (4, 0),
        (4, 4),
        (2, 2),
        (2, 0),
        (2, 4),
        (4, 2),
        (0, 2),
        (1, 1),
        (1, 3),
        (3, 1),
        (3, 3),
    ]
    gy, gx = grid[rng.integers(len(grid))]
    return gy * ys, gx * xs, ch, cw


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Box:
    """A random area fraction in ``scale`` and aspect ratio in ``ratio``; centre crop if none fits."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def hflip(clip: torch.Tensor) -> torch.Tensor:
    return clip.flip(2)


def short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    if height <= width:
        return short, max(short, int(round(width * short / height)))
    return max(short, int(round(height * short / width))), short


def short_side_resize(clip: torch.Tensor, short: int) -> torch.Tensor:
    return resize(clip, short_side_size(clip.shape[1], clip.shape[2], short))


def spatial_crops(clip: torch.Tensor, size: int, num_crops: int = 1) -> list[torch.Tensor]:
    """Centre crop (1) or start / centre / end crops along the long side (3), each ``size`` square."""
    _, h, w, _ = clip.shape
    if num_crops == 1:
        return [crop(clip, ((h - size) // 2, (w - size) // 2, size, size)).contiguous()]
    if num_crops != 3:
        raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
    if w >= h:
        boxes = [((h - size) // 2, x, size, size) for x in (0, (w - size) // 2, w - size)]
    else:
        boxes = [(y, (w - size) // 2, size, size) for y in (0, (h - size) // 2, h - size)]
    return [crop(clip, b).contiguous() for b in boxes]


def to_model_input(
    pixel_values: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 (B, T, H, W, C) -> normalised (B, T, C, H, W) ``dtype``, on the input's device.

    Call it on the training worker after moving the uint8 batch to the GPU: 4x less host-to-device
    traffic than float32, and the arithmetic runs on the device.
    """
    device = pixel_values.device
    scale = torch.tensor(std, device=device, dtype=torch.float32) * 255.0
    shift = torch.tensor(mean, device=device, dtype=torch.float32) * 255.0
    x = (pixel_values.to(torch.float32) - shift) / scale  # (B, T, H, W, C)
    return x.permute(0, 1, 4, 2, 3).contiguous().to(dtype)


def random_erasing(
    clips: torch.Tensor,
    prob: float,
    rng: np.random.Generator,
    area: tuple[float, float] = (0.02, 1 / 3),
    log_ratio: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3)),
) -> torch.Tensor:
    """VideoMAE's random erasing (``--reprob``, pixel mode, its default ``cube=True``) on normalised
    ``(B, T, C, H, W)`` clips.

    As in the original, each clip, with probability ``prob``, gets one box of ``area`` of the frame (aspect
    ratio log-uniform in ``log_ratio``, up to 100 tries) at the same place in every frame, filled with
    N(0, 1) noise in normalised units. Runs on the trainer, after ``to_model_input``, so the noise is made
    on the training device.
    """
    b, t, _, h, w = clips.shape
    boxes = torch.zeros(b, 4, dtype=torch.long)  # top, bottom, left, right; empty = no erasing
    for i in np.flatnonzero(rng.random(b) < prob):
        for _ in range(100):
            target = rng.uniform(*area) * h * w
            aspect = math.exp(rng.uniform(*log_ratio))
            eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if eh < h and ew < w:
                top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
                boxes[i] = torch.tensor([top, top + eh, left, left + ew])
                break
    if not boxes.any():
        return clips
    boxes = boxes.to(clips.device).view(b, 1, 1, 4, 1, 1)
    ys = torch.arange(h, device=clips.device).view(h, 1)
    xs = torch.arange(w, device=clips.device).view(1, w)
    inside = (ys >= boxes[..., 0, :, :]) & (ys < boxes[..., 1, :, :])
    inside = inside & (xs >= boxes[..., 2, :, :]) & (xs < boxes[..., 3, :, :])  # (B, 1, 1, H, W)
    generator = torch.Generator(device=clips.device).manual_seed(int(rng.integers(2**63)))
    noise = torch.randn(clips.shape, generator=generator, device=clips.device, dtype=clips.dtype)
    return torch.where(inside, noise, clips)
