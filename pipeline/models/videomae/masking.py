"""Token masks for VideoMAE, made on the data workers as a few hundred bools per clip.

Token order follows the patch embedding's ``Conv3d(...).flatten(2)``: index = t * (h * w) + y * w + x on
the token grid ``(t, h, w)`` of ``token_grid`` (frames // tubelet, size // patch, size // patch).
``True`` means masked (hidden from the encoder), as transformers' ``bool_masked_pos``.
"""

from __future__ import annotations

import numpy as np

Grid = tuple[int, int, int]
STRATEGIES = ("tube", "random")


def token_grid(num_frames: int, image_size: int, patch_size: int, tubelet_size: int) -> Grid:
    return num_frames // tubelet_size, image_size // patch_size, image_size // patch_size


def tube_mask(grid: Grid, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """The same spatial pattern in every time slice: exactly ``int(ratio * h * w)`` masked per slice.

    A masked patch stays masked across time, so the model cannot copy it from a neighbouring frame.
    """
    t, h, w = grid
    per_frame = h * w
    num_masked = int(ratio * per_frame)
    frame = np.zeros(per_frame, dtype=bool)
    frame[rng.permutation(per_frame)[:num_masked]] = True
    return np.tile(frame, t)


def random_mask(grid: Grid, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """``int(ratio * N)`` tokens masked uniformly over space and time (the ablation in the paper)."""
    n = grid[0] * grid[1] * grid[2]
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[: int(ratio * n)]] = True
    return mask


def running_cell_mask(grid: Grid, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """VideoMAE V2 decoder masking: in each 2x2 spatial cell ``int(4 * ratio)`` positions are dropped (V2's
    ``RunningCellMaskingGenerator``: 0.5 drops 2, 0.7 drops 2, 0.9 drops 3), and the dropped positions
    rotate by one each time slice, so every position is reconstructed in turn.

    Returns True for tokens the decoder does *not* reconstruct. Same count in every sample.
    """
    t, h, w = grid
    dropped = int(4 * ratio)
    if not 0 < dropped < 4:
        raise ValueError(f"decoder mask ratio must lie in [0.25, 1) (1 to 3 of each 2x2 cell), got {ratio}")
    if h % 2 or w % 2:
        raise ValueError(f"running-cell masking needs an even token grid, got {h}x{w}")
    base = np.array([True] * dropped + [False] * (4 - dropped))
    start = int(rng.integers(4))
    slices = []
    for ti in range(t):
        cell = np.roll(base, start + ti).reshape(2, 2)  # (2, 2) pattern for this time slice
        slices.append(np.tile(cell, (h // 2, w // 2)).reshape(-1))
    return np.concatenate(slices)


def make_mask(strategy: str, grid: Grid, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Encoder mask by name; ``ratio`` must lie in (0, 1)."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must lie in (0, 1), got {ratio}")
    if strategy == "tube":
        return tube_mask(grid, ratio, rng)
    if strategy == "random":
        return random_mask(grid, ratio, rng)
    raise ValueError(f"unknown mask strategy {strategy!r}; choose one of {STRATEGIES}")
