"""Tiny configs: the smallest geometry that still exercises every code path (tubes of 2 frames, 4x4 patches
of 8 px, 75% masking), so tests run in seconds, not fake ones."""

from __future__ import annotations

from typing import Any

from pipeline.data.section import DataSection
from pipeline.models.videomae import VideoMAEConfig

TINY_CLIPS: dict[str, Any] = dict(num_frames=4, sampling_rate=2, image_size=32, patch_size=8, tubelet_size=2,
                                  mask_ratio=0.75, seed=0, decode_isolation="inline")


def tiny_data(uri: str = "", **overrides: Any) -> DataSection:
    """A data section over ``uri`` with tiny clips, decoded inline (no helper process per test)."""
    return DataSection(**{"uri": uri, **TINY_CLIPS, **overrides})


def tiny_model(**overrides: Any) -> VideoMAEConfig:
    """The ``tiny`` model preset (2 layers of width 64)."""
    return VideoMAEConfig.from_preset("tiny", **overrides)

