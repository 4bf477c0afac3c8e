"""Reconstruction pictures: patch layout inverse, masked view, de-normalised prediction, PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.models.videomae import VideoMAEConfig, VideoMAEForPreTraining
from pipeline.models.videomae.masking import make_mask
from pipeline.models.videomae.modeling import patchify
from pipeline.viz import reconstruct, save_reconstruction_png, unpatchify


def test_unpatchify_inverts_patchify():
    x = torch.randn(2, 4, 3, 32, 32)
    assert torch.equal(unpatchify(patchify(x, 2, 8), 4, 32, 2, 8), x)


def test_reconstruction_keeps_visible_pixels_and_greys_tubes(tmp_path):
    cfg = VideoMAEConfig.from_preset("tiny")
    model = VideoMAEForPreTraining(cfg)
    rng = np.random.default_rng(0)
    mask = torch.from_numpy(np.stack([make_mask("tube", cfg.grid, 0.75, rng) for _ in range(2)]))
    x = torch.randn(2, cfg.num_frames, 3, cfg.image_size, cfg.image_size)
    original, masked, recon = reconstruct(model, x, mask)
    assert original.shape == (2, 4, 32, 32, 3) and float(original.min()) >= 0 and float(original.max()) <= 1
    grey = (masked == 0.5).all(-1)  # (B, T, H, W)
    assert torch.equal(grey[:, 0], grey[:, -1])  # tube masking: the same patches hidden in every frame
    assert 0.6 < grey.float().mean() < 0.9
    visible = ~grey
    assert torch.equal(recon[visible], original[visible])  # visible patches are shown as they are
    assert model.training  # reconstruct() restores the mode
    png = save_reconstruction_png(tmp_path / "r.png", original, masked, recon, title="t")
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
