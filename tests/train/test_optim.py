"""Parameter groups (no decay on norms / biases / tokens, layer-wise decay) and the per-step schedule."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.models.videomae import VideoMAEConfig, VideoMAEForPreTraining, VideoMAEForVideoClassification
from pipeline.train.optim import WarmupCosine, build_adamw, layer_id, lr_at, param_groups, scaled_lr


def test_no_weight_decay_on_norms_biases_and_tokens():
    model = VideoMAEForPreTraining(VideoMAEConfig.from_preset("tiny"))
    groups = param_groups(model, weight_decay=0.05)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    plain = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert "mask_token" in plain
    assert any("layernorm" in n and n.endswith("weight") for n in plain)
    assert all(not n.endswith(".bias") for n in decayed)
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)
    assert "videomae.embeddings.patch_embeddings.projection.weight" in decayed
    assert decayed | plain == {n for n, _ in model.named_parameters()}


def test_layer_ids_follow_transformers_names():
    assert layer_id("videomae.embeddings.patch_embeddings.projection.weight", 12) == 0
    assert layer_id("videomae.encoder.layer.0.attention.attention.query.weight", 12) == 1
    assert layer_id("videomae.encoder.layer.11.output.dense.bias", 12) == 12
    assert layer_id("fc_norm.weight", 12) == 13
    assert layer_id("classifier.weight", 12) == 13
    assert layer_id("decoder.decoder_layers.0.attention.attention.query.weight", 12) == 13


def test_layer_decay_scales_the_lr_by_depth():
    cfg = VideoMAEConfig.from_preset("tiny", num_labels=3)
    model = VideoMAEForVideoClassification(cfg)
    opt = build_adamw(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), layer_decay=0.75,
                      num_layers=cfg.num_hidden_layers)
    WarmupCosine(opt, total_steps=10, warmup_steps=0, peak_lr=1e-3, min_lr=0.0)
    by_param = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    layers = cfg.num_hidden_layers
    emb = model.videomae.embeddings.patch_embeddings.projection.weight
    assert by_param[id(emb)] == pytest.approx(1e-3 * 0.75 ** (layers + 1))
    first = model.videomae.encoder.layer[0].intermediate.dense.weight
    assert by_param[id(first)] == pytest.approx(1e-3 * 0.75 ** layers)
    assert by_param[id(model.classifier.weight)] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="num_layers"):
        param_groups(model, 0.05, layer_decay=0.75)


def test_warmup_then_cosine_per_step():
    peak, floor = 1e-3, 1e-5
    assert lr_at(0, 100, 10, peak, floor, warmup_lr=1e-6) == pytest.approx(1e-6)
    assert lr_at(5, 100, 10, peak, floor) == pytest.approx(peak / 2)
    assert lr_at(10, 100, 10, peak, floor) == pytest.approx(peak)
    assert lr_at(55, 100, 10, peak, floor) == pytest.approx(floor + 0.5 * (peak - floor))
    assert lr_at(100, 100, 10, peak, floor) == pytest.approx(floor)
    values = [lr_at(s, 100, 10, peak, floor) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert scaled_lr(1.5e-4, 2048) == pytest.approx(1.2e-3)


def test_scheduler_state_resumes_on_the_same_lr():
    model = torch.nn.Linear(4, 4)
    opt = build_adamw(model, 1e-3, 0.05, (0.9, 0.95))
    sched = WarmupCosine(opt, total_steps=50, warmup_steps=5, peak_lr=1e-3, min_lr=1e-5)
    for _ in range(17):
        sched.step()
    opt2 = build_adamw(model, 1e-3, 0.05, (0.9, 0.95))
    sched2 = WarmupCosine(opt2, total_steps=50, warmup_steps=5, peak_lr=1e-3, min_lr=1e-5)
    sched2.load_state_dict(sched.state_dict())
    expected = lr_at(17, 50, 5, 1e-3, 1e-5)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(expected)
    assert not math.isclose(opt2.param_groups[0]["lr"], 1e-3)


def test_derived_seeds_are_repeatable_and_independent():
    from pipeline.train.ranks import derive_seed

    assert derive_seed(0, 1) == derive_seed(0, 1)  # a resumed run repeats its randomness
    seeds = {derive_seed(0, rank, epoch) for rank in range(4) for epoch in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**31 for s in seeds)
    assert derive_seed(1, 0) != derive_seed(0, 1)  # the order of the parts matters


def test_an_uneven_split_of_the_global_batch_gives_the_full_batch_gradient():
    """Elastic groups: 3 micro-batches of 2 clips on 2 ranks (2 + 1), each micro-loss weighted, averaged
    over ranks as DDP does, equals the gradient of the mean loss over all 6 clips."""
    from pipeline.train.loop import micro_loss_weight, micro_steps

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    x, y = torch.randn(6, 5), torch.randn(6, 1)
    model.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    full = model.weight.grad.clone()

    counts = [micro_steps(6, 2, 2, rank) for rank in range(2)]
    assert counts == [2, 1] and [micro_steps(512, 8, 6, r) for r in range(6)] == [11] * 4 + [10] * 2
    weight, start, per_rank = micro_loss_weight(6, 2, 2), 0, []
    for count in counts:
        model.zero_grad()
        for _ in range(count):
            xs, ys = x[start : start + 2], y[start : start + 2]
            (torch.nn.functional.mse_loss(model(xs), ys) * weight).backward()
            start += 2
        per_rank.append(model.weight.grad.clone())
    torch.testing.assert_close(sum(per_rank) / len(per_rank), full)
