"""`saliency-check`: a label-free measure of how well a tower's CLS attention finds what its own
image embedding rests on, block by block, on the user's own images.

For each attention block l (the merged encoder, schedule and settings `generate` would use with
`--attn-layer l`), each image is cut in two by its saliency: its top floor(lam * L) patches, and the
rest; each part alone (the other filled with the tower's pad colour) is embedded by the plain tower,
as a VLM reads it. The block's score is how much more of the whole image's embedding (cosine) the
salient part keeps than the rest does; `random` is the same contrast for as many patches drawn at
random (seeded per image). A block whose saliency finds what the embedding rests on scores well
above random; the largest score is the recommended block, and a tower whose best score is under
`random + NO_BETTER` is flagged: random weights, a wrong mean/std or a wrong activation give
attention that is noise for the embedding.

Why both parts. Keeping the salient part alone rewards a block that keeps whatever reconstructs the
picture (edges and clutter as much as the object): on the scenes with known object masks the first
block, the worst at finding the object (AUC 0.72 against 0.90-0.94), kept the most. Removing it
shows what the embedding needs; the contrast of the two measures both (bench/saliency.py compares
them with the AUC per block).

Runs on one device in the calling process: `generate --attn-layer auto` runs it in a Ray task with an
encoder actor's resources, on a sample of the input, before any unit starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from stages.errors import UserError
from stages.imaging.decode import load_pixels
from stages.inputs.files import close_handles, load_image_bytes
from stages.inputs.kinds import default_image_root, detect_kind, list_input, read_slice
from stages.inputs.records import InputError
from stages.mixing.masks import topk_patch_mask, upsample_mask
from stages.mixing.ratios import sample_rng
from stages.model.encoder import MergingEncoder
from stages.tome.schedule import largest_merge

NO_BETTER = 0.05  # a best score under random + this (a cosine contrast) is no better than random patches
BATCH = 32


@dataclass
class BlockScore:
    layer: int
    merge: int  # R used at this block: the one asked for, or the largest its earlier blocks allow
    score: float  # mean cosine to the whole image's embedding of its top-lam part, minus that of the rest
    random: float  # the same contrast for as many random patches

    @property
    def gap(self) -> float:
        return self.score - self.random


@dataclass
class CheckResult:
    layers: list[BlockScore]
    images: int
    lam: float
    recommended: int = field(init=False)
    no_better_than_random: bool = field(init=False)

    def __post_init__(self):
        best = max(self.layers, key=lambda b: b.gap)
        self.recommended, self.no_better_than_random = best.layer, best.gap < NO_BETTER

    def to_json(self) -> dict:
        return {"layers": [{"layer": b.layer, "merge": b.merge, "score": b.score, "random": b.random}
                           for b in self.layers],
                "recommended": self.recommended, "no_better_than_random": self.no_better_than_random,
                "images": self.images, "lam": self.lam}

    def table(self) -> str:
        ranks = {b.layer: i + 1 for i, b in enumerate(sorted(self.layers, key=lambda b: -b.gap))}
        lines = [f"{'block':>5}  {'R':>4}  {'score':>7}  {'random':>7}  {'gap':>7}  rank"]
        lines += [f"{b.layer:>5}  {b.merge:>4}  {b.score:>7.4f}  {b.random:>7.4f}  {b.gap:>7.4f}  {ranks[b.layer]:>4}"
                  for b in self.layers]
        lines.append(f"recommended block: {self.recommended} (--attn-layer {self.recommended}), "
                     f"{self.images} images, lam {self.lam:g}")
        if self.no_better_than_random:
            lines.append(f"warning: this tower's saliency is no better than random patches (best gap "
                         f"{max(b.gap for b in self.layers):.4f} < {NO_BETTER}): random weights, or a wrong --mean/--std "
                         "or activation (--quick-gelu) for these weights?")
        return "\n".join(lines)


def sample_images(source: str, image_root: str | None, n: int, tower, resize: str = "pad", folder_labels: bool = False,
                  storage_options: dict | None = None) -> np.ndarray:
    """The first `n` images of an input that decode, fitted as `generate` fits them: (n', H, W, 3) uint8."""
    kind = detect_kind(source, storage_options)
    root = image_root or default_image_root(source, kind)
    listing = list_input(source, max(1, n), folder_labels=folder_labels, storage_options=storage_options)
    images, handles = [], {}
    try:
        for s in listing.slices:
            for record in read_slice(s, storage_options):
                if record.image is None or record.error:
                    continue
                try:
                    data = load_image_bytes(record.image, root, handles, storage_options)
                    images.append(load_pixels(data, tower.image_size, resize, tower.pad_rgb, tower.interpolation)[0])
                except InputError:
                    continue
                if len(images) == n:
                    return np.stack(images)
    finally:
        close_handles(handles)
    if not images:
        raise UserError(f"{source} holds no image that decodes: nothing to check the tower on")
    return np.stack(images)


def check_tower(base: MergingEncoder, pixels: np.ndarray, *, merge: int, lam: float = 0.3, seed: int = 0,
                prop_attn: bool = False, schedule: str = "constant") -> CheckResult:
    """Score every block of `base`'s tower (an encoder without merging: its embeddings are the plain
    tower's) on `pixels` (uint8 at its geometry); see the module docstring."""
    if not 0 < lam < 1:
        raise UserError(f"--lam must be in (0, 1), got {lam}")
    fill = torch.tensor(base.tower.pad_rgb if base.tower is not None else (0, 0, 0), dtype=torch.uint8)
    pixels_t = torch.from_numpy(pixels)
    n, depth = len(pixels_t), len(base.blocks)
    whole = _embed(base, pixels_t)
    rand = torch.from_numpy(np.stack([sample_rng(seed, f"{i:06d}", "saliency-check").random(base.num_patches)
                                      for i in range(n)]))
    lams = torch.full((n,), float(lam), dtype=torch.float64)
    random_score = _contrast(base, pixels_t, whole, topk_patch_mask(rand, lams), fill)
    scores = []
    for layer in range(depth):
        r = min(merge, largest_merge(layer, base.num_patches + 1, schedule))
        enc = MergingEncoder(base.visual, r, layer, prop_attn, schedule, base.norm_mean, base.norm_std)
        enc.autocast_dtype, enc.tower = base.autocast_dtype, base.tower
        grid = torch.cat([enc.saliency_from_pixels(pixels_t[s:s + BATCH]).grid.flatten(1).cpu()
                          for s in range(0, n, BATCH)])
        score = _contrast(base, pixels_t, whole, topk_patch_mask(grid.double(), lams), fill)
        scores.append(BlockScore(layer, r, score, random_score))
    return CheckResult(scores, n, lam)


def _embed(encoder: MergingEncoder, pixels: torch.Tensor) -> torch.Tensor:
    out = [encoder.encode_pixels(pixels[s:s + BATCH]).cpu() for s in range(0, len(pixels), BATCH)]
    return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1)


def _contrast(base: MergingEncoder, pixels: torch.Tensor, whole: torch.Tensor, keep: torch.Tensor,
              fill: torch.Tensor) -> float:
    """Mean cosine to `whole` of the embeddings of `pixels` keeping only the `keep` patches, minus that
    keeping only the others (the rest filled with `fill`)."""
    mask = upsample_mask(keep.view(len(pixels), *base.grid), base.patch)[..., None]
    kept = (_embed(base, torch.where(mask, pixels, fill)) * whole).sum(dim=-1)
    rest = (_embed(base, torch.where(mask, fill, pixels)) * whole).sum(dim=-1)
    return float((kept - rest).mean())


def run_check(model: str, pretrained: str | None, *, source: str, image_root: str | None = None,
              folder_labels: bool = False, resize: str = "pad", storage_options: dict | None = None,
              quick_gelu: bool | None = None, mean=None, std=None, merge: int = 0, prop_attn: bool = False,
              schedule: str = "constant", n: int = 256, lam: float = 0.3, seed: int = 0, device: str = "auto",
              echo=print) -> CheckResult:
    """Load the tower (as `generate`'s actors do), take the first `n` images of `source` and score its
    blocks (check_tower). `echo` gets the tower's line."""
    from stages.model.factory import load_encoder

    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    base = load_encoder(model, pretrained, merge=0, attn_layer=-1, prop_attn=prop_attn, schedule=schedule,
                        device=device, precision="bf16", quick_gelu=quick_gelu, mean=mean, std=std,
                        storage_options=storage_options)
    echo(base.tower.summary())
    pixels = sample_images(source, image_root, n, base.tower, resize, folder_labels, storage_options)
    return check_tower(base, pixels, merge=merge, lam=lam, seed=seed, prop_attn=prop_attn, schedule=schedule)
