"""Reconstruction pictures: what the masked autoencoder sees and what it fills in.

One row group per clip: the original frames, the frames with the masked tubelets greyed out (what the
encoder sees), and the frames with the masked tubelets replaced by the decoder's prediction. With
``norm_pix_loss`` the decoder predicts per-tubelet normalised pixels, so its prediction is mapped back
with the true tubelet's mean and std (the picture shows structure, not absolute colour, as in the paper).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from pipeline.models.videomae.modeling import patchify


def unpatchify(tokens: Tensor, num_frames: int, image_size: int, tubelet_size: int, patch_size: int,
               channels: int = 3) -> Tensor:
    """Inverse of ``patchify``: (B, N, t*p*p*C) -> (B, T, C, H, W)."""
    b = tokens.shape[0]
    t, h = num_frames // tubelet_size, image_size // patch_size
    x = tokens.reshape(b, t, h, h, tubelet_size, patch_size, patch_size, channels)
    return x.permute(0, 1, 4, 7, 2, 5, 3, 6).reshape(b, num_frames, channels, image_size, image_size)


@torch.no_grad()
def reconstruct(model: torch.nn.Module, pixel_values: Tensor, bool_masked_pos: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
    """(original, masked, reconstructed) clips as (B, T, H, W, C) floats in [0, 1], RGB."""
    c = model.config
    was_training = model.training
    model.eval()
    try:
        out = model(pixel_values, bool_masked_pos, decoder_bool_masked_pos=~bool_masked_pos.bool())
    finally:
        model.train(was_training)
    mean = pixel_values.new_tensor(c.image_mean).view(1, 1, -1, 1, 1)  # the model's normalisation
    std = pixel_values.new_tensor(c.image_std).view(1, 1, -1, 1, 1)
    rgb = (pixel_values.float() * std + mean).clamp(0, 1)  # (B, T, C, H, W)
    patches = patchify(rgb, c.tubelet_size, c.patch_size).unflatten(-1, (-1, c.num_channels))  # (B, N, P, C)
    pred = out.logits.float().unflatten(-1, (-1, c.num_channels))  # (B, M, P, C)
    mask = bool_masked_pos.bool()
    target = patches[mask].reshape(pred.shape)  # masked tokens in ascending order, as the decoder's output
    if c.norm_pix_loss:
        pred = pred * (target.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6) + \
            target.mean(dim=-2, keepdim=True)
    filled = patches.clone()
    filled[mask] = pred.reshape(-1, *pred.shape[2:]).clamp(0, 1)
    greyed = patches.clone()
    greyed[mask] = 0.5

    def to_frames(tokens: Tensor) -> Tensor:
        video = unpatchify(tokens.flatten(-2), c.num_frames, c.image_size, c.tubelet_size, c.patch_size,
                           c.num_channels)
        return video.permute(0, 1, 3, 4, 2).cpu()  # (B, T, H, W, C)

    return to_frames(patches), to_frames(greyed), to_frames(filled)


def save_reconstruction_png(path: str | os.PathLike, original: Tensor, masked: Tensor, reconstructed: Tensor,
                            max_clips: int = 2, max_frames: int = 8, title: str = "") -> str:
    """Write the grid (rows: clip x {original, masked, reconstruction}; columns: frames) to ``path``."""
    # imported here, and without pyplot (no backend, no global figure state): every training worker
    # imports this module, and only rank 0 draws, every ``recon_every_steps``
    from matplotlib.figure import Figure

    clips = min(max_clips, original.shape[0])
    step = max(1, original.shape[1] // max_frames)
    frames = list(range(0, original.shape[1], step))[:max_frames]
    grid = []
    for i in range(clips):
        grid += [(f"clip {i}\noriginal", original[i]), ("masked", masked[i]),
                 ("reconstruction", reconstructed[i])]
    fig = Figure(figsize=(1.3 * len(frames), 1.3 * len(grid)))
    axes = fig.subplots(len(grid), len(frames), squeeze=False)
    for r, (label, video) in enumerate(grid):
        for col, f in enumerate(frames):
            ax = axes[r][col]
            ax.imshow(video[f].numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(label, fontsize=7)
            if r == 0:
                ax.set_title(f"frame {f}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return str(path)
