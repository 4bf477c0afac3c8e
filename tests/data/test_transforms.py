"""Clip transforms on uint8 tensors: crop boxes, resizing, flips, eval views, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data import transforms as T


def ramp_clip(t=4, h=48, w=64) -> torch.Tensor:
    """Pixel value = x coordinate, so crops and flips are visible in the numbers."""
    x = torch.arange(w, dtype=torch.uint8).view(1, 1, w, 1)
    return x.expand(t, h, w, 3).contiguous()


def test_multi_scale_crop_boxes_use_the_original_scales_and_positions():
    rng = np.random.default_rng(0)
    seen_sides = set()
    for _ in range(500):
        top, left, h, w = T.multi_scale_crop_box(240, 320, 224, rng)
        seen_sides.update((h, w))
        assert top >= 0 and top + h <= 240 and left >= 0 and left + w <= 320
        assert top % ((240 - h) // 4 or 1) == 0 and left % ((320 - w) // 4 or 1) == 0  # fixed grid
    # short side 240 * (1, .875, .75, .66) = 240, 210, 180, 158; 224-ish sides snap to 224 (none here)
    assert seen_sides == {240, 210, 180, 158}


def test_multi_scale_crop_distorts_aspect_by_at_most_one_step():
    rng = np.random.default_rng(1)
    sides = [240, 210, 180, 158]
    for _ in range(200):
        _, _, h, w = T.multi_scale_crop_box(240, 320, 224, rng)
        assert abs(sides.index(h) - sides.index(w)) <= 1


def test_random_resized_crop_area_and_ratio():
    rng = np.random.default_rng(2)
    for _ in range(200):
        top, left, h, w = T.random_resized_crop_box(100, 200, rng, scale=(0.2, 0.5))
        assert top + h <= 100 and left + w <= 200
        assert 0.18 <= h * w / 20000 <= 0.52 and 0.7 <= w / h <= 1.4


def test_resize_and_crop_keep_uint8_and_content():
    clip = ramp_clip()
    out = T.resize(T.crop(clip, (0, 16, 48, 32)), (24, 16))
    assert out.dtype == torch.uint8 and out.shape == (4, 24, 16, 3) and out.is_contiguous()
    assert 16 <= out[..., 0].float().mean() <= 47  # values come from columns 16..47
    assert (out[:, :, 1:, 0] >= out[:, :, :-1, 0]).all()  # the ramp survives the resize


def test_hflip_reverses_columns():
    flipped = T.hflip(ramp_clip())
    assert flipped[0, 0, :, 0].tolist() == list(range(63, -1, -1))


def test_eval_short_side_and_three_crops():
    clip = ramp_clip(2, 48, 96)
    short = T.short_side_resize(clip, 24)
    assert short.shape == (2, 24, 48, 3)
    crops = T.spatial_crops(short, 24, 3)
    assert [c.shape for c in crops] == [(2, 24, 24, 3)] * 3
    lefts = [int(c[0, 0, 0, 0]) for c in crops]
    assert lefts[0] < lefts[1] < lefts[2]  # left, centre, right
    assert T.spatial_crops(T.short_side_resize(ramp_clip(2, 96, 48), 24), 24, 3)[0].shape == (2, 24, 24, 3)
    with pytest.raises(ValueError):
        T.spatial_crops(short, 24, 2)


def test_to_model_input_normalises_and_moves_channels():
    pixels = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 1, 3).expand(2, 4, 8, 8, 3)
    x = T.to_model_input(pixels, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert x.shape == (2, 4, 3, 8, 8) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, 0, :, 0, 0], torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]))
    assert T.to_model_input(pixels, dtype=torch.bfloat16).dtype == torch.bfloat16
    imagenet = T.to_model_input(pixels)[0, 0, :, 0, 0]
    mean, std = torch.tensor(T.IMAGENET_MEAN), torch.tensor(T.IMAGENET_STD)
    expected = (torch.tensor([0, 128, 255]) / 255 - mean) / std
    torch.testing.assert_close(imagenet, expected.float())
