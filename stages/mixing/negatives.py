"""Image-contrast negatives of other published methods (docs/METHOD.md section 4b): the loser
is a corrupted copy of the winner (or, for `other`, the partner), with the same text.

Numpy and Pillow only (no torch): the CPU write tasks build these losers and must never
import torch. None of the methods needs an encoder forward.

Two steps per sample, both deterministic:

    params = draw(method, rng, height, width, settings)   # the per-sample draws, JSON-able
    neg = make(method, winner, partner, params)           # Negative(loser, lam, mask)

`rng` is the sample's own generator (`stages.ratios.sample_rng(seed, key, purpose)`), so the
draws depend only on (seed, key), never on batching or workers. `params` holds everything
`make` needs, including the noise seed and the settings a method reads (fill colour, mean/std),
so a recorded row rebuilds its loser with `make` alone, without the run's settings or rng.

Methods, their params, lam (the share of the winner the loser still carries) and mask:

method      params                                      lam                      mask (H x W uint8, 255 = winner)
crop        top, left, height, width, scale, fallback   box pixels / (H*W)       the box, on the winner's grid
noise       t, space, seed (+ mean, std if normalized)  abar_t                   None
pixelate    k                                           1 / k^2                  None
image-blur  radius                                      min(1, 1/(4 pi r^2))     None
rotate      angle, fill                                 mask.mean() / 255        the loser's pixels from the winner
blank       fill                                        0                        all 0
other       (none)                                      0                        all 0 (all from the partner)

Where the mask is None, every loser pixel depends on the winner only in part (a blend with
noise, or a mean over many pixels): no pixel comes from the winner whole and none from
elsewhere whole. The mask to store is then a uniform level, round(255 * lam) everywhere, the
rule `mixup` already follows (`pixel_mask` applies it). The masks here are pixel masks at the
image's geometry, not patch-grid masks.

The crop and rotate masks live on different grids on purpose. Every pixel of a crop loser comes
from the winner (zoomed), so a mask on the loser's grid would be all 255 and say nothing; the
box on the winner's grid says which part of the winner the loser shows, and its area is lam. A
rotate loser is winner pixels on the rotated frame and the fill elsewhere, so its mask, like the
patch masks of stages.mix, marks the loser pixels that come from the winner, and lam is their
share exactly.

`draw` consumes the rng (the pipeline would pass `sample_rng(seed, key, method)`); `make` draws
nothing: the noise's eps comes from the seed `draw` put in the params.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from schemas.shard import IMAGE_NEGATIVES
from stages.mixing.ratios import MixArgumentError
from stages.model.constants import OPENAI_MEAN, OPENAI_STD

NEGATIVE_METHODS = IMAGE_NEGATIVES  # the contract names them (schemas.shard)
NEEDS_PARTNER = frozenset({"other"})  # the only loser made from another sample's image
# JPEG's quantisation removes much of the per-pixel noise: store noise losers losslessly.
WANTS_LOSSLESS = frozenset({"noise"})
NOISE_SPACES = ("pixel", "normalized")
NOISE_STEPS = 1000
CROP_RATIO = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop's default aspect range, which mDPO keeps
CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop's tries before its centre-crop fallback


class NegativeArgumentError(MixArgumentError):
    """A bad setting or parameter of a negative method: a ValueError with one readable line
    (and a UserError, so the CLI prints it without a traceback)."""


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class NegativeSettings:
    """The knobs of every negative method, with METHOD 4b's defaults.

    crop_area: range of s, the crop box's area over the image's (mDPO: 0.01-0.20).
    noise_step: the diffusion step t, 0..999 (POVID, SeVa, CHiP: 500; SeVa also 800; BPO 900).
    noise_space: "pixel" (RGB in [0, 1], POVID) or "normalized" (the tower-normalised tensor,
        (x - mean) / std: SeVa, BPO, CHiP).
    pixelate: the block side k (Image-DPO: 16 or 32).
    blur_radius: Pillow's GaussianBlur radius, i.e. the Gaussian's standard deviation in pixels;
        a number (Image-DPO: 20), or a pair of integers (lo, hi) for a radius drawn per sample
        from U{lo..hi} (Image-DPO's variant: (20, 40)).
    rotate_degrees: range of the angle, counter-clockwise, drawn uniformly (CHiP: 10-80).
    mean, std: the tower's normalisation, RGB floats (OpenAI CLIP's by default).
    fill: the pad colour, uint8 RGB, for rotate's corners and blank; by default int(255 * mean)
        per channel, the colour LLaVA pads with (122, 116, 104 for OpenAI CLIP).
    """

    crop_area: tuple[float, float] = (0.01, 0.20)
    noise_step: int = 500
    noise_space: str = "pixel"
    pixelate: int = 16
    blur_radius: float | tuple[int, int] = 20.0
    rotate_degrees: tuple[float, float] = (10.0, 80.0)
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    fill: tuple[int, int, int] | None = None

    def __post_init__(self):
        # Lists (from YAML or JSON) become tuples, so settings stay hashable and compare equal.
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        lo, hi = _float_pair(self.crop_area, "crop_area")
        if not 0 < lo <= hi <= 1:
            raise NegativeArgumentError(f"crop_area must satisfy 0 < a <= b <= 1, got {lo:g},{hi:g}")
        put("crop_area", (lo, hi))
        put("noise_step", _check_step(self.noise_step))
        if self.noise_space not in NOISE_SPACES:
            raise NegativeArgumentError(f"noise_space must be pixel or normalized, got {self.noise_space!r}")
        if not _is_int(self.pixelate) or self.pixelate < 2:
            raise NegativeArgumentError(f"pixelate must be an integer block side >= 2, got {self.pixelate!r}")
        put("pixelate", int(self.pixelate))
        put("blur_radius", _check_blur_radius(self.blur_radius))
        lo, hi = _float_pair(self.rotate_degrees, "rotate_degrees")
        if not -360 <= lo <= hi <= 360:
            raise NegativeArgumentError(f"rotate_degrees must satisfy -360 <= a <= b <= 360, got {lo:g},{hi:g}")
        put("rotate_degrees", (lo, hi))
        put("mean", _check_mean(self.mean, "mean"))
        put("std", _check_std(self.std, "std"))
        fill = tuple(int(255 * m) for m in self.mean) if self.fill is None else self.fill
        put("fill", _check_fill(fill))


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _float_pair(value, name: str) -> tuple[float, float]:
    try:
        a, b = value
    except (TypeError, ValueError):
        raise NegativeArgumentError(f"{name} must be a pair of numbers, got {value!r}") from None
    if not (_is_number(a) and _is_number(b)):
        raise NegativeArgumentError(f"{name} must be a pair of finite numbers, got {value!r}")
    return float(a), float(b)


def _check_step(t) -> int:
    if not _is_int(t) or not 0 <= t < NOISE_STEPS:
        raise NegativeArgumentError(f"noise step must be an integer in 0..{NOISE_STEPS - 1}, got {t!r}")
    return int(t)


def _check_blur_radius(value) -> float | tuple[int, int]:
    if _is_number(value):
        if value <= 0:
            raise NegativeArgumentError(f"blur_radius must be > 0, got {value!r}")
        return float(value)
    try:
        lo, hi = value
    except (TypeError, ValueError):
        lo = hi = None
    if not (_is_int(lo) and _is_int(hi) and 0 < lo <= hi):
        raise NegativeArgumentError(f"blur_radius must be a number > 0 or integers lo,hi (0 < lo <= hi), got {value!r}")
    return int(lo), int(hi)


def _triple(value, name: str) -> tuple:
    try:
        values = tuple(value)
    except TypeError:
        values = ()
    if len(values) != 3:
        raise NegativeArgumentError(f"{name} must be three values (R, G, B), got {value!r}")
    return values


def _check_mean(value, name: str) -> tuple[float, float, float]:
    values = _triple(value, name)
    if not all(_is_number(v) and 0 <= v <= 1 for v in values):
        raise NegativeArgumentError(f"{name} must be three numbers in [0, 1], got {value!r}")
    return tuple(float(v) for v in values)


def _check_std(value, name: str) -> tuple[float, float, float]:
    values = _triple(value, name)
    if not all(_is_number(v) and v > 0 for v in values):
        raise NegativeArgumentError(f"{name} must be three numbers > 0, got {value!r}")
    return tuple(float(v) for v in values)


def _check_fill(value) -> tuple[int, int, int]:
    values = _triple(value, "fill")
    if not all(_is_int(v) and 0 <= v <= 255 for v in values):
        raise NegativeArgumentError(f"fill must be three integers in 0..255, got {value!r}")
    return tuple(int(v) for v in values)


def needs_partner(method: str) -> bool:
    """Whether the loser is built from the partner's image (only `other`)."""
    _check_method(method)
    return method in NEEDS_PARTNER


def _check_method(method: str) -> None:
    if method not in NEGATIVE_METHODS:
        raise NegativeArgumentError(f"unknown negative method {method!r}: use one of {', '.join(NEGATIVE_METHODS)}")


# ----------------------------------------------------------------------------- noise schedule

# POVID's schedule (METHOD 4b): beta_i = sigmoid(u_i) * (5e-3 - 1e-5) + 1e-5, u = linspace(-6, 6,
# 1000), abar_t = prod_{i <= t} (1 - beta_i) with t counted from 0 (the product includes beta_t).
# Counted so, t = 500 gives sqrt(abar) = 0.8630 and sqrt(1 - abar) = 0.5052 (from 1 it would be
# 0.8641 / 0.5033): the figures METHOD 4b quotes for 500, 800 and 900 are the 0-based ones.
_U = np.linspace(-6.0, 6.0, NOISE_STEPS)
_BETAS = 1.0 / (1.0 + np.exp(-_U)) * (5e-3 - 1e-5) + 1e-5
_ABAR = np.cumprod(1.0 - _BETAS)


def noise_abar(t: int) -> float:
    """abar_t of the noise schedule, t in 0..999: the variance share of the winner in `noise`."""
    return float(_ABAR[_check_step(t)])


# ----------------------------------------------------------------------------- draws


def draw(method: str, rng: np.random.Generator, height: int, width: int, settings: NegativeSettings) -> dict:
    """The per-sample parameters of `method` for an image of height x width, drawn from `rng`:
    plain JSON values (int, float, str, bool, lists), enough for `make` to rebuild the loser."""
    _check_method(method)
    if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
        raise NegativeArgumentError(f"image size must be positive integers, got {height!r} x {width!r}")
    if not isinstance(settings, NegativeSettings):
        raise NegativeArgumentError("settings must be a NegativeSettings")
    s = settings
    if method == "crop":
        return _draw_crop(rng, int(height), int(width), s.crop_area)
    if method == "noise":
        params = {"t": s.noise_step, "space": s.noise_space, "seed": int(rng.integers(0, 2**63 - 1))}
        if s.noise_space == "normalized":
            params |= {"mean": list(s.mean), "std": list(s.std)}
        return params
    if method == "pixelate":
        return {"k": s.pixelate}
    if method == "image-blur":
        if isinstance(s.blur_radius, tuple):
            lo, hi = s.blur_radius
            return {"radius": float(rng.integers(lo, hi + 1))}
        return {"radius": s.blur_radius}
    if method == "rotate":
        return {"angle": float(rng.uniform(*s.rotate_degrees)), "fill": list(s.fill)}
    if method == "blank":
        return {"fill": list(s.fill)}
    return {}  # other: the partner is chosen by the unit's derangement, not drawn here


def _draw_crop(rng: np.random.Generator, height: int, width: int, area: tuple[float, float]) -> dict:
    """mDPO's crop box: torchvision's RandomResizedCrop.get_params with scale=(0.01, 0.2) and its
    default ratio (3/4, 4/3), the transform mDPO applies to the preprocessed image. The same
    rule, re-implemented on our rng: up to 10 tries of s ~ U(a, b), log r ~ U(log 3/4, log 4/3),
    w = round(sqrt(s*H*W*r)), h = round(sqrt(s*H*W/r)); the first box with 0 < w <= W and
    0 < h <= H is placed with top ~ U{0..H-h}, left ~ U{0..W-w}. When all 10 fail, torchvision's
    fallback: the largest centred box whose aspect is clamped to [3/4, 4/3] (the whole image if
    its own aspect is inside; top and left by floor division). With the default area range, an
    image of aspect within [3/4, 4/3] and 34 pixels or more never fails a try (w, h >= 1 and the
    box always fits), so the fallback only serves tiny or very elongated images; `fallback`
    records it."""
    total = height * width
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(CROP_ATTEMPTS):
        scale = float(rng.uniform(*area))
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(scale * total * ratio)))
        h = int(round(math.sqrt(scale * total / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return {"top": top, "left": left, "height": h, "width": w, "scale": scale, "fallback": False}
    aspect = width / height
    if aspect < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif aspect > CROP_RATIO[1]:
        w, h = int(round(height * CROP_RATIO[1])), height
    else:
        w, h = width, height
    return {"top": (height - h) // 2, "left": (width - w) // 2, "height": h, "width": w, "scale": None,
            "fallback": True}


# ----------------------------------------------------------------------------- losers


@dataclass
class Negative:
    """One loser, the share of the winner it carries, and (where it has a meaning) its mask."""

    loser: np.ndarray  # uint8 H x W x 3, the winner's geometry
    lam: float  # the share of the winner the loser still carries (table in the module docstring)
    mask: np.ndarray | None  # uint8 H x W, 255 = from the winner (crop: the box on the winner's grid)


def make(method: str, winner: np.ndarray, partner: np.ndarray | None, params: Mapping) -> Negative:
    """The loser of `method` for `winner` (uint8 H x W x 3) with the drawn `params`. `partner`
    (uint8, the winner's shape) is read by `other` only and may be None for the rest."""
    _check_method(method)
    _check_image(winner, "winner")
    h, w = winner.shape[:2]
    if not isinstance(params, Mapping):
        raise NegativeArgumentError(f"params of {method} must be a mapping, got {type(params).__name__}")
    p = _Params(method, params)
    if method == "crop":
        return _crop(winner, p)
    if method == "noise":
        abar = noise_abar(p.int("t"))
        return Negative(_to_uint8(noise_rgb(winner, params)), abar, None)
    if method == "pixelate":
        k = p.int("k", low=1)
        return Negative(_pixelate(winner, k), 1.0 / k**2, None)
    if method == "image-blur":
        radius = p.number("radius", positive=True)
        loser = np.asarray(Image.fromarray(winner).filter(ImageFilter.GaussianBlur(radius)))
        return Negative(loser, blur_lam(radius), None)
    if method == "rotate":
        return _rotate(winner, p.number("angle"), p.fill())
    if method == "blank":
        return Negative(np.full_like(winner, p.fill()), 0.0, np.zeros((h, w), np.uint8))
    # other
    if partner is None:
        raise NegativeArgumentError("method 'other' needs the partner's image")
    _check_image(partner, "partner")
    if partner.shape != winner.shape:
        raise NegativeArgumentError(f"partner {partner.shape} and winner {winner.shape} differ in shape")
    return Negative(partner.copy(), 0.0, np.zeros((h, w), np.uint8))


def record_problem(method: str, params, lam: float | None, height: int, width: int) -> str | None:
    """What is wrong with a recorded sample of `method` (its row's parameters and lam, for an image
    of height x width), or None: each parameter in its range, and lam the value the parameters
    give (rotate's lam is its mask's share, checked against the mask: schemas.shard.mask_problem)."""
    if not isinstance(params, Mapping):
        return f"{method} row has no parameters (method_params)"
    p = _Params(method, params)
    try:
        if method == "crop":
            top, left, bh, bw = p.int("top", low=0), p.int("left", low=0), p.int("height", low=1), p.int("width", low=1)
            if top + bh > height or left + bw > width:
                return f"crop box {bh}x{bw} at ({top}, {left}) leaves the {height}x{width} image"
            expected = bh * bw / (height * width)
        elif method == "noise":
            if p.get("space") not in NOISE_SPACES:
                return f"noise space {p.get('space')!r} is not one of {', '.join(NOISE_SPACES)}"
            p.int("seed", low=0)
            expected = noise_abar(p.int("t"))
        elif method == "pixelate":
            expected = 1.0 / p.int("k", low=2) ** 2
        elif method == "image-blur":
            expected = blur_lam(p.number("radius", positive=True))
        elif method == "rotate":
            p.number("angle")
            p.fill()
            return None
        else:  # blank, other
            if method == "blank":
                p.fill()
            expected = 0.0
    except NegativeArgumentError as exc:
        return str(exc)
    if lam != expected:
        return f"{method} lam is {lam!r}, its parameters give {expected!r}"
    return None


def pixel_mask(negative: Negative) -> np.ndarray:
    """The H x W uint8 mask to store for a negative: its own mask, or where it has none the
    uniform level round(255 * lam) on every pixel (the rule `mixup` follows)."""
    if negative.mask is not None:
        return negative.mask
    h, w = negative.loser.shape[:2]
    return np.full((h, w), int(np.rint(255.0 * negative.lam)), np.uint8)


def blur_lam(radius: float) -> float:
    """lam of `image-blur`: the share of independent values a Gaussian blur of standard deviation
    `radius` leaves, 1 / n_eff with n_eff = 1 / sum(w^2) = 4 pi r^2 the kernel's effective
    number of pixels (Kish). The same count gives k^2 for a k x k box mean, i.e. pixelate's
    1 / k^2; capped at 1 for radii under ~0.3 px, where the continuous formula breaks down.
    METHOD 4b gives no rule: lam = 1 would call a radius-20 blur (no detail below ~50 px left)
    as close to the winner as the winner itself, and make the margin 1 - lam vanish."""
    return min(1.0, 1.0 / (4.0 * math.pi * radius**2))


def noise_rgb(winner: np.ndarray, params: Mapping) -> np.ndarray:
    """The noise loser before clamping and quantising: float64 RGB on the [0, 1] scale (it can
    leave [0, 1]). x' = sqrt(abar_t) x + sqrt(1 - abar_t) eps, applied to x = RGB / 255 ("pixel")
    or to z = (x - mean) / std and mapped back, x' = z' * std + mean ("normalized"). eps ~ N(0, 1)
    per pixel and channel from a generator seeded by params["seed"]."""
    _check_image(winner, "winner")
    p = _Params("noise", params)
    abar = noise_abar(p.int("t"))
    space = p.get("space")
    if space not in NOISE_SPACES:
        raise NegativeArgumentError(f"params of noise: space must be pixel or normalized, got {space!r}")
    a, b = math.sqrt(abar), math.sqrt(1.0 - abar)
    if space == "pixel":
        scale, shift, spread = a / 255.0, 0.0, b
    else:
        mean = np.asarray(_check_mean(p.get("mean"), "params of noise: mean"))
        std = np.asarray(_check_std(p.get("std"), "params of noise: std"))
        # (a * (x - mean) / std + b * eps) * std + mean, expanded: a * x + (1 - a) * mean + b * std * eps
        scale, shift, spread = a / 255.0, (1.0 - a) * mean, b * std
    out = np.random.Generator(np.random.PCG64(p.int("seed"))).standard_normal(winner.shape)  # eps
    out *= spread  # in place: a 336 x 336 image is 2.7 MB of float64 per temporary
    out += winner * scale
    out += shift
    return out


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    """[0, 1]-scale floats to uint8, in place on `rgb`: clamped first (POVID's code wraps around
    instead), then rounded half to even, as stages.mix rounds."""
    rgb *= 255.0
    np.clip(rgb, 0.0, 255.0, out=rgb)
    return np.rint(rgb, out=rgb).astype(np.uint8)


def _crop(winner: np.ndarray, p: "_Params") -> Negative:
    h, w = winner.shape[:2]
    top, left = p.int("top", low=0), p.int("left", low=0)
    bh, bw = p.int("height", low=1), p.int("width", low=1)
    if top + bh > h or left + bw > w:
        raise NegativeArgumentError(f"params of crop: box {bh}x{bw} at ({top}, {left}) leaves the {h}x{w} image")
    # Bilinear back to H x W, as torchvision's RandomResizedCrop resizes (an enlargement, so its
    # antialias flag changes nothing); cropping the uint8 pixels instead of the normalised tensor
    # mDPO crops differs only by the rounding, since normalisation is per-channel affine.
    box = Image.fromarray(winner).crop((left, top, left + bw, top + bh))
    loser = np.asarray(box.resize((w, h), Image.BILINEAR))
    mask = np.zeros((h, w), np.uint8)
    mask[top:top + bh, left:left + bw] = 255
    return Negative(loser, bh * bw / (h * w), mask)


def _pixelate(winner: np.ndarray, k: int) -> np.ndarray:
    """Bilinear down by k, nearest back up: k x k blocks of equal pixels on a grid anchored at the
    top-left corner. When H or W is not a multiple of k, the image is first extended to the next
    multiple by repeating its last row/column, so every block (the last ones then cut by the
    border) shows the mean of exactly the pixels it covers; the down size is ceil(H/k) x ceil(W/k).
    Pillow's bilinear downscale is antialiased (a triangle filter k pixels wide each side)."""
    h, w = winner.shape[:2]
    bh, bw = -(-h // k), -(-w // k)
    padded = np.pad(winner, ((0, bh * k - h), (0, bw * k - w), (0, 0)), mode="edge")
    small = np.asarray(Image.fromarray(padded).resize((bw, bh), Image.BILINEAR))
    # Nearest up by a whole factor is a block repetition (what Pillow's NEAREST resize does).
    return np.repeat(np.repeat(small, k, axis=0), k, axis=1)[:h, :w]


def _rotate(winner: np.ndarray, angle: float, fill: tuple[int, int, int]) -> Negative:
    """Rotation about the image centre by `angle` degrees counter-clockwise (Pillow's sign), same
    canvas (no expand), bilinear. Pillow fills an output pixel with the fill colour when its
    source point falls outside the image and otherwise interpolates between image pixels only
    (neighbours beyond the border are clamped to it), so no pixel blends winner and fill. The
    image is rotated with an opaque alpha channel and a transparent fill in the same call, so
    the alpha is exactly that split (a separate NEAREST rotation of a mask can disagree with the
    bilinear one by a pixel or two: its fixed-point path rounds differently)."""
    h, w = winner.shape[:2]
    rgba = np.dstack([winner, np.full((h, w), 255, np.uint8)])
    out = np.asarray(Image.fromarray(rgba).rotate(angle, resample=Image.BILINEAR, fillcolor=(*fill, 0)))
    mask = out[..., 3].copy()
    return Negative(np.ascontiguousarray(out[..., :3]), float(np.count_nonzero(mask)) / (h * w), mask)


def _check_image(x, name: str) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3:
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise NegativeArgumentError(f"{name} must be a uint8 H x W x 3 array, got {got}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise NegativeArgumentError(f"{name} is empty: {x.shape}")


class _Params:
    """Typed reads of a params mapping (possibly read back from a row), one-line errors."""

    def __init__(self, method: str, params: Mapping):
        self.method, self.params = method, params

    def get(self, name: str):
        if name not in self.params:
            raise NegativeArgumentError(f"params of {self.method} lack {name!r}")
        return self.params[name]

    def int(self, name: str, low: int | None = None) -> int:
        value = self.get(name)
        if not _is_int(value) or (low is not None and value < low):
            bound = "" if low is None else f" >= {low}"
            raise NegativeArgumentError(f"params of {self.method}: {name} must be an integer{bound}, got {value!r}")
        return int(value)

    def number(self, name: str, positive: bool = False) -> float:
        value = self.get(name)
        if not _is_number(value) or (positive and value <= 0):
            kind = "a number > 0" if positive else "a finite number"
            raise NegativeArgumentError(f"params of {self.method}: {name} must be {kind}, got {value!r}")
        return float(value)

    def fill(self) -> tuple[int, int, int]:
        try:
            return _check_fill(self.get("fill"))
        except NegativeArgumentError as e:
            raise NegativeArgumentError(f"params of {self.method}: {e}") from None
