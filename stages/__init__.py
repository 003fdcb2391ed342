"""The steps of the pipeline, one sub-package per job (see the README's Layout). This package is also
the library's one import surface: the names below load their module on first use, so importing
`stages` (or any sub-module) stays light.

    from stages import load_encoder, make_losers, sample_lams, derangement, parse_lam_spec, compose_loser
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "load_encoder": "stages.model.factory", "MergingEncoder": "stages.model.encoder", "Saliency": "stages.model.encoder",
    "resolve_tower": "stages.model.tower", "Tower": "stages.model.tower",
    "make_losers": "stages.mixing.masks", "MixResult": "stages.mixing.masks", "topk_patch_mask": "stages.mixing.masks",
    "recover_scores": "stages.mixing.masks", "mix_pixels": "stages.mixing.masks", "upsample_mask": "stages.mixing.masks",
    "sample_lams": "stages.mixing.ratios", "derangement": "stages.mixing.ratios", "parse_lam_spec": "stages.mixing.ratios",
    "lam_hats": "stages.mixing.ratios", "sample_rng": "stages.mixing.ratios",
    "METHODS": "stages.mixing.methods", "PATCH_SELECT": "stages.mixing.methods",
    "compose_loser": "stages.imaging.compose", "load_pixels": "stages.imaging.decode",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stages' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value
