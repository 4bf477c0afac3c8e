"""Property tests of the token masks over many grids, ratios and seeds."""

import itertools

import numpy as np
import pytest

from pipeline.models.videomae.masking import make_mask, random_mask, running_cell_mask, token_grid, tube_mask

GRIDS = [(8, 14, 14), (2, 4, 4), (4, 6, 8), (1, 2, 2), (3, 5, 7)]
RATIOS = [0.05, 0.5, 0.75, 0.9, 0.95]


def test_token_grid_matches_the_patch_embedding():
    assert token_grid(16, 224, 16, 2) == (8, 14, 14)
    assert token_grid(4, 32, 8, 2) == (2, 4, 4)


@pytest.mark.parametrize("grid", GRIDS)
def test_tube_mask_counts_and_same_pattern_over_time(grid):
    t, h, w = grid
    for ratio, seed in itertools.product(RATIOS, range(5)):
        mask = tube_mask(grid, ratio, np.random.default_rng(seed))
        assert mask.dtype == bool and mask.shape == (t * h * w,)
        slices = mask.reshape(t, h * w)
        assert (slices.sum(1) == int(ratio * h * w)).all(), "exactly int(ratio * h * w) masked per time slice"
        assert (slices == slices[0]).all(), "a masked patch stays masked in every time slice"


def test_tube_mask_is_random_and_covers_every_position():
    grid = (8, 14, 14)
    masks = np.stack([tube_mask(grid, 0.9, np.random.default_rng(s)) for s in range(200)])
    assert len({m.tobytes() for m in masks}) == 200
    frame = masks[:, : 14 * 14]
    assert (~frame).any(0).all(), "every position is visible in some sample"
    # each position is visible about 10% of the time (binomial: 200 draws, p = 0.1 -> 3 sigma ~ 13)
    assert np.abs((~frame).sum(0) - 20).max() < 20


@pytest.mark.parametrize("grid", GRIDS)
def test_random_mask_counts(grid):
    n = grid[0] * grid[1] * grid[2]
    for ratio, seed in itertools.product(RATIOS, range(5)):
        mask = random_mask(grid, ratio, np.random.default_rng(seed))
        assert mask.shape == (n,) and mask.sum() == int(ratio * n)


@pytest.mark.parametrize("grid", [(8, 14, 14), (2, 4, 4), (4, 6, 8), (5, 2, 2)])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.7, 0.75, 0.9])
def test_running_cell_structure_and_coverage(grid, ratio):
    t, h, w = grid
    dropped = int(4 * ratio)  # VideoMAE V2's count: 0.7 drops 2 of 4 (reconstructs half), not 3
    for seed in range(4):
        mask = running_cell_mask(grid, ratio, np.random.default_rng(seed))
        assert mask.dtype == bool and mask.shape == (t * h * w,)
        cells = mask.reshape(t, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 2, 4).reshape(t, -1, 4)
        assert (cells.sum(-1) == dropped).all(), "the same number dropped in every 2x2 cell"
        assert (cells == cells[:, :1]).all(), "every cell of a time slice shares the pattern"
        for ti in range(t - 1):  # the pattern moves on by one position per time slice
            assert (np.roll(cells[ti, 0], 1) == cells[ti + 1, 0]).all()
        if t >= 4:  # within any 4 consecutive slices every position is reconstructed
            assert (~cells[:4]).any(0).all()
        assert mask.sum() == dropped * t * h * w // 4  # same count for every sample


def test_ratio_bounds_and_errors():
    rng = np.random.default_rng(0)
    for ratio in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="mask ratio must lie in"):
            make_mask("tube", (2, 4, 4), ratio, rng)
    with pytest.raises(ValueError, match="unknown mask strategy 'block'"):
        make_mask("block", (2, 4, 4), 0.5, rng)
    with pytest.raises(ValueError, match="even token grid"):
        running_cell_mask((2, 3, 4), 0.5, rng)
    for ratio in (0.0, 0.2, 1.0):  # no cell would drop a token, or every cell would drop all four
        with pytest.raises(ValueError, match=r"decoder mask ratio must lie in \[0.25, 1\)"):
            running_cell_mask((2, 4, 4), ratio, rng)
    assert make_mask("random", (2, 4, 4), 0.5, rng).sum() == 16
