"""stages.imaging.compose: the one patch-selection loser composer (numpy), bit for bit the formula
M * x_i + (1 - M) * x_j, and the key -> pair mapping the write task reads."""
from __future__ import annotations

import numpy as np
import pytest

from stages.imaging.compose import compose_loser, pair_images, upsample

H, W, PATCH = 32, 48, (8, 8)
GRID = (H // PATCH[0], W // PATCH[1])


def test_compose_loser_selects_whole_patches():
    winner = np.full((H, W, 3), 200, np.uint8)
    partner = np.full((H, W, 3), 10, np.uint8)
    mask = np.zeros(GRID, np.uint8)
    mask[1, 4] = 255
    loser = compose_loser(winner, partner, mask)
    expected = partner.copy()
    expected[PATCH[0] : 2 * PATCH[0], 4 * PATCH[1] : 5 * PATCH[1]] = 200
    assert np.array_equal(loser, expected) and np.array_equal(partner, np.full((H, W, 3), 10, np.uint8))
    assert np.array_equal(compose_loser(winner, partner, np.full(GRID, 255, np.uint8)), winner)
    with pytest.raises(ValueError, match="do not fit"):
        compose_loser(winner, partner[:-1], mask)


def test_compose_loser_is_the_formula_for_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        winner, partner = (rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(2))
        mask = np.where(rng.random(GRID) < 0.5, 255, 0).astype(np.uint8)
        m = upsample(mask == 255, H, W)[..., None].astype(np.int64)
        assert np.array_equal(compose_loser(winner, partner, mask), m * winner + (1 - m) * partner)


def test_upsample_is_nearest_per_patch():
    grid = np.arange(np.prod(GRID)).reshape(GRID)
    up = upsample(grid, H, W)
    assert up.shape == (H, W) and np.array_equal(up[:: PATCH[0], :: PATCH[1]], grid)
    assert np.array_equal(upsample(np.stack([grid] * 3, -1), H, W)[..., 2], up)  # channels follow


def test_pair_images_map_keys_to_composed_or_shipped_losers():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (4, H, W, 3), dtype=np.uint8)
    keys, partner = ["a", "b", "c", "d"], np.array([1, 2, 3, 0])
    masks = np.where(rng.random((4, *GRID)) < 0.5, 255, 0).astype(np.uint8)
    images = pair_images(keys, masks, partner, pixels)
    assert list(images) == keys and len(images) == 4 and "x" not in images
    third = images["c"]
    assert np.array_equal(third.winner, pixels[2]) and np.array_equal(third.mask, masks[2])
    assert np.array_equal(third.loser, compose_loser(pixels[2], pixels[3], masks[2]))
    shipped = np.zeros_like(pixels)  # mixup/resizemix/blur: the actor's losers pass through unchanged
    assert np.array_equal(pair_images(keys, masks, partner, pixels, shipped)["b"].loser, shipped[1])
    with pytest.raises(ValueError, match="do not match"):
        pair_images(keys, masks[:3], partner, pixels)
