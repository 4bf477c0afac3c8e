"""RandAugment for video clips on uint8 torch tensors: every frame of a clip gets the same operations
with the same parameters, so the augmentation changes how a clip looks without adding flicker.

The VideoMAE finetuning recipe uses timm's ``rand-m7-n4-mstd0.5-inc1``: 4 operations drawn at random
(with replacement), each applied with probability 0.5, at magnitude 7 of 10 jittered by N(0, 0.5). The
same spec strings are accepted here (``parse_spec``) and mean the same: the operation list and the
magnitude-to-parameter maps follow timm's increasing (``inc1``) and plain variants, the pixel formulas
PIL's ImageOps / ImageEnhance. Geometric operations resample bilinearly and fill with the ImageNet mean.

Differences from the original, on purpose: operations run after the crop (on the output size, so cost
does not grow with the source resolution; translation is relative, so the range is the same), and on
torch tensors (vectorised over the frames, no PIL round trip per frame).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

MAX_LEVEL = 10.0
FILL = (124, 116, 104)  # ImageNet mean as uint8: what geometric operations leave outside the image
OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
)  # fmt: skip


@dataclass(frozen=True)
class RandAugmentSpec:
    num_ops: int = 2  # operations per clip, drawn with replacement
    magnitude: float = 9.0  # 0..10
    magnitude_std: float = 0.0  # per-operation Gaussian jitter of the magnitude (0 = fixed)
    increasing: bool = True  # timm's "inc1": a higher magnitude always means a stronger change
    prob: float = 0.5  # chance each drawn operation is applied


def parse_spec(spec: str) -> RandAugmentSpec:
    """Parse a timm-style spec such as ``rand-m7-n4-mstd0.5-inc1`` (VideoMAE's finetuning default)."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment spec {spec!r} must start with 'rand-', e.g. 'rand-m7-n4-mstd0.5-inc1'")
    values: dict[str, float] = {}
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|inc|m|n|p)(\d+(?:\.\d+)?)", part)
        if not match:
            raise ValueError(f"RandAugment spec {spec!r}: unknown part {part!r} (known: m, n, mstd, inc, p)")
        values[match[1]] = float(match[2])
    out = RandAugmentSpec(
        num_ops=int(values.get("n", 2)),
        magnitude=values.get("m", 9.0),
        magnitude_std=values.get("mstd", 0.0),
        increasing=bool(values.get("inc", 0)),
        prob=values.get("p", 0.5),
    )
    if out.num_ops < 1 or not 0 <= out.magnitude <= MAX_LEVEL or not 0 <= out.prob <= 1:
        raise ValueError(f"RandAugment spec {spec!r}: need n >= 1, 0 <= m <= 10 and 0 <= p <= 1")
    return out


class RandAugment:
    """``RandAugment(parse_spec("rand-m7-n4-mstd0.5-inc1"))(clip, rng)``: (T, H, W, C) uint8 -> same shape."""

    def __init__(self, spec: RandAugmentSpec):
        self.spec = spec

    def __call__(self, clip: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        for name in rng.choice(OPS, self.spec.num_ops):
            if rng.random() >= self.spec.prob:
                continue
            level = self.spec.magnitude
            if self.spec.magnitude_std > 0:
                level = float(np.clip(rng.normal(level, self.spec.magnitude_std), 0, MAX_LEVEL))
            clip = apply_op(clip, str(name), level / MAX_LEVEL, self.spec.increasing, rng)
        return clip


def apply_op(
    clip: torch.Tensor, name: str, strength: float, increasing: bool, rng: np.random.Generator
) -> torch.Tensor:
    """One operation at ``strength`` in [0, 1] (magnitude / 10); signed operations draw their sign."""
    sign = -1.0 if rng.random() < 0.5 else 1.0
    enhance = 1.0 + sign * 0.9 * strength if increasing else 0.1 + 1.8 * strength
    if name == "AutoContrast":
        return autocontrast(clip)
    if name == "Equalize":
        return equalize(clip)
    if name == "Invert":
        return 255 - clip
    if name == "Posterize":
        bits = 4 - int(strength * 4) if increasing else int(strength * 4)
        return clip & ((0xFF << (8 - bits)) & 0xFF)
    if name == "Solarize":
        threshold = 256 - int(strength * 256) if increasing else int(strength * 256)
        return torch.where(clip.to(torch.int16) >= threshold, 255 - clip, clip)
    if name == "SolarizeAdd":
        added = (clip.to(torch.int16) + int(strength * 110)).clamp_(max=255).to(torch.uint8)
        return torch.where(clip < 128, added, clip)
    if name == "Color":
        return blend(grayscale(clip).expand_as(clip), clip, enhance)
    if name == "Contrast":
        mean = grayscale(clip).float().mean(dim=(1, 2, 3), keepdim=True).add(0.5).floor()
        return blend(mean.expand(clip.shape), clip, enhance)
    if name == "Brightness":
        return blend(torch.zeros_like(clip), clip, enhance)
    if name == "Sharpness":
        return sharpness(clip, enhance)
    _, h, w, _ = clip.shape
    if name == "Rotate":
        angle = math.radians(sign * 30.0 * strength)
        cos, sin = math.cos(angle), math.sin(angle)
        cx, cy = w / 2, h / 2  # about the centre: input = R (out - c) + c
        return affine(clip, (cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy))
    if name == "ShearX":
        return affine(clip, (1.0, sign * 0.3 * strength, 0.0, 0.0, 1.0, 0.0))
    if name == "ShearY":
        return affine(clip, (1.0, 0.0, 0.0, sign * 0.3 * strength, 1.0, 0.0))
    if name == "TranslateX":
        return affine(clip, (1.0, 0.0, sign * 0.45 * strength * w, 0.0, 1.0, 0.0))
    if name == "TranslateY":
        return affine(clip, (1.0, 0.0, 0.0, 0.0, 1.0, sign * 0.45 * strength * h))
    raise ValueError(f"unknown RandAugment operation {name!r}; known: {', '.join(OPS)}")


def grayscale(clip: torch.Tensor) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, H, W, 1) uint8 luma, PIL's "L" conversion (ITU-R 601-2)."""
    weights = torch.tensor([0.299, 0.587, 0.114])
    return (clip.float() @ weights).add_(0.5).floor_().clamp_(0, 255).to(torch.uint8).unsqueeze(-1)


def blend(degenerate: torch.Tensor, clip: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ImageEnhance: ``degenerate + factor * (clip - degenerate)``, truncated and clipped to uint8."""
    base = degenerate.float()
    return (base + factor * (clip.float() - base)).trunc_().clamp_(0, 255).to(torch.uint8)


def sharpness(clip: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ImageEnhance.Sharpness: blend with PIL's SMOOTH filter (3x3, centre weight 5, the rest 1, /13),
    whose one-pixel border is the image itself. Separable shifted sums, which beat avg_pool2d on the CPU."""
    x = clip.float()
    rows = x[:, :-2] + x[:, 1:-1] + x[:, 2:]  # (T, H-2, W, C)
    box = rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]  # the 3x3 sums, (T, H-2, W-2, C)
    centre = x[:, 1:-1, 1:-1]
    smoothed = box.add_(centre, alpha=4).div_(13).round_().clamp_(0, 255)
    out = x.clone()
    out[:, 1:-1, 1:-1] = smoothed.add_(centre.sub(smoothed).mul_(factor))
    return out.trunc_().clamp_(0, 255).to(torch.uint8)


def autocontrast(clip: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each frame to 0..255 (PIL ImageOps.autocontrast, no cutoff)."""
    t, _, _, c = clip.shape
    flat = clip.reshape(t, -1, c)
    low, high = flat.amin(dim=1).float(), flat.amax(dim=1).float()  # (T, C), reduced on uint8
    flat_span = high <= low  # a single value: PIL leaves the channel as it is
    scale = torch.where(flat_span, 1.0, 255.0 / (high - low).clamp(min=1))
    low = torch.where(flat_span, 0.0, low)
    x = clip.float().sub_(low[:, None, None]).mul_(scale[:, None, None])
    return x.floor_().clamp_(0, 255).to(torch.uint8)


def equalize(clip: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per channel of each frame (PIL ImageOps.equalize), vectorised."""
    t, h, w, c = clip.shape
    planes = clip.permute(0, 3, 1, 2).reshape(t * c, h * w).long()
    hist = torch.zeros(t * c, 256, dtype=torch.long).scatter_add_(1, planes, torch.ones_like(planes))
    last = 255 - (hist.flip(1) > 0).long().argmax(dim=1)  # highest value present
    step = (h * w - hist.gather(1, last[:, None]).squeeze(1)) // 255
    before = hist.cumsum(1) - hist  # pixels strictly below each value
    lut = ((before + (step // 2)[:, None]) // step.clamp(min=1)[:, None]).clamp_(max=255)
    identity = torch.arange(256).expand(t * c, 256)
    lut = torch.where((step > 0)[:, None], lut, identity)
    out = lut.gather(1, planes).to(torch.uint8)
    return out.view(t, c, h, w).permute(0, 2, 3, 1).contiguous()


def affine(clip: torch.Tensor, matrix: tuple[float, ...]) -> torch.Tensor:
    """PIL's affine transform: output pixel (x, y) takes input (a x + b y + c, d x + e y + f), bilinear,
    the ImageNet mean where that falls outside the frame."""
    a, b, c, d, e, f = matrix
    t, h, w, ch = clip.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")  # fmt: skip
    # PIL samples at pixel centres: (x + 0.5, y + 0.5) -> input coordinates -> grid_sample's [-1, 1]
    src_x = a * (xs + 0.5) + b * (ys + 0.5) + c
    src_y = d * (xs + 0.5) + e * (ys + 0.5) + f
    grid = torch.stack((2 * src_x / w - 1, 2 * src_y / h - 1), dim=-1).expand(t, h, w, 2)
    fill = torch.tensor(FILL[:ch], dtype=torch.float32).view(1, ch, 1, 1)
    planes = clip.permute(0, 3, 1, 2).float() - fill  # zero padding of (x - fill) = padding with fill
    out = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    return out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
