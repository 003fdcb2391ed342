"""The mixing methods by name, and what each needs: torch-free, so the driver and the CPU
tasks can check a configuration without loading torch (stages.mixing.masks does the tensor work)."""
from __future__ import annotations

METHODS = ("mergemix", "mergemix-official", "mergemix-r", "topk", "random", "mixup", "cutmix", "resizemix", "blur")
LAM_MODES = ("area", "paper", "fixed")
# Methods whose mask needs the encoder output (saliency, token scores or the source map).
NEEDS_SALIENCY = frozenset({"mergemix", "mergemix-official", "mergemix-r", "topk", "blur"})
# Methods whose loser is x_i on the mask's patches and the partner x_j elsewhere: mask and
# partner index determine it exactly (the rest blend, blur or resample pixels).
PATCH_SELECT = frozenset(METHODS) - {"mixup", "resizemix", "blur"}

RESIZEMIX_SCOPE = (0.1, 0.8)  # resizemix: range of tau, the pasted box's side over the image's (area tau^2), as ResizeMix
# blur: Gaussian sigma in patch sides (7 px for ViT-L/14, 8 px for /16). Its response exp(-2 pi^2
# sigma^2 f^2) keeps 0.7% of detail that repeats once per patch (what one token resolves) and 73% of
# structure four patches wide: the blurred region loses its detail but keeps layout and colour.
BLUR_SIGMA_PATCHES = 0.5
