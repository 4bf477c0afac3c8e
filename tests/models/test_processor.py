"""VideoMAEImageProcessor against transformers' own (5.24, PIL backend) within the documented tolerance:
at most 2 uint8 levels per pixel before rescaling (1 when downscaling) and a mean difference below 0.1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.models.videomae.processing import VideoMAEFeatureExtractor, VideoMAEImageProcessor

transformers_pil = pytest.importorskip("transformers.models.videomae.image_processing_pil_videomae")
Reference = transformers_pil.VideoMAEImageProcessorPil


def levels(a, b, std=0.5) -> np.ndarray:
    """|a - b| in uint8 intensity levels for outputs normalised with ``std``."""
    return np.abs(np.asarray(a) - np.asarray(b)) * std * 255


def video(rng, t=4, h=60, w=80) -> np.ndarray:
    return rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("shape", [(60, 80), (96, 64), (240, 320), (224, 224)])
def test_defaults_match_transformers(shape):
    frames = list(video(np.random.default_rng(0), 3, *shape))
    ours = VideoMAEImageProcessor()(frames, return_tensors="np")["pixel_values"]
    ref = Reference()(frames, return_tensors="np")["pixel_values"]
    assert ours.shape == ref.shape == (1, 3, 3, 224, 224)
    diff = levels(ours, ref)
    downscaled = min(shape) >= 224
    assert diff.max() <= (1.0 if downscaled else 2.0) + 1e-3 and diff.mean() < 0.1


def test_batch_of_videos_torch_channels_first_custom_sizes():
    rng = np.random.default_rng(1)
    videos = [torch.from_numpy(video(rng, 2, 50, 70)).permute(0, 3, 1, 2) for _ in range(2)]  # (T, C, H, W)
    kwargs = dict(
        size={"shortest_edge": 40},
        crop_size={"height": 32, "width": 36},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    ours = VideoMAEImageProcessor(**kwargs)([list(v) for v in videos], return_tensors="pt").pixel_values
    ref = Reference(**kwargs)([list(v) for v in videos], return_tensors="pt")["pixel_values"]
    assert ours.shape == ref.shape == (2, 2, 3, 32, 36)
    assert levels(ours, ref, std=0.224).max() <= 2.05


def test_call_time_overrides_and_skipped_steps():
    frames = video(np.random.default_rng(2), 2, 30, 40)
    ours = VideoMAEImageProcessor()(
        frames, do_resize=False, crop_size=20, do_normalize=False, return_tensors="pt"
    )
    ref = Reference()(list(frames), do_resize=False, crop_size=20, do_normalize=False, return_tensors="pt")
    torch.testing.assert_close(ours.pixel_values, ref["pixel_values"])  # no resampling: exact
    assert ours.pixel_values.max() <= 1.0


def test_small_frames_are_padded_like_transformers():
    frames = list(video(np.random.default_rng(3), 1, 20, 30))
    kwargs = dict(do_resize=False, crop_size={"height": 24, "width": 24})
    ours = VideoMAEImageProcessor(**kwargs)(frames, return_tensors="np")["pixel_values"]
    ref = Reference(**kwargs)(frames, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_list_output_and_alias():
    frames = list(video(np.random.default_rng(4), 2))
    out = VideoMAEFeatureExtractor(size=32, crop_size=32)(frames)
    assert isinstance(out["pixel_values"], list) and out["pixel_values"][0][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="return_tensors"):
        VideoMAEImageProcessor()(frames, return_tensors="tf")
    with pytest.raises(TypeError, match="unexpected"):
        VideoMAEImageProcessor()(frames, crop_sise=3)


def test_config_file_round_trips_with_transformers(tmp_path):
    ours = VideoMAEImageProcessor(size={"shortest_edge": 128}, crop_size=112, image_mean=[0.4, 0.4, 0.4])
    ours.save_pretrained(str(tmp_path))
    ref = Reference.from_pretrained(str(tmp_path))
    assert ref.size["shortest_edge"] == 128 and ref.crop_size["height"] == 112
    ref.save_pretrained(str(tmp_path / "back"))
    again = VideoMAEImageProcessor.from_pretrained(str(tmp_path / "back"))
    assert again.to_dict() == ours.to_dict()
