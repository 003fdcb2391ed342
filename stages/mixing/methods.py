"""The mixing methods by name, and what each needs: torch-free, so the driver and the CPU
tasks can check a configuration without loading torch (stages.mixing.masks does the tensor work)."""
from __future__ import annotations

from schemas.shard import IMAGE_NEGATIVES

# MergeMix, its ablation baselines (METHOD.md 4), then the image-side negatives of other
# published methods (4b: stages.mixing.negatives), which run no tower.
MIX_METHODS = ("mergemix", "mergemix-official", "mergemix-r", "topk", "random", "mixup", "cutmix", "resizemix", "blur")
METHODS = MIX_METHODS + IMAGE_NEGATIVES
LAM_MODES = ("area", "paper", "fixed")
# Methods whose mask needs the encoder output (saliency, token scores or the source map).
NEEDS_SALIENCY = frozenset({"mergemix", "mergemix-official", "mergemix-r", "topk", "blur"})
# Methods whose loser is x_i on the mask's patches and the partner x_j elsewhere: mask and
# partner index determine it exactly (the rest blend, blur, resample or corrupt pixels).
PATCH_SELECT = frozenset(MIX_METHODS) - {"mixup", "resizemix", "blur"}
# The negatives' knobs (generate's flags) and the methods each shapes.
NEGATIVE_KNOBS = {"crop_area": {"crop"}, "noise_step": {"noise"}, "noise_space": {"noise"}, "pixelate": {"pixelate"},
                  "blur_radius": {"image-blur"}, "rotate_degrees": {"rotate"}}

RESIZEMIX_SCOPE = (0.1, 0.8)  # resizemix: range of tau, the pasted box's side over the image's (area tau^2), as ResizeMix
# blur: Gaussian sigma in patch sides (7 px for ViT-L/14, 8 px for /16). Its response exp(-2 pi^2
# sigma^2 f^2) keeps 0.7% of detail that repeats once per patch (what one token resolves) and 73% of
# structure four patches wide: the blurred region loses its detail but keeps layout and colour.
BLUR_SIGMA_PATCHES = 0.5
