"""Building the merging encoder for a tower: its settings resolved (stages.model.tower), its weights
found (stages.model.weights), open_clip's model built with them, the vision tower wrapped in
stages.model.encoder.MergingEncoder. open_clip is imported when a tower is built."""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from stages.errors import UserError
from stages.model.constants import PRECISIONS
from stages.model.encoder import MergingEncoder
from stages.model.tower import Tower, resolve_tower
from stages.model.weights import resolve_pretrained

log = logging.getLogger(__name__)


def load_encoder(
    model: str = "ViT-L-14-336",
    pretrained: str | None = "openai",
    *,
    merge: int = 0,
    attn_layer: int = -2,
    prop_attn: bool = False,
    schedule: str = "constant",
    device="cpu",
    precision: str = "fp32",
    quick_gelu: bool | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    storage_options: dict | None = None,
) -> MergingEncoder:
    """Build the encoder. `model`: open_clip name, path to a model-config JSON, or
    hf-hub:ORG/REPO; `pretrained`: open_clip tag, local checkpoint path, None/"none" for
    random weights (for hf-hub: the model string itself for its repo's weights).

    The tower is the network open_clip builds for these weights with their settings applied
    (stages.model.tower): a tag's or hub repo's activation and mean/std; for a local checkpoint or
    random weights `quick_gelu`, `mean`, `std` say how it was trained (default: the configs)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    tower = resolve_tower(model, pretrained, quick_gelu=quick_gelu, mean=mean, std=std)
    checkpoint = resolve_pretrained(model, tower.weights, storage_options)
    if checkpoint is None:
        log.warning("RANDOM WEIGHTS: %s built with --pretrained none; saliency is meaningless for real data", model)
    clip = build_clip(tower, checkpoint)
    visual = clip.visual
    del clip  # the text tower is not needed
    encoder = MergingEncoder(visual, merge, attn_layer, prop_attn, schedule, tower.mean, tower.std)
    encoder.tower = tower
    encoder.to(device)
    if torch.device(device).type == "cuda" and precision != "fp32":
        encoder.autocast_dtype = getattr(torch, PRECISIONS[precision])
    return encoder


def build_clip(tower: Tower, checkpoint: str | None, device="cpu"):
    """open_clip's model for `tower`: its config, its activation, `checkpoint` (None: seeded
    random weights) and its mean/std/interpolation as the model's preprocess config.
    device="meta" builds the structure only, without allocating or initialising weights."""
    import open_clip

    settings = {"mean": tower.mean, "std": tower.std, "interpolation": tower.interpolation}
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)  # random weights are the same in every process: runs stay reproducible
        return open_clip.create_model(tower.name, pretrained=checkpoint, weights_only=True, device=device,
                                      force_preprocess_cfg=settings, quick_gelu=tower.quick_gelu)
