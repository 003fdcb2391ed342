"""Pillow's resize, reproduced exactly in torch: its fixed-point weights (computed here as
libImaging/Resample.c computes them) applied as a float64 matrix product, whose integer sums are exact
in any order, so every CPU kernel and every GPU gives Pillow's pixels. torch's own antialiased
interpolate uses the same kernels in float and drifts up to 6 levels from Pillow at sharp edges. Used
by the torch image path (stages.imaging.device) and by resizemix (stages.mixing.masks)."""
from __future__ import annotations

import functools

import numpy as np
import torch


PRECISION_BITS = 22  # Pillow resamples 8-bit images in fixed point with 22 fractional bits
SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}


def _kernel(x: np.ndarray, interpolation: str) -> np.ndarray:
    """Pillow's filters, operation for operation (bicubic: Keys, a = -0.5)."""
    x = np.abs(x)
    if interpolation == "bilinear":
        return np.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=256)
def _weights(in_size: int, out_size: int, interpolation: str, first: int = 0, count: int | None = None) -> np.ndarray:
    """(in_size, count) matrix of Pillow's integer weights (times 2^22) for outputs first..first+count
    of resizing one axis from in_size to out_size: its windows (the support widened by the scale
    when shrinking, clipped at the border), each normalised to sum 1 and rounded to fixed point as
    Pillow rounds them, so that the same sums of integers give Pillow's values exactly
    (libImaging/Resample.c, precompute_coeffs and normalize_coeffs_8bpc, in numpy float64)."""
    count = out_size - first if count is None else count
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = SUPPORT[interpolation] * filterscale
    center = (np.arange(first, first + count) + 0.5) * scale
    lo = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)  # C's cast truncates
    n = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - lo
    taps = np.arange(int(np.ceil(support)) * 2 + 1)
    valid = taps < n[:, None]
    index = lo[:, None] + taps
    w = np.where(valid, _kernel((index - center[:, None] + 0.5) * (1.0 / filterscale), interpolation), 0.0)
    total = np.cumsum(w, axis=1)[:, -1:]  # summed in order, as Pillow does (np.sum pairs: other last bits)
    w = np.divide(w, total, out=w.copy(), where=total != 0.0)
    fixed = np.trunc(w * (1 << PRECISION_BITS) + np.where(w < 0, -0.5, 0.5))
    weights = np.zeros((in_size, count))
    cols = np.broadcast_to(np.arange(count)[:, None], valid.shape)
    weights[index[valid], cols[valid]] = fixed[valid]
    return weights


@functools.lru_cache(maxsize=128)
def _device_weights(in_size: int, out_size: int, interpolation: str, first: int, count: int,
                    device: str) -> torch.Tensor:
    return torch.from_numpy(_weights(in_size, out_size, interpolation, first, count)).to(device)


def _resample_last(x: torch.Tensor, out_size: int, interpolation: str, first: int, count: int) -> torch.Tensor:
    """One pass of Pillow's resampling along the last axis of float64 images holding uint8 values,
    outputs first..first+count. The products and sums are integers below 2^32, exact in float64 in
    any order (so a GPU matmul gives them too); then round half up and clip, as Pillow's clip8."""
    weights = _device_weights(x.shape[-1], out_size, interpolation, first, count, str(x.device))
    return torch.floor_((x @ weights).add_(1 << (PRECISION_BITS - 1)).div_(1 << PRECISION_BITS)).clamp_(0, 255)


def resample(x: torch.Tensor, size: tuple[int, int], interpolation: str = "bicubic",
             crop: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Pillow's resize of (n, 3, h, w) images (uint8 values, any dtype) to `size` = (H, W): float64
    with uint8 values out, equal to Image.resize's. Horizontal pass first, rounded to uint8, then
    vertical, each skipped when its side keeps its length, as Pillow does. `crop` = (top, left,
    height, width) computes only that part: a crop of the resized image, at a crop's cost."""
    if interpolation not in SUPPORT:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose one of {', '.join(SUPPORT)}")
    out_h, out_w = size
    top, left, height, width = crop or (0, 0, out_h, out_w)
    y = x.double()
    if out_w != y.shape[-1]:
        y = _resample_last(y, out_w, interpolation, left, width)
    else:
        y = y[..., left : left + width]
    if out_h != y.shape[-2]:
        y = _resample_last(y.transpose(-1, -2), out_h, interpolation, top, height).transpose(-1, -2)
    else:
        y = y[..., top : top + height, :]
    return y
