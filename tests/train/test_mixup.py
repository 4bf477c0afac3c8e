import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.train.mixup import Mixup, cutmix_box, smooth_one_hot, soft_target_cross_entropy


def test_smooth_one_hot_rows_sum_to_one_and_peak_on_label():
    targets = smooth_one_hot(torch.tensor([0, 3]), 4, smoothing=0.1)
    assert torch.allclose(targets.sum(1), torch.ones(2))
    assert targets[0, 0] == pytest.approx(0.925) and targets[0, 1] == pytest.approx(0.025)
    assert targets[1].argmax() == 3


def test_soft_target_cross_entropy_equals_cross_entropy_on_hard_labels():
    logits, labels = torch.randn(6, 5), torch.randint(0, 5, (6,))
    hard = soft_target_cross_entropy(logits, smooth_one_hot(labels, 5))
    assert hard == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    smooth = soft_target_cross_entropy(logits, smooth_one_hot(labels, 5, 0.1))
    assert smooth == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item(), rel=1e-5)


def test_mixup_blends_clips_and_targets_with_the_same_weight():
    clips = torch.stack([torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8)])  # (B=2, T, C, H, W)
    mix = Mixup(num_classes=2, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0, seed=1)
    mixed, targets = mix(clips, torch.tensor([0, 1]))
    lam = 1.0 - mixed[0].mean().item()  # clip 0 = lam * 0 + (1 - lam) * 1
    assert 0.0 < lam < 1.0
    assert torch.allclose(mixed[0], torch.full_like(mixed[0], 1 - lam))
    assert targets[0].tolist() == pytest.approx([lam, 1 - lam], abs=1e-6)
    assert torch.allclose(targets.sum(1), torch.ones(2))


def test_cutmix_pastes_the_same_box_in_every_frame_and_weights_targets_by_area():
    clips = torch.stack([torch.zeros(4, 3, 16, 16), torch.ones(4, 3, 16, 16)])
    mix = Mixup(num_classes=3, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, seed=3)
    for _ in range(10):
        mixed, targets = mix(clips, torch.tensor([0, 2]))
        pasted = mixed[0, :, 0]  # (T, H, W) of channel 0 of the first clip
        assert torch.equal(pasted, pasted[:1].expand_as(pasted)), "box must be identical across frames"
        area = pasted[0].mean().item()
        assert targets[0, 2].item() == pytest.approx(area, abs=1e-6)
        assert targets[0, 0].item() == pytest.approx(1 - area, abs=1e-6)


def test_cutmix_box_stays_inside_frame():
    rng = np.random.default_rng(0)
    for lam in (0.0, 0.3, 0.9, 1.0):
        y0, y1, x0, x1 = cutmix_box(12, 20, lam, rng)
        assert 0 <= y0 <= y1 <= 12 and 0 <= x0 <= x1 <= 20


def test_switch_probability_picks_both_kinds_and_prob_zero_only_smooths():
    clips = torch.rand(4, 2, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3])
    kinds = set()
    mix = Mixup(num_classes=4, seed=0)
    for _ in range(40):
        mixed, _ = mix(clips, labels)
        delta = (mixed - clips).abs().sum(dim=(1, 2, 3))  # (B, W): columns touched
        kinds.add("cutmix" if (delta == 0).any() else "mixup")
    assert kinds == {"cutmix", "mixup"}
    off = Mixup(num_classes=4, prob=0.0, label_smoothing=0.1)
    same, targets = off(clips, labels)
    assert torch.equal(same, clips)
    assert torch.allclose(targets, smooth_one_hot(labels, 4, 0.1))


def test_same_rng_gives_same_mix():
    clips, labels = torch.rand(3, 2, 3, 8, 8), torch.tensor([0, 1, 2])
    mix = Mixup(num_classes=3)
    a = mix(clips, labels, np.random.default_rng(7))
    b = mix(clips, labels, np.random.default_rng(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_rejects_bad_shapes_and_settings():
    with pytest.raises(ValueError, match="B, T, C, H, W"):
        Mixup(num_classes=3)(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="label_smoothing"):
        Mixup(num_classes=3, label_smoothing=1.0)
    with pytest.raises(ValueError, match="2 classes"):
        Mixup(num_classes=1)
