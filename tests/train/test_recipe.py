"""The training recipe pinned against the original MCG-NJU/VideoMAE and OpenGVLab/VideoMAEv2 code.

Each test names the original's behaviour it checks (file and line of the original in docs/model.md's
recipe table): the pretraining encoder's final norm, the new head's ``init_scale``, the LR scaling rule
that counts videos, the warmup from 0, the V2 dual-masking loss, the original's inits and LayerNorm eps.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline import config as config_lib
from pipeline.config import ConfigError
from pipeline.models.videomae import VideoMAEConfig, VideoMAEForPreTraining, VideoMAEForVideoClassification
from pipeline.models.videomae.masking import running_cell_mask, tube_mask
from pipeline.train.driver import schedule_run
from pipeline.train.finetune import FinetuneConfig
from pipeline.train.optim import lr_at
from pipeline.train.pretrain import PretrainConfig


def test_pretraining_encoder_ends_in_the_originals_layernorm():
    """modeling_pretrain.py: ``x_vis = self.norm(x_vis)`` before ``encoder_to_decoder``, in every preset."""
    for preset in ("pretrain_tiny_demo", "pretrain_vit_b_k400", "pretrain_vit_s_ssv2"):
        cfg = config_lib.load(PretrainConfig, preset)
        assert cfg.model.build().use_mean_pooling is False, preset
    cfg = config_lib.load(PretrainConfig)  # the job's own default, without a preset
    model = VideoMAEForPreTraining(cfg.model.build())
    assert isinstance(model.videomae.layernorm, torch.nn.LayerNorm)
    x = torch.randn(2, *_shape(model.config))
    mask = torch.from_numpy(
        np.stack([tube_mask(model.config.grid, 0.75, np.random.default_rng(i)) for i in range(2)])
    )
    hidden = []
    model.encoder_to_decoder.register_forward_hook(lambda m, args, out: hidden.append(args[0]))
    model(x, mask)
    normed = hidden[0]  # what encoder_to_decoder sees: unit variance per token, as after a LayerNorm
    torch.testing.assert_close(normed.mean(-1), torch.zeros(normed.shape[:2]), atol=1e-5, rtol=0)


def _shape(c: VideoMAEConfig) -> tuple[int, int, int, int]:
    return c.num_frames, c.num_channels, c.image_size, c.image_size


def test_a_new_classifier_head_starts_at_the_originals_init_scale():
    """run_class_finetuning.py ``--init_scale 0.001``: head weight and bias x 0.001 after trunc_normal."""
    cfg = config_lib.load(FinetuneConfig)
    assert cfg.model.build().head_init_scale == pytest.approx(1e-3)
    torch.manual_seed(0)
    scaled = VideoMAEForVideoClassification(
        VideoMAEConfig.from_preset("vit-s", num_labels=400, head_init_scale=1e-3)
    )
    torch.manual_seed(0)
    plain = VideoMAEForVideoClassification(VideoMAEConfig.from_preset("vit-s", num_labels=400))
    assert plain.classifier.weight.std().item() == pytest.approx(0.02, rel=0.05)
    torch.testing.assert_close(scaled.classifier.weight, plain.classifier.weight * 1e-3)
    # the original finetuning model (timm's ViT) draws every linear layer from trunc_normal(std .02)
    fc1 = plain.videomae.encoder.layer[0].intermediate.dense.weight
    assert fc1.std().item() == pytest.approx(0.02, rel=0.05)
    # a loaded classifier keeps its trained head: the scale only touches new heads
    with pytest.raises(ValueError, match="head_init_scale"):
        VideoMAEConfig(head_init_scale=0.0).validate()


def test_pretraining_init_is_the_originals():
    """modeling_pretrain.py: xavier linear layers in encoder and decoder; the Conv3d tubelet embedding and
    ``encoder_to_decoder`` keep PyTorch's default (the original never applies its top-level init)."""
    model = VideoMAEForPreTraining(VideoMAEConfig.from_preset("vit-s"))
    fc1 = model.videomae.encoder.layer[0].intermediate.dense.weight  # (1536, 384)
    assert fc1.std().item() == pytest.approx(math.sqrt(2 / (384 + 1536)), rel=0.02)  # xavier uniform
    default = 1 / math.sqrt(3 * 384)  # kaiming_uniform(a=sqrt(5)) over fan_in 384
    assert model.encoder_to_decoder.weight.std().item() == pytest.approx(default, rel=0.03)
    conv = model.videomae.embeddings.patch_embeddings.projection
    fan_in = 3 * 2 * 16 * 16
    assert conv.weight.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.03)
    assert conv.bias.abs().max().item() <= 1 / math.sqrt(fan_in) and conv.bias.abs().max() > 0
    assert model.config.layer_norm_eps == 1e-6  # the original's partial(nn.LayerNorm, eps=1e-6)
    assert model.videomae.encoder.layer[0].layernorm_before.eps == 1e-6


def _schedule(job: str, *overrides: str):
    cfg_cls = PretrainConfig if job == "pretrain" else FinetuneConfig
    cfg = config_lib.load(cfg_cls, None, ["scaling.num_workers=2", "train.batch_size=6", *overrides])
    return schedule_run(cfg, 1200)


@pytest.mark.parametrize("job", ["pretrain", "finetune"])
def test_learning_rates_scale_by_videos_not_clips(job):
    """run_class_finetuning.py / run_mae_pretraining.py: lr, min_lr and warmup_lr x total_batch_size / 256,
    where total_batch_size counts videos (each giving num_sample clips)."""
    lr = ["optim.base_lr=1e-3", "optim.min_lr=1e-6", "optim.warmup_lr=1e-8"]
    one = _schedule(job, "data.clips_per_video=1", *lr)
    two = _schedule(job, "data.clips_per_video=2", *lr)
    assert one.global_batch == two.global_batch == 12  # clips per step
    assert one.peak_lr == pytest.approx(1e-3 * 12 / 256)
    assert two.peak_lr == pytest.approx(1e-3 * 6 / 256)  # 12 clips of 2 per video = 6 videos
    assert two.min_lr == pytest.approx(1e-6 * 6 / 256) and two.warmup_lr == pytest.approx(1e-8 * 6 / 256)
    absolute = _schedule(job, "data.clips_per_video=2", "optim.lr=0.01", "optim.min_lr=1e-5")
    assert (absolute.peak_lr, absolute.min_lr) == (0.01, 1e-5)  # an absolute LR is not scaled


def test_warmup_starts_at_zero_like_the_originals_schedule():
    """utils.cosine_scheduler is called without start_warmup_value: the warmup rises from 0."""
    schedule = _schedule("pretrain")
    assert schedule.warmup_lr == 0.0
    assert lr_at(0, 100, 10, 1e-3, schedule.min_lr, schedule.warmup_lr) == 0.0


def test_dual_masking_loss_counts_only_tokens_hidden_from_the_encoder():
    """VideoMAEv2 engine_for_pretraining.py: ``cal_loss_mask = bool_masked_pos[~decode_masked_pos]``; the
    decoder's outputs at positions the encoder saw get no weight."""
    config = VideoMAEConfig.from_preset("tiny", decoder_mask_ratio=0.5)
    model = VideoMAEForPreTraining(config).eval()
    rng = np.random.default_rng(0)
    x = torch.randn(2, *_shape(config))
    enc = torch.from_numpy(np.stack([tube_mask(config.grid, 0.75, rng) for _ in range(2)]))
    dec = torch.from_numpy(np.stack([running_cell_mask(config.grid, 0.5, rng) for _ in range(2)]))
    out = model(x, enc, decoder_bool_masked_pos=dec)
    kept = (~dec).nonzero()[:, 1].view(2, -1)  # decoder-kept positions, ascending
    assert (~torch.gather(enc, 1, kept)).any()  # some of them the encoder saw
    from pipeline.models.videomae.modeling import gather_tokens, patchify

    target = model.reconstruction_target(gather_tokens(patchify(x, 2, 8), kept))
    per_token = (out.logits - target).pow(2).mean(-1)
    weight = torch.gather(enc, 1, kept).float()
    torch.testing.assert_close(out.loss, (per_token * weight).sum() / weight.sum())
    assert not torch.isclose(out.loss, F.mse_loss(out.logits, target))


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 16),
    micro=st.integers(1, 12),
    workers=st.integers(1, 8),
    clips=st.integers(0, 5000),
)
def test_a_global_batch_size_fixes_the_step_whatever_the_worker_count(batch, micro, workers, clips):
    """train.global_batch_size: every worker count that can take one micro-batch each gets the same global
    batch, LRs and warmup, and an epoch of whole global batches that fit the data (what is learned must not
    hinge on scaling.num_workers)."""
    fixed = ["optim.base_lr=1e-3", "optim.warmup_steps=7", f"train.batch_size={batch}",
             f"train.global_batch_size={batch * micro}", "train.max_steps=100"]
    cfg = config_lib.load(PretrainConfig, None, [f"scaling.num_workers={workers}", *fixed])
    global_batch = batch * micro
    if micro < workers:
        with pytest.raises(ConfigError, match="fewer than scaling.num_workers"):
            schedule_run(cfg, clips)
        return
    if clips // global_batch < 3:  # the bound below is loose by 2 steps; too few clips are refused anyway
        assume(False)
    one = schedule_run(config_lib.load(PretrainConfig, None, ["scaling.num_workers=1", *fixed]), clips)
    many = schedule_run(cfg, clips)
    assert one.global_batch == many.global_batch == global_batch
    assert (one.peak_lr, one.min_lr, one.warmup_lr, one.warmup_steps) == (
        many.peak_lr, many.min_lr, many.warmup_lr, many.warmup_steps)
    for schedule in (one, many):  # Ray's equal split and whole micro-batches lose at most a few clips
        assert clips // global_batch - 2 <= schedule.steps_per_epoch <= clips // global_batch


def test_a_global_batch_size_is_whole_micro_batches_and_excludes_grad_accum():
    with pytest.raises(ConfigError, match="multiple of train.batch_size"):
        config_lib.load(PretrainConfig, None, ["train.batch_size=8", "train.global_batch_size=12"])
    with pytest.raises(ConfigError, match="not both"):
        config_lib.load(PretrainConfig, None, ["train.global_batch_size=32", "train.grad_accum_steps=2"])
