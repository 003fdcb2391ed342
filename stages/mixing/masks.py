"""Masks, partners, mixing ratios and loser images for every mixing method.

Pure tensor code (torch + numpy): usable from any trainer, on CPU or CUDA tensors.

Mask convention. A mask lives on the encoder's patch grid (gh x gw, row-major, L = gh*gw
patches). M = 1 (stored as 255 in `MixResult.mask`) means "this patch comes from the
source image x_i", M = 0 means "from the partner x_j" (or, for `blur`, from the blurred
x_i). Pixel images are always at the encoder geometry, H = gh*ph and W = gw*pw, so the
grid mask is upsampled to pixels by plain nearest-neighbour repetition and each patch
maps onto exactly ph x pw pixels.

Why uint8 mixing is exact. For a binary mask, M*x_i + (1-M)*x_j just selects, pixel by
pixel, one of two uint8 values: no arithmetic happens, so nothing is rounded and the
stored loser is bit-for-bit the formula (see `mix_pixels`). Only `mixup` (a real-valued
blend), `resizemix` (the partner is resampled) and `blur` (the blurred image) compute new
values; those are rounded half-to-even once, in float64/float32, and clamped to [0, 255].

Determinism. Random masks, mergemix-r token scores and cutmix/resizemix boxes come from
generators seeded per sample (stages.mixing.ratios.sample_rng), so they do not depend on batch
composition, batch order or the number of workers.

The per-sample draws, partners and ratios are stages.mixing.ratios', the method names
stages.mixing.methods'.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stages.imaging.resample import resample
from stages.mixing.methods import BLUR_SIGMA_PATCHES, MIX_METHODS, RESIZEMIX_SCOPE
from stages.mixing.ratios import MixArgumentError, check_keys, sample_rng


# ----------------------------------------------------------------------------- masks


def _as_lam(lam, batch: int, device) -> Tensor:
    lam = torch.as_tensor(lam, dtype=torch.float64, device=device).reshape(-1)
    if lam.numel() != batch:
        raise ValueError(f"lam has {lam.numel()} values for a batch of {batch}")
    if not bool(torch.isfinite(lam).all()) or bool((lam < 0).any()) or bool((lam > 1).any()):
        raise ValueError("lam must be finite and in [0, 1]")
    return lam


def _check_scores(scores: Tensor, name: str) -> None:
    if not torch.is_tensor(scores) or scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"{name} must be a float tensor of shape (B, N)")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"empty batch: {name} has shape {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def _topk_rows(scores: Tensor, counts: Tensor) -> Tensor:
    """Bool mask with the `counts[b]` highest entries of each row; ties go to the lower index."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranks = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    return torch.zeros_like(scores, dtype=torch.bool).scatter(1, order, ranks < counts[:, None])


def topk_margin(scores: Tensor, counts: Tensor, sizes: Tensor | None = None) -> Tensor:
    """(B,) float64: how close each row's choice of its top `counts[b]` is to a tie, as the
    smallest gap between the boundary score and its neighbours over the boundary score. Scores
    within float noise of each other (~1e-6 relative) may rank the other way on another CPU
    kernel or device, and the mask with them; exact ties rank by index everywhere.

    `sizes[b, t]`: how many patches score t stands for (a merged token: its patches share the
    score and move together), so `counts` counts patches; None for one patch each. Where the
    boundary cuts through a token, both neighbours count. inf where nothing or everything is
    chosen. A diagnostic for tests and benchmarks, not on the hot path."""
    scores = scores.detach().double().cpu()
    sizes = torch.ones_like(scores) if sizes is None else sizes.detach().double().cpu()
    out = torch.full((scores.shape[0],), math.inf, dtype=torch.float64)
    for b in range(scores.shape[0]):
        order = torch.sort(scores[b], descending=True, stable=True).indices
        s, filled = scores[b, order], torch.cumsum(sizes[b, order], 0)
        k = float(counts[b])
        if k <= 0 or k >= float(filled[-1]):
            continue
        j = int(torch.searchsorted(filled, torch.tensor([k], dtype=torch.float64))[0])  # the token holding patch k
        gaps = [s[j] - s[j + 1]] if j + 1 < len(s) else []
        if float(filled[j]) > k and j > 0:  # the boundary splits token j: the one above may swap with it too
            gaps.append(s[j - 1] - s[j])
        if gaps:  # else one token holds every patch: nothing can swap
            out[b] = float(min(gaps)) / max(abs(float(s[j])), 1e-30)
    return out


def topk_patch_mask(scores: Tensor, lam: Tensor) -> Tensor:
    """(B, L) bool: the top floor(lam*L) patches of each row (kept area exactly floor(lam*L)/L)."""
    _check_scores(scores, "scores")
    lam = _as_lam(lam, scores.shape[0], scores.device)
    counts = torch.floor(lam * scores.shape[1]).long()
    return _topk_rows(scores, counts)


def _check_source(source: Tensor, batch: int, num_tokens: int | None) -> None:
    if not torch.is_tensor(source) or source.dim() != 2 or source.dtype not in (torch.int64, torch.int32):
        raise ValueError("source must be an integer tensor of shape (B, L)")
    if source.shape[0] != batch:
        raise ValueError(f"source has {source.shape[0]} rows for a batch of {batch}")
    if source.numel() and (int(source.min()) < 0 or (num_tokens is not None and int(source.max()) >= num_tokens)):
        raise ValueError(f"source indices must be in [0, {num_tokens})")


def recover_scores(token_scores: Tensor, source: Tensor) -> Tensor:
    """(B, L): every original patch takes the score of the merged token it belongs to."""
    _check_scores(token_scores, "token_scores")
    _check_source(source, token_scores.shape[0], token_scores.shape[1])
    return token_scores.gather(1, source.long())


def merged_topk_mask(token_scores: Tensor, source: Tensor, lam: Tensor) -> Tensor:
    """(B, L) bool, reference-code mode: the top int(K*lam) merged tokens, copied onto their patches."""
    _check_scores(token_scores, "token_scores")
    _check_source(source, token_scores.shape[0], token_scores.shape[1])
    lam = _as_lam(lam, token_scores.shape[0], token_scores.device)
    counts = torch.floor(lam * token_scores.shape[1]).long()
    return _topk_rows(token_scores, counts).gather(1, source.long())


def upsample_mask(mask: Tensor, patch: tuple[int, int]) -> Tensor:
    """(B, gh, gw) -> (B, gh*ph, gw*pw) by nearest neighbour: each patch covers ph x pw pixels."""
    if not torch.is_tensor(mask) or mask.dim() != 3:
        raise ValueError("mask must be a tensor of shape (B, gh, gw)")
    ph, pw = _pair(patch, "patch")
    return mask.repeat_interleave(ph, dim=1).repeat_interleave(pw, dim=2)


def _pair(value, name: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of positive integers, got {value!r}") from None
    if a <= 0 or b <= 0:
        raise ValueError(f"{name} must be a pair of positive integers, got {value!r}")
    return a, b


# ----------------------------------------------------------------------------- pixels

def _check_pixels(x: Tensor, name: str) -> None:
    if not torch.is_tensor(x) or x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"{name} must be a uint8 tensor of shape (B, H, W, C)")
    if x.shape[0] == 0:
        raise ValueError(f"empty batch: {name} has shape {tuple(x.shape)}")


def mix_pixels(x_i: Tensor, x_j: Tensor, pixel_mask: Tensor) -> Tensor:
    """Exactly M*x_i + (1-M)*x_j for a binary mask.

    Computed as x_j + (x_i - x_j) * M in uint8: the subtraction may wrap around, and the
    addition wraps it back, so with M in {0, 1} the result is exactly x_i or x_j (modular
    arithmetic). About 3x faster on CPU than torch.where with a broadcast mask."""
    _check_pixels(x_i, "x_i")
    _check_pixels(x_j, "x_j")
    if x_i.shape != x_j.shape:
        raise ValueError(f"x_i {tuple(x_i.shape)} and x_j {tuple(x_j.shape)} differ in shape")
    if not torch.is_tensor(pixel_mask) or pixel_mask.dtype != torch.bool or pixel_mask.shape != x_i.shape[:3]:
        raise ValueError(f"pixel_mask must be a bool tensor of shape {tuple(x_i.shape[:3])}")
    return x_j + (x_i - x_j) * pixel_mask[..., None].to(torch.uint8)


def _to_uint8(x: Tensor) -> Tensor:
    return torch.round(x).clamp_(0, 255).to(torch.uint8)


def gaussian_blur(pixels: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of uint8 (B, H, W, C) images (edge pixels replicated), uint8 out.
    In float64: a value lands within rounding noise of a .5 (where another CPU kernel or a GPU
    could round it the other way) about 1e-13 of the time, against 1e-4 in float32."""
    _check_pixels(pixels, "pixels")
    if not sigma > 0:
        raise ValueError(f"blur sigma must be > 0, got {sigma}")
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=pixels.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = pixels.shape[3]
    x = pixels.permute(0, 3, 1, 2).double()
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return _to_uint8(x.permute(0, 2, 3, 1))


@dataclass
class MixResult:
    """Loser images, grid masks, the exact fraction of each image taken from x_i, and lam."""

    loser: Tensor | None  # uint8 (B, H, W, 3) for mixup, resizemix, blur; None for PATCH_SELECT methods
    mask: Tensor  # uint8 (B, gh, gw): 255 = from x_i, 0 = from partner (mixup: round(lam*255) everywhere)
    kept: Tensor  # float64 (B,): fraction of the image from x_i (exact area; lam for mixup)
    lam: Tensor | None = None  # float64 (B,): the ratio each loser was made with, to record with it: the
    # given lam, except where the method's box decides it (cutmix, resizemix: the area kept, = kept)


def _random_grid_scores(keys: Sequence[str], seed: int, purpose: str, n: int, device) -> Tensor:
    scores = np.stack([sample_rng(seed, k, purpose).random(n) for k in keys])
    return torch.from_numpy(scores).to(device)


def _cutmix_box(rng: np.random.Generator, gh: int, gw: int, lam: float) -> tuple[int, int, int, int]:
    """CutMix's box: sides sqrt(1 - lam) of the image's (rounded to whole patches), centred on a
    patch drawn uniformly over the grid and clipped at the border, so boxes near the edge are
    cut and the area taken from the partner is at most 1 - lam (the row records the exact area)."""
    side = math.sqrt(1.0 - lam)
    bh, bw = round(gh * side), round(gw * side)
    top, left = int(rng.integers(0, gh)) - bh // 2, int(rng.integers(0, gw)) - bw // 2
    y0, y1, x0, x1 = max(0, top), min(gh, top + bh), max(0, left), min(gw, left + bw)
    return y0, x0, max(0, y1 - y0), max(0, x1 - x0)


def _resizemix_box(rng: np.random.Generator, gh: int, gw: int) -> tuple[int, int, int, int]:
    """ResizeMix's box: the partner shrunk by a side scale tau ~ U(0.1, 0.8), so its area is
    tau^2 (mean 0.243), pasted whole at a uniform position; sides rounded to whole patches."""
    tau = rng.uniform(*RESIZEMIX_SCOPE)
    bh, bw = max(1, round(gh * tau)), max(1, round(gw * tau))
    return int(rng.integers(0, gh - bh + 1)), int(rng.integers(0, gw - bw + 1)), bh, bw


def make_losers(method: str, pixels: Tensor, partner: Tensor, lam, *, grid: tuple[int, int],
                patch: tuple[int, int], keys: Sequence[str], seed: int, saliency: Tensor | None = None,
                token_scores: Tensor | None = None, source: Tensor | None = None) -> MixResult:
    """The mask of every sample with `method` (x_j = pixels[partner]), and its loser image where
    the loser is not a selection of x_i and x_j.

    mergemix / topk: top floor(lam*L) of `saliency` (topk passes an un-merged encoder's
    saliency; mergemix may instead pass token_scores + source, recovered here).
    mergemix-official: top int(K*lam) merged tokens copied onto their patches.
    mergemix-r: random score per merged token, recovered through `source`, top floor(lam*L).
    random: top floor(lam*L) of random patch scores. mixup: round(lam*x_i + (1-lam)*x_j).
    cutmix: a grid-aligned box of area ~(1-lam) from x_j, centred uniformly over the grid and clipped
    at the border; MixResult.lam is the area kept after clipping. resizemix: x_j resized (Pillow's bilinear,
    antialiased) into a grid-aligned box of side scale tau ~ U(0.1, 0.8) (area tau^2) at a
    uniform position; the given lam is not used, and MixResult.lam is 1 - the pasted area.
    blur: salient top floor(lam*L) patches kept, the rest replaced by a Gaussian blur of x_i
    itself (sigma BLUR_SIGMA_PATCHES = half the larger patch side); no partner pixels.

    For PATCH_SELECT methods the loser is x_i on the mask and x_j elsewhere, exactly; the one
    composer of those is stages.imaging.compose.compose_loser (numpy), run by whoever holds the pixels
    (`generate`'s write task), so MixResult.loser is None for them.
    """
    if method not in MIX_METHODS:
        raise MixArgumentError(f"unknown mixing method {method!r}: use one of {', '.join(MIX_METHODS)} "
                               "(the image-side negatives are stages.mixing.negatives')")
    _check_pixels(pixels, "pixels")
    b, h, w, c = pixels.shape
    gh, gw = _pair(grid, "grid")
    ph, pw = _pair(patch, "patch")
    if (h, w) != (gh * ph, gw * pw) or c != 3:
        raise ValueError(f"pixels must be (B, {gh * ph}, {gw * pw}, 3) for grid {gh}x{gw} and patch {ph}x{pw}, "
                         f"got {tuple(pixels.shape)}")
    keys = check_keys(keys, b)
    lam = _as_lam(lam, b, pixels.device)
    partner = torch.as_tensor(partner, device=pixels.device)
    if partner.shape != (b,) or partner.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"partner must be an integer tensor of shape ({b},)")
    if bool((partner < 0).any()) or bool((partner >= b).any()):
        raise ValueError(f"partner indices must be in [0, {b})")
    partner = partner.long()
    n_patches = gh * gw

    def need(t: Tensor | None, name: str) -> Tensor:
        if t is None:
            raise ValueError(f"method {method!r} needs {name}")
        return t.to(pixels.device)

    def grid_scores(t: Tensor, name: str) -> Tensor:
        if not torch.is_tensor(t) or t.shape != (b, n_patches):
            raise ValueError(f"{name} must have shape ({b}, {n_patches}) for grid {gh}x{gw}")
        return t

    if method == "mixup":
        x_j = pixels[partner]
        blend = lam[:, None, None, None] * pixels.double() + (1.0 - lam)[:, None, None, None] * x_j.double()
        level = _to_uint8(lam * 255.0).view(b, 1, 1).expand(b, gh, gw).contiguous()
        return MixResult(_to_uint8(blend), level, lam.clone(), lam.clone())

    extra = None  # pixels used where the mask is 0, when they are not the partner's own
    if method in ("mergemix", "topk", "blur"):
        if method == "mergemix" and saliency is None and token_scores is not None and source is not None:
            saliency = recover_scores(need(token_scores, "token_scores"), need(source, "source"))
        sal = grid_scores(need(saliency, "saliency"), "saliency")
        mask = topk_patch_mask(sal, lam)
        if method == "blur":
            extra = gaussian_blur(pixels, BLUR_SIGMA_PATCHES * max(ph, pw))
    elif method == "mergemix-official":
        ts, src = need(token_scores, "token_scores"), need(source, "source")
        grid_scores(src, "source")
        mask = merged_topk_mask(ts, src, lam)
    elif method == "mergemix-r":
        src = grid_scores(need(source, "source"), "source")
        _check_source(src, b, n_patches)  # K <= L, so drawing L scores covers every token
        token_rand = _random_grid_scores(keys, seed, "mergemix-r", n_patches, pixels.device)
        mask = topk_patch_mask(token_rand.gather(1, src.long()), lam)
    elif method == "random":
        mask = topk_patch_mask(_random_grid_scores(keys, seed, "random", n_patches, pixels.device), lam)
    else:  # cutmix / resizemix: grid-aligned boxes
        mask = torch.ones(b, n_patches, dtype=torch.bool, device=pixels.device)
        grid_mask = mask.view(b, gh, gw)
        if method == "resizemix":
            extra = pixels[partner]  # a gather: a new tensor, the boxes are pasted into it
        lam_cpu = lam.cpu().numpy()
        for i, key in enumerate(keys):
            rng = sample_rng(seed, key, method)
            if method == "cutmix":
                top, left, bh, bw = _cutmix_box(rng, gh, gw, float(lam_cpu[i]))
            else:
                top, left, bh, bw = _resizemix_box(rng, gh, gw)
            grid_mask[i, top:top + bh, left:left + bw] = False
            if method == "resizemix":
                # Pillow's bilinear resize, reproduced exactly (integer sums): the same pixels on any kernel or device.
                small = resample(pixels[partner[i]].permute(2, 0, 1)[None], (bh * ph, bw * pw), "bilinear")
                extra[i, top * ph:(top + bh) * ph, left * pw:(left + bw) * pw] = small[0].permute(1, 2, 0).to(torch.uint8)
    grid_mask = mask.view(b, gh, gw)
    kept = grid_mask.sum(dim=(1, 2)).double() / n_patches
    # Where a box decides the ratio, the lam to record is the one it made: 1 - the area taken from the
    # partner (cutmix: after clipping at the border, as CutMix adjusts lam; resizemix draws its own tau).
    lam = kept.clone() if method in ("cutmix", "resizemix") else lam.clone()
    if extra is None:
        return MixResult(None, grid_mask.to(torch.uint8) * 255, kept, lam)
    loser = mix_pixels(pixels, extra, upsample_mask(grid_mask, (ph, pw)))
    return MixResult(loser, grid_mask.to(torch.uint8) * 255, kept, lam)
