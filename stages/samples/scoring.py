"""How well a patch-grid map (saliency, a kept-patch mask) matches a scene's object mask.

A patch counts as object when at least half of its pixels are object pixels. Torch-free.
"""
from __future__ import annotations

import numpy as np


def object_patches(mask: np.ndarray, patch: int) -> np.ndarray:
    """(H, W) bool pixel mask -> (H/patch, W/patch) bool: patches with >= half their pixels object."""
    h, w = mask.shape
    if h % patch or w % patch:
        raise ValueError(f"mask of {h}x{w} pixels is not a whole number of {patch}-pixel patches")
    share = mask.reshape(h // patch, patch, w // patch, patch).mean(axis=(1, 3))
    return share >= 0.5


def auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Probability that a random positive scores above a random negative (ties count half):
    the area under the ROC curve. None when either class is empty."""
    scores, positive = np.asarray(scores, np.float64).ravel(), np.asarray(positive, bool).ravel()
    pos, neg = scores[positive], scores[~positive]
    if pos.size == 0 or neg.size == 0:
        return None
    # Every pair: a grid has tens to hundreds of patches, so this is small and exact.
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def kept_share(kept: np.ndarray, positive: np.ndarray) -> float | None:
    """Share of the object patches that `kept` (bool grid) keeps; None without object patches."""
    positive = np.asarray(positive, bool)
    if not positive.any():
        return None
    return float(np.asarray(kept, bool)[positive].mean())
