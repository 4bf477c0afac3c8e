"""Which frames of a video make a clip.

Samplers are small picklable objects, called as ``sampler(video_length, rng) -> list[np.ndarray]``: one
int64 index array of length ``num_frames`` per clip. They run where the video length is known (in the
decode step), so the decoder fetches exactly the union of the returned frames.

- ``DenseSampler``: ``num_frames`` frames ``sampling_rate`` apart from a random start (pretraining, and
  dense finetuning on Kinetics-like data). ``clips`` > 1 is repeated sampling: several clips from one
  decoded video, each from its own start, or with ``shared`` all from the same frames (the original's
  ``num_sample``: the clips then differ only in crop, flip and mask, for the decode cost of one).
- ``SegmentSampler``: TSN sampling for Something-Something-like data: the video is cut into
  ``num_frames`` equal segments and one frame is taken from each (random in training, centre in eval).
- ``MultiViewSampler``: evaluation's ``num_clips`` temporal views, evenly spread, deterministic.

Videos shorter than a clip's span repeat their last frame (as the original VideoMAE loader does);
they are never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def dense_indices(length: int, num_frames: int, rate: int, start: int) -> np.ndarray:
    """``num_frames`` indices ``rate`` apart from ``start``, clamped to the last frame."""
    return np.minimum(start + np.arange(num_frames, dtype=np.int64) * rate, length - 1)


def segment_indices(length: int, num_frames: int, offsets: np.ndarray) -> np.ndarray:
    """One frame per equal segment; ``offsets`` in [0, 1) place it inside each segment."""
    seg = length / num_frames
    idx = np.floor(np.arange(num_frames) * seg + offsets * seg).astype(np.int64)
    return np.clip(idx, 0, length - 1)


@dataclass(frozen=True)
class DenseSampler:
    num_frames: int = 16
    sampling_rate: int = 4
    clips: int = 1
    shared: bool = False  # every clip from the same frames (one start) rather than its own start

    def __call__(self, length: int, rng: np.random.Generator) -> list[np.ndarray]:
        span = (self.num_frames - 1) * self.sampling_rate + 1
        starts = rng.integers(0, max(length - span, 0) + 1, size=1 if self.shared else self.clips)
        clips = [dense_indices(length, self.num_frames, self.sampling_rate, int(s)) for s in starts]
        return clips * self.clips if self.shared else clips


@dataclass(frozen=True)
class SegmentSampler:
    num_frames: int = 16
    clips: int = 1
    shared: bool = False  # every clip from the same frames rather than its own draw

    def __call__(self, length: int, rng: np.random.Generator) -> list[np.ndarray]:
        draws = 1 if self.shared else self.clips
        clips = [segment_indices(length, self.num_frames, rng.random(self.num_frames)) for _ in range(draws)]
        return clips * self.clips if self.shared else clips


@dataclass(frozen=True)
class MultiViewSampler:
    """``num_clips`` deterministic temporal views for evaluation ("dense" or "segment" mode)."""

    num_frames: int = 16
    sampling_rate: int = 4
    num_clips: int = 1
    mode: str = "dense"

    def __call__(self, length: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
        if self.mode == "segment":  # view k shifts every segment's pick by k / num_clips
            return [
                segment_indices(length, self.num_frames, np.full(self.num_frames, (k + 0.5) / self.num_clips))
                for k in range(self.num_clips)
            ]
        span = (self.num_frames - 1) * self.sampling_rate + 1
        last_start = max(length - span, 0)
        if self.num_clips == 1:
            starts = [last_start // 2]
        else:
            starts = np.linspace(0, last_start, self.num_clips).round().astype(int).tolist()
        return [dense_indices(length, self.num_frames, self.sampling_rate, s) for s in starts]


def make_sampler(
    mode: str, num_frames: int, sampling_rate: int, clips: int, shared: bool = False
) -> DenseSampler | SegmentSampler:
    """Training sampler by name: ``dense`` (random start, fixed stride) or ``segment`` (TSN)."""
    if mode == "dense":
        return DenseSampler(num_frames, sampling_rate, clips, shared)
    if mode == "segment":
        return SegmentSampler(num_frames, clips, shared)
    raise ValueError(f"unknown sampling mode {mode!r}; choose 'dense' or 'segment'")
