"""Decode image bytes into the exact uint8 pixels the encoder sees.

decode (refusing decompression bombs before any pixel is decoded) -> EXIF orientation ->
RGB (transparency composited on the fill colour, 16-bit scaled, CMYK/palette/grey
converted) -> resize to the encoder geometry (bicubic or bilinear, as the tower's weights
were trained) by one of three modes:

- pad:         pad to a square with the fill colour, then resize (LLaVA-1.5 does this,
               with the tower's mean colour, int(255 * mean), as fill);
- center-crop: resize the short side, then crop the centre;
- squash:      resize straight to the target size, ignoring aspect ratio.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stages.inputs.records import InputError
from stages.model.constants import CLIP_MEAN_RGB

RESIZE_MODES = ("pad", "center-crop", "squash")
MAX_PIXELS = 90_000_000  # refuse larger declared sizes before decoding (decompression bombs)
RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}  # the interpolations open_clip's tags use
IMAGE_OPS = ("auto", "pil", "torch")  # where images are decoded and fitted: here (pil), or in the encoder actor (torch)


def decode_rgb(data: bytes, max_pixels: int = MAX_PIXELS, fill=CLIP_MEAN_RGB) -> Image.Image:
    """Bytes -> upright RGB PIL image, or InputError with a specific reason."""
    if not data:
        raise InputError("empty_file", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise InputError("too_large", f"declared size {w}x{h} exceeds {max_pixels} pixels")
            img.load()
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError("too_large", str(exc).split(".")[0]) from None
    except UnidentifiedImageError:
        known = _format_from_magic(data)
        if known:  # the right signature, but a header Pillow cannot parse: cut or damaged
            raise InputError("corrupt_image", f"{known} header is truncated or damaged") from None
        raise InputError("not_an_image", "bytes are not a known image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError("corrupt_image", str(exc)[:200] or type(exc).__name__) from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not cost the image; keep it as stored
        pass
    return to_rgb(img, fill)


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"II*\x00", "TIFF"),
          (b"MM\x00*", "TIFF"))


def _format_from_magic(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM" and data[6:10] == b"\x00" * 4:  # "BM", size, then 4 reserved zero bytes
        return "BMP"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), None)


def to_rgb(img: Image.Image, fill=CLIP_MEAN_RGB) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.uint32 if img.mode == "I" else np.uint16)
        peak = 65535 if img.mode != "I" else max(int(arr.max()), 255)
        img = Image.fromarray((arr.astype(np.float64) * 255.0 / peak).round().astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        base = Image.new("RGB", img.size, fill)
        base.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return base
    return img.convert("RGB")


def resize_to(img: Image.Image, size: tuple[int, int], mode: str = "pad", fill=CLIP_MEAN_RGB,
              interpolation: str = "bicubic") -> np.ndarray:
    """RGB image -> uint8 array (H, W, 3) of exactly `size` = (H, W)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    if interpolation not in RESAMPLE:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose one of {', '.join(RESAMPLE)}")
    resample = RESAMPLE[interpolation]
    th, tw = size
    w, h = img.size
    if mode == "pad":
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas.resize((tw, th), resample)
    elif mode == "center-crop":
        scale = max(tw / w, th / h)
        nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
        img = img.resize((nw, nh), resample)
        left, top = (nw - tw) // 2, (nh - th) // 2
        img = img.crop((left, top, left + tw, top + th))
    else:
        img = img.resize((tw, th), resample)
    return np.asarray(img, dtype=np.uint8)


def load_pixels(data: bytes, size: tuple[int, int], mode: str = "pad", fill=CLIP_MEAN_RGB,
                interpolation: str = "bicubic") -> tuple[np.ndarray, tuple[int, int]]:
    """Bytes -> (encoder pixels, original (height, width) after EXIF rotation). `fill` pads and
    replaces transparency (the tower's mean colour); `interpolation` is the tower's."""
    img = decode_rgb(data, fill=fill)
    return resize_to(img, size, mode, fill, interpolation), (img.size[1], img.size[0])


# --- the torch image path's routing ---------------------------------------------------------
# With --image-ops torch the prepare task leaves plain JPEGs encoded: the encoder actor decodes them
# in batches on its device (stages.imaging.device). Everything else still comes through load_pixels
# here, so every outcome and reason stays PIL's.

EXIF_ORIENTATION = 0x0112
# Huffman-coded sequential JPEGs (baseline and extended): what the hardware decoder of an A100 or H100
# takes in batches. Progressive JPEGs would be decoded one at a time there, their Huffman stage on
# the actor's one CPU core, so they stay with the prepare tasks, like arithmetic-coded and lossless ones.
DEVICE_JPEG_SOF = (0xC0, 0xC1)


def device_jpeg_size(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[int, int] | None:
    """(height, width) of a JPEG the torch image path may decode itself with the pixels decode_rgb
    would give; None for anything that must go through decode_rgb instead: other formats, CMYK
    and Adobe-marked JPEGs, progressive, 12-bit or arithmetic-coded ones, an EXIF orientation to apply, more
    than `max_pixels`, bytes cut short (no end-of-image marker: PIL calls them corrupt) or a header
    PIL cannot read. Reads the header only (about 20 us)."""
    if not data.startswith(b"\xff\xd8\xff") or not data.endswith(b"\xff\xd9"):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            plain = (img.format == "JPEG" and img.mode in ("RGB", "L") and img.bits == 8 and "adobe" not in img.info
                     and w * h <= max_pixels and img.getexif().get(EXIF_ORIENTATION, 1) == 1)
    except Exception:  # whatever PIL makes of it, decode_rgb says so with its reason
        return None
    return (h, w) if plain and _sof_marker(data) in DEVICE_JPEG_SOF else None


def _sof_marker(data: bytes) -> int | None:
    """The start-of-frame marker of a JPEG (0xC0 baseline ... 0xCF), walking the header's segments."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # C4/C8/CC: tables, not frames
            return marker
        elif marker == 0xDA:  # scan data before any frame header
            return None
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None
