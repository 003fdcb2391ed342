"""Fitting a decoded image to the encoder geometry (stages.imaging.decode): the three resize
modes, the fill colour, the interpolation, and the size reported for the original."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from stages.imaging.decode import decode_rgb, load_pixels, resize_to


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_pad_keeps_the_aspect_ratio_and_fills_with_the_given_colour():
    wide = Image.new("RGB", (80, 40), (200, 10, 10))
    out = resize_to(wide, (32, 32), "pad", fill=(1, 2, 3))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert tuple(out[0, 16]) == (1, 2, 3) and tuple(out[31, 16]) == (1, 2, 3)  # pad above and below
    assert tuple(out[16, 16]) == (200, 10, 10)


def test_center_crop_and_squash_fill_the_frame():
    img = Image.new("RGB", (80, 40), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 40))  # a white band on the left quarter
    crop = resize_to(img, (32, 32), "center-crop")
    squash = resize_to(img, (32, 32), "squash")
    assert crop[:, :2].mean() < 50  # the band was cropped away
    assert squash[:, :4].mean() > 200  # the band is still there, squeezed
    with pytest.raises(ValueError, match="resize mode"):
        resize_to(img, (32, 32), "stretch")


def test_interpolation_follows_the_tower():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8))
    bicubic = resize_to(img, (32, 32), "squash", interpolation="bicubic")
    bilinear = resize_to(img, (32, 32), "squash", interpolation="bilinear")
    assert not np.array_equal(bicubic, bilinear)


def test_load_pixels_reports_the_upright_original_size_and_transparency_takes_the_fill():
    rgba = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    pixels, orig = load_pixels(png(rgba), (16, 16), "squash", fill=(9, 8, 7))
    assert orig == (10, 20) and tuple(pixels[8, 8]) == (9, 8, 7)
    assert decode_rgb(png(rgba), fill=(9, 8, 7)).getpixel((0, 0)) == (9, 8, 7)
