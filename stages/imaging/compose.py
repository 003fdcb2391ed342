"""The loser of a patch-selection method, composed from two images and a grid mask, in numpy.

This is the one loser composer: the write task builds each loser here from the prepared
pixels it already holds (the encoder actor ships masks, not images), and preview and the
tests use it too. A loser that is not a selection of two unit images (mixup's blend,
resizemix's resized paste, blur) is made by the actor (stages.mixing.masks) and shipped as pixels.
Numpy only: the write task never imports torch.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from stages.units import UnitDecisions


@dataclass
class PairImages:
    """Pixels of one pair, as uint8 arrays."""

    winner: np.ndarray | None  # H x W x 3, exactly the pixels the encoder saw (None when `encoded`)
    loser: np.ndarray | None  # H x W x 3, the mixed image (None when `encoded`)
    mask: np.ndarray  # gh x gw, 255 = patch from the winner, 0 = from the partner (mixup: round(255 * lam) everywhere)
    encoded: tuple[bytes, bytes] | None = None  # (winner, loser) JPEGs the encoder actor made (--device-encode)


def compose_loser(winner: np.ndarray, partner: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The partner's pixels, with the winner's on the patches where `mask` (gh, gw) is non-zero:
    exactly M * x_i + (1 - M) * x_j for a binary M, since it only selects uint8 values."""
    (h, w, c), (gh, gw) = winner.shape, mask.shape
    if partner.shape != winner.shape or h % gh or w % gw:
        raise ValueError(f"winner {winner.shape}, partner {partner.shape} and mask {mask.shape} do not fit")
    ph, pw = h // gh, w // gw
    loser = partner.copy()
    rows, cols = np.nonzero(mask)
    # (gh, ph, gw, pw*c) views: patch (r, c) is [r, :, c]; one fancy-indexed copy moves every kept patch.
    loser.reshape(gh, ph, gw, pw * c)[rows, :, cols] = winner.reshape(gh, ph, gw, pw * c)[rows, :, cols]
    return loser


def upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """A grid-level array (mask, heat map; any trailing channels) at pixel level, each cell a
    block (nearest neighbour)."""
    gh, gw = grid.shape[:2]
    return grid[np.arange(height) * gh // height][:, np.arange(width) * gw // width]


def pair_images(keys: list[str], masks: np.ndarray, partners: np.ndarray, winners: np.ndarray,
                losers: np.ndarray | None = None,
                encoded: list[tuple[bytes, bytes]] | None = None) -> Mapping[str, PairImages]:
    """Key -> the pair's pixels. `keys`, `masks`, `partners` (and `losers`) run over a unit's
    ok samples in order; `winners` are the unit's prepared pixels, in the same order. A loser
    is composed when its pair is looked up, so a writer holds one at a time. With `encoded`
    (the actor's JPEGs, in the same order) the pairs carry those bytes instead of pixels."""
    return _UnitImages(keys, masks, partners, winners, losers, encoded)


def decided_pairs(decided: UnitDecisions, prepared_pixels: np.ndarray) -> Mapping[str, PairImages]:
    """A unit's pairs as the encoder actor decided them: the prepared unit's pixels are the winners
    on the pil path; on the torch path, the actor's own winners (or its JPEG bytes)."""
    winners = prepared_pixels if decided.winners is None else decided.winners
    return pair_images(decided.ok_keys, decided.masks, decided.partners, winners, decided.losers, decided.encoded)


class _UnitImages(Mapping):
    def __init__(self, keys, masks, partners, winners, losers, encoded=None):
        images = len(encoded) if encoded is not None else len(winners)
        if not len(keys) == len(masks) == len(partners) <= images:
            raise ValueError(f"{len(keys)} ok rows, {len(masks)} masks, {len(partners)} partners and "
                             f"{images} images do not match")
        self.masks, self.partners, self.winners, self.losers, self.encoded = masks, partners, winners, losers, encoded
        self.index = {k: i for i, k in enumerate(keys)}

    def __getitem__(self, key: str) -> PairImages:
        i = self.index[key]
        if self.encoded is not None:
            return PairImages(None, None, self.masks[i], self.encoded[i])
        winner, mask = self.winners[i], self.masks[i]
        if self.losers is not None:
            return PairImages(winner, self.losers[i], mask)
        return PairImages(winner, compose_loser(winner, self.winners[int(self.partners[i])], mask), mask)

    def __contains__(self, key) -> bool:  # without composing the loser, as Mapping's default would
        return key in self.index

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)
