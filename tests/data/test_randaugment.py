"""RandAugment on uint8 clips against PIL (the original's implementation runs these PIL operations per
frame), clip consistency, the spec strings of timm/VideoMAE, and random erasing on the trainer."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from pipeline.data.randaugment import OPS, RandAugment, RandAugmentSpec, apply_op, parse_spec
from pipeline.data.transforms import random_erasing


def textured_frame(seed: int = 0, h: int = 40, w: int = 56) -> np.ndarray:
    """Smooth gradients plus noise, not the full range: autocontrast and equalize have work to do."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 60 + 50 * np.sin(xx / 7.0)[..., None] + 40 * np.cos(yy / 5.0)[..., None] + [0, 20, 40]
    return np.clip(base + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)


class FixedSign:
    """An rng whose draws make apply_op take a positive sign (``random() >= 0.5``)."""

    def random(self) -> float:
        return 0.9


def ours(frame: np.ndarray, name: str, strength: float) -> np.ndarray:
    out = apply_op(torch.from_numpy(frame)[None], name, strength, True, FixedSign())
    return out[0].numpy()


def pil_reference(frame: np.ndarray, name: str, strength: float) -> np.ndarray:
    """timm's increasing operations at a positive sign, on PIL."""
    img = Image.fromarray(frame)
    factor = 1.0 + 0.9 * strength
    h, w = frame.shape[:2]
    fill = (124, 116, 104)
    ops = {
        "AutoContrast": lambda: ImageOps.autocontrast(img),
        "Equalize": lambda: ImageOps.equalize(img),
        "Invert": lambda: ImageOps.invert(img),
        "Posterize": lambda: ImageOps.posterize(img, 4 - int(strength * 4)),
        "Solarize": lambda: ImageOps.solarize(img, 256 - int(strength * 256)),
        "Color": lambda: ImageEnhance.Color(img).enhance(factor),
        "Contrast": lambda: ImageEnhance.Contrast(img).enhance(factor),
        "Brightness": lambda: ImageEnhance.Brightness(img).enhance(factor),
        "Sharpness": lambda: ImageEnhance.Sharpness(img).enhance(factor),
        "Rotate": lambda: img.rotate(30 * strength, resample=Image.BILINEAR, fillcolor=fill),
        "ShearX": lambda: img.transform(img.size, Image.AFFINE, (1, 0.3 * strength, 0, 0, 1, 0),
                                        Image.BILINEAR, fillcolor=fill),
        "ShearY": lambda: img.transform(img.size, Image.AFFINE, (1, 0, 0, 0.3 * strength, 1, 0),
                                        Image.BILINEAR, fillcolor=fill),
        "TranslateX": lambda: img.transform(img.size, Image.AFFINE, (1, 0, 0.45 * strength * w, 0, 1, 0),
                                            Image.BILINEAR, fillcolor=fill),
        "TranslateY": lambda: img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, 0.45 * strength * h),
                                            Image.BILINEAR, fillcolor=fill),
    }  # fmt: skip
    if name == "SolarizeAdd":
        lut = [min(255, i + int(strength * 110)) if i < 128 else i for i in range(256)]
        return np.asarray(img.point(lut * 3))
    return np.asarray(ops[name]())


@pytest.mark.parametrize("name", OPS)
def test_each_operation_matches_pil(name):
    frame = textured_frame()
    strength = 0.7
    got, want = ours(frame, name, strength).astype(int), pil_reference(frame, name, strength).astype(int)
    assert got.shape == want.shape
    diff = np.abs(got - want)
    if name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"):
        # bilinear resampling: PIL rounds in fixed point and treats the border differently
        inner = diff[2:-2, 2:-2]
        assert np.mean(inner <= 2) > 0.97, f"{name}: {np.mean(inner <= 2):.3f} of pixels within 2"
    else:
        assert diff.max() <= 1, f"{name}: max difference {diff.max()}"
    if name != "SolarizeAdd" or frame.min() < 128:
        assert not np.array_equal(got, frame), f"{name} at strength {strength} changed nothing"


def test_sharpness_keeps_the_border_as_pil_does():
    frame = textured_frame(1)
    got = ours(frame, "Sharpness", 1.0)
    np.testing.assert_array_equal(got[0], np.asarray(ImageEnhance.Sharpness(Image.fromarray(frame))
                                                     .enhance(1.9))[0])  # fmt: skip
    assert ImageFilter.SMOOTH.filterargs[1:] == (13, 0, (1, 1, 1, 1, 5, 1, 1, 1, 1))  # ours hard-codes it


def test_every_frame_of_a_clip_gets_the_same_operations():
    frames = np.stack([textured_frame(s) for s in range(4)])
    clip = torch.from_numpy(frames)
    augment = RandAugment(RandAugmentSpec(num_ops=4, magnitude=9, magnitude_std=0.5, prob=1.0))
    for seed in range(20):
        together = augment(clip, np.random.default_rng(seed)).numpy()
        alone = [augment(clip[i : i + 1], np.random.default_rng(seed))[0].numpy() for i in range(4)]
        # frame-wise statistics (autocontrast, equalize, contrast's mean) are per frame, as in PIL;
        # the operations and their parameters are shared
        np.testing.assert_array_equal(together, np.stack(alone))


def test_operations_and_magnitudes_are_drawn_per_clip():
    clip = torch.from_numpy(textured_frame()[None].repeat(2, 0))
    augment = RandAugment(parse_spec("rand-m7-n4-mstd0.5-inc1"))
    outs = {augment(clip, np.random.default_rng(seed)).numpy().tobytes() for seed in range(30)}
    assert len(outs) > 20  # different clips look different
    same = augment(clip, np.random.default_rng(3)), augment(clip, np.random.default_rng(3))
    assert torch.equal(*same)  # and the rng decides everything (repeatable with a seed)
    assert same[0].dtype == torch.uint8 and same[0].shape == clip.shape


def test_spec_strings():
    spec = parse_spec("rand-m7-n4-mstd0.5-inc1")
    assert spec == RandAugmentSpec(num_ops=4, magnitude=7.0, magnitude_std=0.5, increasing=True, prob=0.5)
    assert parse_spec("rand-m9-mstd0.5") == RandAugmentSpec(2, 9.0, 0.5, False, 0.5)
    for bad, message in [
        ("auto-m9", "must start with 'rand-'"),
        ("rand-m9-x3", "unknown part 'x3'"),
        ("rand-m11", "0 <= m <= 10"),
        ("rand-n0", "n >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_spec(bad)


def test_plain_variants_follow_timm_levels():
    frame = textured_frame()
    plain = apply_op(torch.from_numpy(frame)[None], "Brightness", 0.5, False, FixedSign())[0].numpy()
    want = np.asarray(ImageEnhance.Brightness(Image.fromarray(frame)).enhance(0.1 + 1.8 * 0.5))
    assert np.abs(plain.astype(int) - want).max() <= 1
    posterized = apply_op(torch.from_numpy(frame)[None], "Posterize", 0.5, False, FixedSign())[0].numpy()
    np.testing.assert_array_equal(posterized, np.asarray(ImageOps.posterize(Image.fromarray(frame), 2)))


def test_random_erasing_fills_one_box_per_chosen_clip_in_every_frame_with_noise():
    clips = torch.zeros(4, 8, 3, 32, 48)
    assert torch.equal(random_erasing(clips, 0.0, np.random.default_rng(0)), clips)
    erased = random_erasing(clips, 1.0, np.random.default_rng(0))
    changed = erased.ne(0).any(dim=2)  # (B, T, H, W)
    for clip in changed:
        assert all(torch.equal(frame, clip[0]) for frame in clip)  # one box, the same in every frame
        ys, xs = clip[0].nonzero(as_tuple=True)
        top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        assert clip[0, top:bottom, left:right].all() and clip[0].sum() == (bottom - top) * (right - left)
        assert 0.015 <= clip[0].float().mean() <= 0.34  # area (0.02, 1/3) of the frame, rounding aside
    assert len({tuple(c[0].nonzero()[0].tolist()) for c in changed}) > 1  # each clip draws its own box
    assert not torch.equal(erased[0, 0], erased[0, 1])  # fresh noise in every frame, as the original
    noise = erased[changed.unsqueeze(2).expand_as(erased)]
    assert abs(noise.mean()) < 0.1 and math.isclose(noise.std().item(), 1.0, abs_tol=0.1)
    many = torch.zeros(400, 2, 3, 16, 16)
    half = random_erasing(many, 0.5, np.random.default_rng(1)).ne(0).flatten(1).any(-1).float().mean()
    assert 0.4 < half < 0.6  # one chance per clip
    again = random_erasing(clips, 1.0, np.random.default_rng(0))
    assert torch.equal(again, erased)  # the rng decides (the same erasing after a resume)
