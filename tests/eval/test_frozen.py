"""Frozen-feature probes: the weighted kNN vote, the linear probe and the encoder they embed with."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.eval.frozen import knn_top1, linear_probe_top1, load_encoder, pooled_features
from pipeline.models.videomae import (
    VideoMAEConfig,
    VideoMAEForPreTraining,
    VideoMAEForVideoClassification,
)


def knn_by_hand(bank, bank_labels, queries, query_labels, num_classes, k, temperature) -> float:
    """The same vote, one query at a time in plain Python: the reference for the vectorised version."""
    correct = 0
    for q, label in zip(queries.tolist(), query_labels.tolist(), strict=True):
        sims = []
        for b, b_label in zip(bank.tolist(), bank_labels.tolist(), strict=True):
            dot = sum(x * y for x, y in zip(q, b, strict=True))
            sims.append((dot / (math.hypot(*q) * math.hypot(*b)), b_label))
        votes = [0.0] * num_classes
        for sim, b_label in sorted(sims, reverse=True)[:k]:
            votes[b_label] += math.exp(sim / temperature)
        correct += max(range(num_classes), key=votes.__getitem__) == label
    return correct / len(query_labels)


def test_knn_is_the_weighted_vote_of_the_nearest_bank_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 8, generator=g)
    bank_labels = torch.arange(60) % 5
    bank = centres[bank_labels] + 0.8 * torch.randn(60, 8, generator=g)
    query_labels = torch.arange(40) % 5
    queries = centres[query_labels] + 0.8 * torch.randn(40, 8, generator=g)
    for k, temperature in ((20, 0.07), (3, 0.5), (100, 0.07)):  # k beyond the bank: every bank feature
        got = knn_top1(bank, bank_labels, queries, query_labels, 5, k, temperature)
        assert got == pytest.approx(knn_by_hand(bank, bank_labels, queries, query_labels, 5, k, temperature))
    assert knn_top1(centres, torch.arange(5), centres * 3, torch.arange(5), 5) == 1.0  # scale-free: cosine
    noise = torch.randn(400, 8, generator=g)
    shuffled = torch.randperm(200, generator=g) % 4
    chance = knn_top1(noise[:200], torch.arange(200) % 4, noise[200:], shuffled, 4)
    assert 0.1 < chance < 0.4
    with pytest.raises(ValueError, match="features on both sides"):
        knn_top1(bank[:0], bank_labels[:0], queries, query_labels, 5)


def test_linear_probe_separates_what_is_linearly_separable_and_picks_its_decay_on_train_only():
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(16, generator=g)
    x = torch.randn(300, 16, generator=g) * 3 + 5  # off-centre, badly scaled: standardisation matters
    y = (x @ direction > 5 * direction.sum()).long()
    top1, decay = linear_probe_top1(x[:200], y[:200], x[200:], y[200:], 2)
    assert top1 >= 0.9 and decay in (1e-4, 1e-3, 1e-2, 1e-1)
    again = linear_probe_top1(x[:200], y[:200], x[200:], y[200:], 2)
    assert again == (top1, decay)  # deterministic
    shuffled = y[torch.randperm(300, generator=g)]
    top1_random, _ = linear_probe_top1(x[:200], shuffled[:200], x[200:], shuffled[200:], 2)
    assert top1_random < 0.7
    # the test split cannot influence the choice: other test labels, the same decay
    _, decay_other = linear_probe_top1(x[:200], y[:200], x[200:], 1 - y[200:], 2)
    assert decay_other == decay


def test_the_encoder_of_any_checkpoint_embeds_with_its_final_norm(tmp_path):
    config = VideoMAEConfig.from_preset("tiny", use_mean_pooling=False)
    pretraining = VideoMAEForPreTraining(config)
    with torch.no_grad():
        pretraining.videomae.layernorm.weight.mul_(3.0)  # a trained-looking final norm
    pretraining.save_pretrained(tmp_path / "pre")
    encoder = load_encoder(str(tmp_path / "pre"))
    torch.testing.assert_close(encoder.layernorm.weight, pretraining.videomae.layernorm.weight)
    x = torch.randn(2, 4, 3, 32, 32)
    features = pooled_features(encoder, x)
    expected = pretraining.videomae(x).last_hidden_state.mean(1)
    torch.testing.assert_close(features, expected)
    assert features.shape == (2, 64)

    classifier = VideoMAEForVideoClassification(VideoMAEConfig.from_preset("tiny", num_labels=3))
    classifier.save_pretrained(tmp_path / "cls")
    encoder = load_encoder(str(tmp_path / "cls"))  # mean pooling, no final norm: the raw mean
    assert encoder.layernorm is None
    torch.testing.assert_close(
        pooled_features(encoder, x), classifier.videomae.eval()(x).last_hidden_state.mean(1)
    )
