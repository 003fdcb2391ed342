"""Tests for stages.mixing.negatives: the image-side negatives of METHOD 4b (crop, noise, pixelate,
image-blur, rotate, blank, other), on real pixels with seeded draws.

Statistical tolerances are derived from standard errors (SE) of the seeded samples and set at
4-5 SE, so a test fails on a wrong distribution, not on chance (the draws are fixed anyway)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter

from stages.mixing import negatives as N
from stages.errors import UserError
from stages.mixing.ratios import sample_rng
from tests.conftest import make_image

SEED = 20261126
DEFAULT = N.NegativeSettings()


def params_for(method: str, key: str, h: int, w: int, settings: N.NegativeSettings = DEFAULT) -> dict:
    return N.draw(method, sample_rng(SEED, key, method), h, w, settings)


def phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def test_module_imports_no_torch():
    code = "import sys, stages.mixing.negatives; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["False"]


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("kwargs", [
    dict(crop_area=(0.0, 0.2)), dict(crop_area=(0.3, 0.2)), dict(crop_area=(0.1, 1.5)), dict(crop_area=0.1),
    dict(noise_step=1000), dict(noise_step=-1), dict(noise_step=500.0), dict(noise_step=True),
    dict(noise_space="latent"), dict(pixelate=1), dict(pixelate=16.0), dict(blur_radius=0),
    dict(blur_radius=(40, 20)), dict(blur_radius=(20.5, 40)), dict(blur_radius=float("nan")),
    dict(rotate_degrees=(80, 10)), dict(rotate_degrees=(0, 400)), dict(mean=(0.5, 0.5)),
    dict(mean=(0.5, 0.5, 1.5)), dict(std=(0.2, 0.0, 0.2)), dict(fill=(0, 0, 256)), dict(fill=(0.5, 0, 0)),
])
def test_settings_refuse_bad_values_in_one_line(kwargs):
    with pytest.raises(N.NegativeArgumentError) as info:
        N.NegativeSettings(**kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, UserError)
    assert "\n" not in str(info.value) and str(info.value)


def test_settings_defaults_and_coercion():
    assert DEFAULT.fill == (122, 116, 104)  # int(255 * OpenAI mean), LLaVA's pad colour
    s = N.NegativeSettings(crop_area=[0.05, 0.1], rotate_degrees=[-5, 5], mean=[0.5, 0.25, 1.0],
                           blur_radius=[20, 40])
    assert s.crop_area == (0.05, 0.1) and s.rotate_degrees == (-5.0, 5.0) and s.blur_radius == (20, 40)
    assert s.fill == (127, 63, 255)  # derived from the mean when not given
    assert N.NegativeSettings(fill=[1, 2, 3]).fill == (1, 2, 3)
    hash(s)  # frozen and hashable (lists became tuples)
    assert N.needs_partner("other") and not any(N.needs_partner(m) for m in N.NEGATIVE_METHODS if m != "other")
    with pytest.raises(N.NegativeArgumentError, match="unknown negative method"):
        N.needs_partner("mixup")


# ----------------------------------------------------------------------------- crop


@pytest.mark.parametrize("h,w", [(336, 336), (224, 160)])
def test_crop_box_distribution(h, w):
    n = 2000
    boxes = [params_for("crop", f"{i:06d}", h, w) for i in range(n)]
    assert not any(b["fallback"] for b in boxes)  # the tries never fail at these geometries
    bh = np.array([b["height"] for b in boxes], float)
    bw = np.array([b["width"] for b in boxes], float)
    top = np.array([b["top"] for b in boxes], float)
    left = np.array([b["left"] for b in boxes], float)
    scale = np.array([b["scale"] for b in boxes])
    assert np.all(top >= 0) and np.all(left >= 0) and np.all(top + bh <= h) and np.all(left + bw <= w)

    # The drawn s lies in [0.01, 0.20]; the box's own area too, up to the rounding of its sides
    # (each side within 0.5 px of the real-valued one).
    assert scale.min() >= 0.01 and scale.max() <= 0.20
    assert np.all((bh - 0.5) * (bw - 0.5) <= 0.20 * h * w) and np.all((bh + 0.5) * (bw + 0.5) >= 0.01 * h * w)
    area = bh * bw / (h * w)
    # Mean of U(0.01, 0.20) is 0.105, sd 0.19 / sqrt(12) = 0.0548: SE over 2000 draws 0.00123,
    # tolerance 4 SE = 0.0049. Rounding the sides adds no bias (E[e_h * e_w] = 0).
    se = 0.19 / math.sqrt(12) / math.sqrt(n)
    assert abs(area.mean() - 0.105) < 4 * se
    assert abs(scale.mean() - 0.105) < 4 * se
    assert area.min() < 0.015 and area.max() > 0.19  # the whole range is reached

    # Aspect w/h within [3/4, 4/3] up to the rounding: some real w*, h* within 0.5 px of the box's
    # sides has a ratio in range, i.e. (w - 0.5)/(h + 0.5) <= 4/3 and (w + 0.5)/(h - 0.5) >= 3/4.
    assert np.all((bw - 0.5) / (bh + 0.5) <= 4 / 3) and np.all((bw + 0.5) / (bh - 0.5) >= 3 / 4)
    # log-uniform on [log 3/4, log 4/3]: symmetric about 0, sd 0.575 / sqrt(12) = 0.166.
    log_aspect = np.log(bw / bh)
    assert abs(log_aspect.mean()) < 4 * 0.166 / math.sqrt(n) + 0.005  # + rounding of small boxes
    assert log_aspect.min() < math.log(3 / 4) + 0.05 and log_aspect.max() > math.log(4 / 3) - 0.05

    # Position uniform where the box fits: top/(H - h) has mean 0.5, sd 0.289.
    assert abs(np.mean(top / (h - bh)) - 0.5) < 4 * 0.289 / math.sqrt(n)
    assert abs(np.mean(left / (w - bw)) - 0.5) < 4 * 0.289 / math.sqrt(n)


@pytest.mark.parametrize("h,w", [(336, 336), (224, 160)])
def test_crop_loser_is_the_box_resized_back(h, w):
    winner = make_image(3, size=(w, h))
    for i in range(20):
        p = params_for("crop", f"k{i}", h, w)
        neg = N.make("crop", winner, None, p)
        t, l, bh, bw = p["top"], p["left"], p["height"], p["width"]
        # Independent of the module's box convention: a numpy slice, then Pillow's bilinear resize.
        box = Image.fromarray(np.ascontiguousarray(winner[t:t + bh, l:l + bw]))
        expected = np.asarray(box.resize((w, h), Image.BILINEAR))
        assert np.array_equal(neg.loser, expected)
        assert neg.lam == bh * bw / (h * w)
        assert neg.mask.shape == (h, w) and neg.mask.dtype == np.uint8
        assert np.all(neg.mask[t:t + bh, l:l + bw] == 255) and int(neg.mask.sum()) == 255 * bh * bw
        assert neg.mask.mean() / 255 == pytest.approx(neg.lam, abs=1e-15)


def test_crop_fallback_is_torchvision_centre_crop():
    # A 1000 x 4 image: every try gives w >= round(sqrt(0.01 * 4000 * 3/4)) = 5 > 4, so all 10 fail;
    # the fallback is the largest centred box of aspect 3/4: w = 4, h = round(4 / 0.75) = 5.
    p = params_for("crop", "tall", 1000, 4)
    assert p == {"top": (1000 - 5) // 2, "left": 0, "height": 5, "width": 4, "scale": None, "fallback": True}
    p = params_for("crop", "wide", 4, 1000)
    assert p == {"top": 0, "left": (1000 - 5) // 2, "height": 4, "width": 5, "scale": None, "fallback": True}
    neg = N.make("crop", make_image(1, size=(1000, 4)), None, p)
    assert neg.lam == 20 / 4000 and neg.loser.shape == (4, 1000, 3)


# ----------------------------------------------------------------------------- noise


def test_noise_schedule_gives_method_figures():
    # METHOD 4b's figures: t counts from 0 and the product includes beta_t.
    for t, (a, b) in {500: (0.863, 0.505), 800: (0.467, 0.884), 900: (0.365, 0.931)}.items():
        abar = N.noise_abar(t)
        assert round(math.sqrt(abar), 3) == a and round(math.sqrt(1 - abar), 3) == b
    # Counted from 1 the t = 500 figures would be 0.864 / 0.503.
    assert round(math.sqrt(N.noise_abar(499)), 3) == 0.864
    beta0 = 1 / (1 + math.exp(6)) * (5e-3 - 1e-5) + 1e-5
    assert N.noise_abar(0) == pytest.approx(1 - beta0, rel=1e-15)
    assert all(N.noise_abar(t) > N.noise_abar(t + 1) for t in range(999))
    for bad in (-1, 1000, 2.0, True):
        with pytest.raises(N.NegativeArgumentError):
            N.noise_abar(bad)


def _space_units(rgb: np.ndarray, space: str, s: N.NegativeSettings) -> np.ndarray:
    """[0, 1]-scale RGB in the noise space's own units."""
    return rgb if space == "pixel" else (rgb - np.asarray(s.mean)) / np.asarray(s.std)


def _regress(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """OLS of y on x: slope, intercept, residual sd, and the slope's standard error."""
    x, y = x.ravel(), y.ravel()
    xc = x - x.mean()
    slope = float(xc @ (y - y.mean()) / (xc @ xc))
    intercept = float(y.mean() - slope * x.mean())
    resid = float(np.std(y - slope * x - intercept))
    return slope, intercept, resid, resid / math.sqrt(float(xc @ xc))


@pytest.mark.parametrize("space", N.NOISE_SPACES)
@pytest.mark.parametrize("t", [500, 800])
def test_noise_before_clamping_is_the_forward_diffusion(space, t):
    """The pre-clamp values, regressed on the winner in the space's units, have slope sqrt(abar_t),
    intercept 0 and residual sd sqrt(1 - abar_t). Clamping is tested apart (below): in pixel space it
    is never rare (at t = 800 a mid-grey pixel leaves [0, 1] a third of the time), so a regression
    on the stored pixels would be biased."""
    s = N.NegativeSettings(noise_step=t, noise_space=space)
    winner = make_image(11, size=(336, 336))
    p = params_for("noise", "reg", 336, 336, s)
    assert p["t"] == t and p["space"] == space
    x = _space_units(winner / 255.0, space, s)
    y = _space_units(N.noise_rgb(winner, p), space, s)
    slope, intercept, resid, se = _regress(x, y)
    a, b = math.sqrt(N.noise_abar(t)), math.sqrt(1 - N.noise_abar(t))
    n = x.size  # 338,688 values
    assert abs(slope - a) < 5 * se  # se ~ 0.003 (pixel), ~ 0.0009 (normalized)
    assert abs(intercept) < 5 * se * max(1.0, float(np.sqrt(np.mean(x**2))))
    assert abs(resid - b) < 5 * b / math.sqrt(2 * n)  # sd of a sample sd: b / sqrt(2n) ~ 0.0006 - 0.0011
    # The stored loser is that, clamped to [0, 1] and rounded: never wrapped.
    pre = N.noise_rgb(winner, p)
    loser = N.make("noise", winner, None, p).loser
    assert np.array_equal(loser, np.rint(np.clip(pre * 255, 0, 255)).astype(np.uint8))
    if space == "pixel":
        assert (pre > 1).mean() > 0.01 and (pre < 0).mean() > 0.01  # clamping is exercised
    assert np.all(loser[pre >= 1] == 255) and np.all(loser[pre <= 0] == 0)


@pytest.mark.parametrize("t", [500, 800])
def test_noise_pixel_space_stored_values_follow_a_censored_normal(t):
    """End to end on the uint8 loser of a flat grey winner (x = 128/255): the median is unaffected
    by clamping, and the shares of pixels clamped to 0 and 255 are the normal tails beyond 0 and 1
    (a wrap-around would put them elsewhere)."""
    winner = np.full((336, 336, 3), 128, np.uint8)
    s = N.NegativeSettings(noise_step=t)
    loser = N.make("noise", winner, None, params_for("noise", "flat", 336, 336, s)).loser / 255.0
    a, b = math.sqrt(N.noise_abar(t)), math.sqrt(1 - N.noise_abar(t))
    mu, n = a * 128 / 255, loser.size
    # Median: SE sqrt(pi/2) b / sqrt(n) <= 0.0019, plus half a quantisation step (0.002).
    assert abs(np.median(loser) - mu) < 4 * math.sqrt(math.pi / 2) * b / math.sqrt(n) + 0.5 / 255
    # Stored 0 iff the value is below 0.5/255; stored 255 iff above 1 - 0.5/255.
    p0, p1 = phi((0.5 / 255 - mu) / b), 1 - phi((1 - 0.5 / 255 - mu) / b)
    for share, p in (((loser == 0).mean(), p0), ((loser == 1).mean(), p1)):
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert p0 > 0.1  # t = 500: 0.22; t = 800: 0.32 of all values clamped at 0


def test_noise_normalized_space_stored_values_where_clamping_is_rare():
    """At t = 500 in normalized space the pixel noise is sqrt(1 - abar) * std ~ 0.14: on a winner
    in [90, 165] / 255 fewer than 0.1% of values clamp, so the stored uint8 loser itself regresses
    with slope sqrt(abar) and residual sqrt(1 - abar) in normalized units."""
    s = N.NegativeSettings(noise_space="normalized")
    winner = (90 + make_image(5, size=(336, 336)).astype(np.int32) * 75 // 255).astype(np.uint8)
    p = params_for("noise", "mid", 336, 336, s)
    loser = N.make("noise", winner, None, p).loser
    assert np.mean((loser == 0) | (loser == 255)) < 1e-3
    slope, intercept, resid, se = _regress(_space_units(winner / 255.0, "normalized", s),
                                           _space_units(loser / 255.0, "normalized", s))
    a, b = math.sqrt(N.noise_abar(500)), math.sqrt(1 - N.noise_abar(500))
    assert abs(slope - a) < 5 * se
    # Quantisation adds sd (1/255)/sqrt(12)/std ~ 0.004 in quadrature (+0.00002) and the rare clamps
    # shrink it a little; 5 SE of the residual sd is 0.004.
    assert abs(resid - b) < 5 * b / math.sqrt(2 * loser.size) + 1e-3
    # About 3.7x weaker in pixels than pixel space at the same t (METHOD 4b).
    ratio = 1 / np.mean(DEFAULT.std)
    assert 3.6 < ratio < 3.9


def test_noise_eps_is_reproducible_and_differs_between_keys():
    winner = make_image(2, size=(64, 48))
    p1, p1b, p2 = params_for("noise", "a", 48, 64), params_for("noise", "a", 48, 64), params_for("noise", "b", 48, 64)
    assert p1 == p1b and p1["seed"] != p2["seed"]
    assert N.make("noise", winner, None, p1).loser.tobytes() == N.make("noise", winner, None, p1b).loser.tobytes()
    a = math.sqrt(N.noise_abar(500))
    eps1 = (N.noise_rgb(winner, p1) - a * winner / 255.0) / math.sqrt(1 - a * a)
    eps2 = (N.noise_rgb(winner, p2) - a * winner / 255.0) / math.sqrt(1 - a * a)
    # Two independent N(0, 1) fields: correlation within 5 / sqrt(n) of 0, sd 1 within 5 / sqrt(2n).
    assert abs(np.corrcoef(eps1.ravel(), eps2.ravel())[0, 1]) < 5 / math.sqrt(eps1.size)
    assert abs(eps1.std() - 1) < 5 / math.sqrt(2 * eps1.size) and abs(eps1.mean()) < 5 / math.sqrt(eps1.size)


# ----------------------------------------------------------------------------- pixelate


@pytest.mark.parametrize("k", [16, 32])
@pytest.mark.parametrize("h,w", [(336, 336), (224, 160), (50, 37)])
def test_pixelate_blocks(k, h, w):
    winner = make_image(4, size=(w, h))
    s = N.NegativeSettings(pixelate=k)
    p = params_for("pixelate", "x", h, w, s)
    neg = N.make("pixelate", winner, None, p)
    assert p == {"k": k} and neg.lam == 1 / k**2 and neg.mask is None
    # k x k blocks of equal pixels on a grid anchored at the top-left (the last ones cut by the border).
    corners = neg.loser[::k, ::k]
    assert corners.shape[:2] == (-(-h // k), -(-w // k))
    assert np.array_equal(neg.loser, np.repeat(np.repeat(corners, k, 0), k, 1)[:h, :w])
    assert len(np.unique(corners.reshape(-1, 3), axis=0)) > 1 or corners.shape[:2] == (1, 1)
    if h % k == 0 and w % k == 0:  # divisible: exactly Pillow's bilinear down by k
        small = np.asarray(Image.fromarray(winner).resize((w // k, h // k), Image.BILINEAR))
        assert np.array_equal(corners, small)
    level = N.pixel_mask(neg)
    assert level.shape == (h, w) and np.all(level == round(255 / k**2))


def test_pixelate_block_shows_its_own_pixels():
    """On a linear ramp a symmetric filter returns the mean of the pixels under it, so a block whose
    filter support (the block and k pixels around it) lies inside the image shows, within a grey
    level, the mean of exactly the pixels it covers: the down grid is the block grid. (A down size
    of W/k stretched over a W that k does not divide would be off by several levels: the ramp
    climbs 2.9 levels per pixel in x.) Blocks nearer the border see Pillow's kernel cut there."""
    h, w, k = 100, 90, 16
    yy, xx = np.mgrid[0:h, 0:w]
    winner = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) * 255 // (w + h - 2)], -1).astype(np.uint8)
    loser = N.make("pixelate", winner, None, {"k": k}).loser
    checked = 0
    for r in range(k, h - 2 * k + 1, k):
        for c in range(k, w - 2 * k + 1, k):
            target = winner[r:r + k, c:c + k].reshape(-1, 3).mean(0)
            assert np.all(np.abs(loser[r, c] - target) <= 1.0), (r, c, loser[r, c], target)
            checked += 1
    assert checked == 4 * 3


# ----------------------------------------------------------------------------- image-blur


def test_image_blur_is_pillows_gaussian_blur():
    winner = make_image(8, size=(336, 336))
    p = params_for("image-blur", "b", 336, 336)
    neg = N.make("image-blur", winner, None, p)
    assert p == {"radius": 20.0} and neg.mask is None
    assert np.array_equal(neg.loser, np.asarray(Image.fromarray(winner).filter(ImageFilter.GaussianBlur(20))))
    assert neg.lam == pytest.approx(1 / (4 * math.pi * 400))
    assert np.abs(neg.loser.astype(int) - winner).mean() > 5  # it did blur


@pytest.mark.parametrize("colour", [(0, 0, 0), (255, 255, 255), (122, 116, 104), (7, 200, 33)])
def test_image_blur_keeps_a_flat_image_flat(colour):
    winner = np.empty((224, 160, 3), np.uint8)
    winner[:] = colour
    for radius in (20.0, 40.0):
        assert np.array_equal(N.make("image-blur", winner, None, {"radius": radius}).loser, winner)


def test_image_blur_radius_range_and_lam_rule():
    s = N.NegativeSettings(blur_radius=(20, 40))
    radii = np.array([params_for("image-blur", f"{i}", 32, 32, s)["radius"] for i in range(1000)])
    assert set(radii) == set(float(r) for r in range(20, 41))  # U{20..40}, both ends included
    assert abs(radii.mean() - 30) < 4 * math.sqrt((21**2 - 1) / 12) / math.sqrt(1000)
    # lam = 1 / n_eff, n_eff = 1 / sum(w^2): check the closed form 4 pi r^2 on a sampled Gaussian
    # kernel, and that the same count gives a k x k box mean pixelate's 1 / k^2.
    for r in (2.0, 5.0, 20.0):
        x = np.arange(-int(6 * r), int(6 * r) + 1)
        g = np.exp(-0.5 * (x / r) ** 2)
        g2 = np.outer(g, g) / g.sum() ** 2
        assert N.blur_lam(r) == pytest.approx(float((g2**2).sum()), rel=0.01)
    box = np.full((16, 16), 1 / 256)
    assert float((box**2).sum()) == pytest.approx(1 / 16**2)
    assert N.blur_lam(0.1) == 1.0


# ----------------------------------------------------------------------------- rotate


def square_overlap(theta_deg: float) -> float:
    """Area share of a square that its own rotation by theta about the centre covers:
    2 / (1 + sin t + cos t) for t in [0, 90] degrees (the regular octagon 2(sqrt 2 - 1)... at 45)."""
    t = math.radians(theta_deg % 90)
    return 2 / (1 + math.sin(t) + math.cos(t))


def test_rotate_angle_range():
    n = 2000
    angles = np.array([params_for("rotate", f"{i}", 336, 336)["angle"] for i in range(n)])
    assert angles.min() >= 10 and angles.max() <= 80 and angles.min() < 11 and angles.max() > 79
    assert abs(angles.mean() - 45) < 4 * (70 / math.sqrt(12)) / math.sqrt(n)


def test_rotate_lam_is_the_winner_share_and_matches_the_analytic_overlap():
    winner = make_image(9, size=(336, 336))
    fill = list(DEFAULT.fill)
    for angle in (10.0, 23.7, 45.0, 61.2, 80.0):
        neg = N.make("rotate", winner, None, {"angle": angle, "fill": fill})
        assert set(np.unique(neg.mask)) <= {0, 255}
        assert neg.lam == neg.mask.mean() / 255  # exactly the mask's share
        # Counting pixels of a convex region misses at most about one pixel row of boundary: 1/336.
        assert abs(neg.lam - square_overlap(angle)) < 1 / 336, (angle, neg.lam, square_overlap(angle))
    assert square_overlap(45) == pytest.approx(2 * (math.sqrt(2) - 1))  # the regular octagon


@pytest.mark.parametrize("h,w", [(336, 336), (224, 160)])
def test_rotate_mask_marks_exactly_the_winner_pixels(h, w):
    """Rotated with two fill colours, the losers differ exactly where the mask is 0: every pixel the
    mask marks is interpolated from winner pixels only, and every other one is the fill."""
    winner = make_image(10, size=(w, h))
    for i in range(10):
        p = params_for("rotate", f"m{i}", h, w)
        a = N.make("rotate", winner, None, p)
        b = N.make("rotate", winner, None, {**p, "fill": [255 - c for c in p["fill"]]})
        assert np.array_equal((a.loser != b.loser).any(-1), a.mask == 0)
        assert np.array_equal(a.mask, b.mask)
        assert np.all(a.loser[a.mask == 0] == p["fill"])
        for y, x in ((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)):  # corners are the fill
            assert a.mask[y, x] == 0 and list(a.loser[y, x]) == p["fill"]
        assert a.mask[h // 2, w // 2] == 255


def test_rotate_turns_counter_clockwise_about_the_centre():
    h = w = 336
    winner = np.zeros((h, w, 3), np.uint8)
    cy, cx = h / 2, w / 2
    winner[int(cy) - 4:int(cy) + 4, int(cx) + 96:int(cx) + 104] = 255  # a spot 100 px right of the centre
    loser = N.make("rotate", winner, None, {"angle": 30.0, "fill": [0, 0, 0]}).loser
    ys, xs = np.nonzero(loser[..., 0] > 128)
    # Counter-clockwise on screen (y down): the spot moves up, to the centre + 100 (cos 30, -sin 30).
    assert abs(xs.mean() + 0.5 - (cx + 100 * math.cos(math.radians(30)))) < 1.5
    assert abs(ys.mean() + 0.5 - (cy - 100 * math.sin(math.radians(30)))) < 1.5


# ----------------------------------------------------------------------------- blank, other


def test_blank_is_the_fill_colour():
    winner = make_image(1, size=(160, 224))
    s = N.NegativeSettings(fill=(1, 2, 3))
    p = params_for("blank", "z", 224, 160, s)
    neg = N.make("blank", winner, None, p)
    assert p == {"fill": [1, 2, 3]} and neg.lam == 0.0
    assert neg.loser.shape == winner.shape and np.all(neg.loser == np.array([1, 2, 3], np.uint8))
    assert neg.mask.shape == (224, 160) and not neg.mask.any()
    assert np.all(N.make("blank", winner, None, params_for("blank", "z", 224, 160)).loser == DEFAULT.fill)


def test_other_is_the_partner_exactly():
    winner, partner = make_image(1, size=(160, 224)), make_image(2, size=(160, 224))
    p = params_for("other", "o", 224, 160)
    neg = N.make("other", winner, partner, p)
    assert p == {} and neg.lam == 0.0 and not neg.mask.any()
    assert np.array_equal(neg.loser, partner) and neg.loser is not partner
    with pytest.raises(N.NegativeArgumentError, match="needs the partner"):
        N.make("other", winner, None, p)
    with pytest.raises(N.NegativeArgumentError, match="differ in shape"):
        N.make("other", winner, partner[:-1], p)


# ----------------------------------------------------------------------------- every method


@pytest.mark.parametrize("method", N.NEGATIVE_METHODS)
def test_same_seed_and_key_give_identical_bytes(method):
    h, w = 224, 160
    winner, partner = make_image(21, size=(w, h)), make_image(22, size=(w, h))
    s = N.NegativeSettings(blur_radius=(20, 40), noise_space="normalized")
    runs = []
    for _ in range(2):
        p = params_for(method, "000042", h, w, s)
        runs.append((p, N.make(method, winner, partner, p)))
    (p1, n1), (p2, n2) = runs
    assert p1 == p2 and n1.lam == n2.lam and n1.loser.tobytes() == n2.loser.tobytes()
    assert (n1.mask is None and n2.mask is None) or n1.mask.tobytes() == n2.mask.tobytes()
    # params are plain JSON: a row's params, read back, rebuild the same loser.
    again = N.make(method, winner, partner, json.loads(json.dumps(p1)))
    assert again.loser.tobytes() == n1.loser.tobytes() and again.lam == n1.lam
    assert n1.loser.dtype == np.uint8 and n1.loser.shape == winner.shape and 0.0 <= n1.lam <= 1.0
    if n1.mask is not None:
        assert n1.mask.shape == (h, w) and n1.mask.dtype == np.uint8
        assert n1.mask.mean() / 255 == pytest.approx(n1.lam, abs=1e-12)
    # Other keys: the methods that draw something draw something else.
    others = [params_for(method, f"{i:06d}", h, w, s) for i in range(8)]
    if method in ("crop", "noise", "rotate", "image-blur"):
        assert len({json.dumps(p, sort_keys=True) for p in others}) > 1
        assert any(N.make(method, winner, partner, p).loser.tobytes() != n1.loser.tobytes() for p in others)
    else:
        assert all(p == p1 for p in others)


def test_make_refuses_bad_input_in_one_line():
    winner = make_image(1, size=(32, 24))
    cases = [
        ("mixup", winner, {}), ("crop", winner, {"top": 0, "left": 0, "height": 30, "width": 5}),
        ("crop", winner, {"top": 0, "left": 0, "height": 5}),
        ("noise", winner, {"t": 1000, "space": "pixel", "seed": 1}),
        ("noise", winner, {"t": 5, "space": "latent", "seed": 1}),
        ("noise", winner, {"t": 5, "space": "normalized", "seed": 1}),
        ("pixelate", winner, {"k": 0}), ("image-blur", winner, {"radius": -1}), ("rotate", winner, {"angle": 10}),
        ("rotate", winner, {"angle": "x", "fill": [0, 0, 0]}), ("blank", winner, {"fill": [0, 0, 300]}),
        ("crop", winner.astype(np.float32), {}), ("crop", winner[..., :2], {}), ("crop", winner, [1, 2]),
    ]
    for method, image, params in cases:
        with pytest.raises(N.NegativeArgumentError) as info:
            N.make(method, image, None, params)
        assert "\n" not in str(info.value), (method, params)
    with pytest.raises(N.NegativeArgumentError, match="image size"):
        N.draw("crop", sample_rng(0, "k"), 0, 10, DEFAULT)


def test_pixel_mask_rule():
    winner = make_image(1, size=(32, 24))
    noise = N.make("noise", winner, None, params_for("noise", "p", 24, 32))
    assert np.all(N.pixel_mask(noise) == round(255 * N.noise_abar(500)))  # 190, as mixup stores its lam
    crop = N.make("crop", winner, None, params_for("crop", "p", 24, 32))
    assert N.pixel_mask(crop) is crop.mask
