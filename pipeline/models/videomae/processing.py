"""``VideoMAEImageProcessor``: transformers' VideoMAE preprocessing (same arguments, defaults and config
file), written on torch so it runs without transformers, PIL or torchvision.

Steps per frame, as transformers: resize (shortest edge to ``size["shortest_edge"]``, long edge
``int(short * long / short_in)``, or to ``size["height"], size["width"]``), centre crop to ``crop_size``
(zero-padded when the frame is smaller), rescale by ``rescale_factor`` (1/255), normalise with
``image_mean`` / ``image_std`` (transformers' defaults: 0.5 / 0.5). Input: one video (a list of frames,
or a ``(T, H, W, C)`` / ``(T, C, H, W)`` array) or a list of videos; frames are numpy arrays or torch
tensors, channels-last or channels-first. Output: ``{"pixel_values": (B, T, C, H, W)}``.

Resampling tolerance: resizing uses torch's antialiased bilinear (or bicubic) interpolation on uint8,
where transformers' PIL backend uses PIL's. On uint8 input the results differ by at most 2 intensity
levels before rescaling (0.016 after the default normalisation; 2 only in rare pixels when upscaling,
otherwise at most 1), with a mean difference below 0.1 level (below 0.01 when downscaling);
tests/test_processor.py checks these bounds against transformers 5.24. Float input
(``do_rescale=False``) is resized in float32 and agrees to the same order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL codes: NEAREST, BILINEAR, BICUBIC
CONFIG_NAME = "preprocessor_config.json"


class BatchFeature(dict):
    """A dict whose keys are also attributes (``out.pixel_values``), like transformers' BatchFeature."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _size_dict(size: int | dict | None, default_to_square: bool) -> dict | None:
    if size is None or isinstance(size, dict):
        return size
    return {"height": size, "width": size} if default_to_square else {"shortest_edge": size}


def _to_tensor(frame: Any) -> torch.Tensor:
    """One frame -> (C, H, W), inferring the channel axis as transformers does (first axis wins)."""
    t = frame if isinstance(frame, torch.Tensor) else torch.as_tensor(np.asarray(frame))
    if t.ndim == 2:
        return t[None]
    if t.shape[0] not in (1, 3) and t.shape[-1] in (1, 3):
        return t.permute(2, 0, 1)
    return t


def _videos(videos: Any) -> list[list[torch.Tensor]]:
    """Accept a frame, a video (list of frames or 4-D array) or a batch of videos (list or 5-D array)."""
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        if videos.ndim == 5:
            return [[_to_tensor(f) for f in v] for v in videos]
        return [[_to_tensor(f) for f in videos]] if videos.ndim == 4 else [[_to_tensor(videos)]]
    videos = list(videos)
    first = videos[0] if videos else None
    if isinstance(first, (list, tuple)) or getattr(first, "ndim", 0) == 4:
        return [[_to_tensor(f) for f in v] for v in videos]
    return [[_to_tensor(f) for f in videos]]


class VideoMAEImageProcessor:
    """Preprocess videos for VideoMAE models, with transformers' arguments and defaults."""

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        do_resize: bool = True,
        size: dict[str, int] | int | None = None,
        resample: int = 2,
        do_center_crop: bool = True,
        crop_size: dict[str, int] | int | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        self.do_resize = do_resize
        self.size = _size_dict(size, default_to_square=False) or {"shortest_edge": 224}
        self.resample = int(resample)
        self.do_center_crop = do_center_crop
        self.crop_size = _size_dict(crop_size, default_to_square=True) or {"height": 224, "width": 224}
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(IMAGENET_STANDARD_MEAN) if image_mean is None else image_mean
        self.image_std = list(IMAGENET_STANDARD_STD) if image_std is None else image_std

    # transformers' config file round trip --------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        keys = (
            "do_resize",
            "size",
            "resample",
            "do_center_crop",
            "crop_size",
            "do_rescale",
            "rescale_factor",
            "do_normalize",
            "image_mean",
            "image_std",
        )
        return {k: getattr(self, k) for k in keys} | {"image_processor_type": "VideoMAEImageProcessor"}

    def save_pretrained(self, folder: str) -> str:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, CONFIG_NAME)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
        return path

    @classmethod
    def from_dict(cls, config: dict[str, Any], **overrides: Any) -> VideoMAEImageProcessor:
        known = cls.__init__.__code__.co_varnames[1 : cls.__init__.__code__.co_argcount]
        return cls(**{k: v for k, v in {**config, **overrides}.items() if k in known})

    @classmethod
    def from_pretrained(cls, folder: str, **overrides: Any) -> VideoMAEImageProcessor:
        """Read ``preprocessor_config.json`` from a local checkpoint folder."""
        with open(os.path.join(folder, CONFIG_NAME)) as f:
            return cls.from_dict(json.load(f), **overrides)

    # processing ------------------------------------------------------------------------------------
    def _resize(self, frames: torch.Tensor, size: dict[str, int], resample: int) -> torch.Tensor:
        """(T, C, H, W) -> resized; uint8 stays uint8 (rounded like PIL), floats stay float32."""
        h, w = frames.shape[-2:]
        if "shortest_edge" in size:
            short = size["shortest_edge"]
            new = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        else:
            new = (size["height"], size["width"])
        if (h, w) == new:
            return frames
        mode = _RESAMPLE.get(resample)
        if mode is None:
            raise ValueError(
                f"resample={resample} is not supported; use 0 (nearest), 2 (bilinear) or 3 (bicubic)"
            )
        x = frames if frames.dtype == torch.uint8 and mode == "bilinear" else frames.float()
        kwargs = {} if mode == "nearest" else {"antialias": True, "align_corners": False}
        out = F.interpolate(x.contiguous(memory_format=torch.channels_last), size=new, mode=mode, **kwargs)
        if frames.dtype == torch.uint8 and out.dtype != torch.uint8:
            out = out.round().clamp(0, 255).to(torch.uint8)
        return out

    @staticmethod
    def _center_crop(frames: torch.Tensor, crop: dict[str, int]) -> torch.Tensor:
        ch, cw = crop["height"], crop["width"]
        h, w = frames.shape[-2:]
        if h < ch or w < cw:  # pad symmetrically with zeros first, as transformers does
            ph, pw = max(ch - h, 0), max(cw - w, 0)
            frames = F.pad(frames, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
            h, w = frames.shape[-2:]
        top, left = (h - ch) // 2, (w - cw) // 2
        return frames[..., top : top + ch, left : left + cw]

    def preprocess(self, videos: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        """Videos -> ``BatchFeature(pixel_values=...)``; ``return_tensors`` "pt", "np" or None (lists)."""
        unknown = set(kwargs) - set(self.to_dict())
        if unknown:
            raise TypeError(f"unexpected arguments: {sorted(unknown)}")
        opt = {**self.to_dict(), **kwargs}
        size = _size_dict(opt["size"], default_to_square=False)
        crop = _size_dict(opt["crop_size"], default_to_square=True)
        mean = torch.tensor(opt["image_mean"], dtype=torch.float32).reshape(-1, 1, 1)
        std = torch.tensor(opt["image_std"], dtype=torch.float32).reshape(-1, 1, 1)
        out = []
        for video in _videos(videos):
            shapes = {tuple(f.shape) for f in video}
            groups = [torch.stack(video)] if len(shapes) == 1 else [f[None] for f in video]
            processed = []
            for x in groups:  # (T, C, H, W), all frames of a video at once when they share a shape
                if opt["do_resize"]:
                    x = self._resize(x, size, opt["resample"])
                if opt["do_center_crop"]:
                    x = self._center_crop(x, crop)
                x = x.float()
                if opt["do_rescale"]:
                    x = x * opt["rescale_factor"]
                if opt["do_normalize"]:
                    x = (x - mean) / std
                processed.append(x)
            out.append(torch.cat(processed))
        if return_tensors == "pt":
            return BatchFeature(pixel_values=torch.stack(out))
        if return_tensors == "np":
            return BatchFeature(pixel_values=torch.stack(out).numpy())
        if return_tensors is not None:
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        return BatchFeature(pixel_values=[[f.numpy() for f in v] for v in out])

    __call__ = preprocess


class VideoMAEFeatureExtractor(VideoMAEImageProcessor):
    """The older name transformers kept as an alias."""
