"""Frame samplers: strides, random starts, short videos repeating their last frame, TSN segments, views."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.sampling import DenseSampler, MultiViewSampler, SegmentSampler, make_sampler


def test_dense_clips_have_the_stride_and_stay_inside():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(200):
        (clip,) = DenseSampler(16, 4)(300, rng)
        assert clip.dtype == np.int64 and len(clip) == 16
        assert (np.diff(clip) == 4).all() and clip[0] >= 0 and clip[-1] <= 299
        starts.add(int(clip[0]))
    assert min(starts) <= 5 and max(starts) >= 230  # starts spread over the whole valid range [0, 239]


def test_short_video_repeats_its_last_frame():
    (clip,) = DenseSampler(16, 4)(10, np.random.default_rng(0))
    assert clip.tolist() == [0, 4, 8] + [9] * 13


def test_repeated_sampling_gives_independent_clips():
    clips = DenseSampler(8, 2, clips=4)(500, np.random.default_rng(1))
    assert len(clips) == 4 and len({int(c[0]) for c in clips}) == 4


@pytest.mark.parametrize("sampler", [DenseSampler(8, 2, 4, shared=True), SegmentSampler(8, 4, shared=True)])
def test_shared_repeated_sampling_reuses_one_set_of_frames(sampler):
    clips = sampler(500, np.random.default_rng(1))
    assert len(clips) == 4 and all(np.array_equal(c, clips[0]) for c in clips)
    others = sampler(500, np.random.default_rng(2))
    assert not np.array_equal(others[0], clips[0])  # still a random draw per video


def test_segment_sampling_takes_one_frame_per_segment():
    clips = SegmentSampler(8, clips=2)(80, np.random.default_rng(0))
    for clip in clips:
        assert ((clip // 10) == np.arange(8)).all()  # frame k lies in segment k
    assert not np.array_equal(clips[0], clips[1])
    assert SegmentSampler(8)(3, np.random.default_rng(0))[0].max() <= 2  # fewer frames than segments


def test_eval_views_are_deterministic_and_spread():
    views = MultiViewSampler(4, 5, num_clips=3)(100)
    assert [int(v[0]) for v in views] == [0, 42, 84]  # span 16: the last view ends on frame 99
    assert [v.tolist() for v in views] == [v.tolist() for v in MultiViewSampler(4, 5, num_clips=3)(100)]
    assert MultiViewSampler(4, 5)(100)[0][0] == 42  # one view: the middle
    seg = MultiViewSampler(4, mode="segment", num_clips=2)(40)
    assert seg[0].tolist() == [2, 12, 22, 32] and seg[1].tolist() == [7, 17, 27, 37]


def test_make_sampler_names():
    assert isinstance(make_sampler("segment", 8, 2, 1), SegmentSampler)
    with pytest.raises(ValueError, match="dense"):
        make_sampler("tsn", 8, 2, 1)
