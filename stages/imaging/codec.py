"""Encoding the images a shard stores, in one place: the write task encodes winners and losers with
it, and the torch image path's actor encodes with it on CPU (stages.imaging.device), so the bytes are
the same whichever process makes them."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from schemas.shard import IMAGE_FORMATS


def encode_image(pixels: np.ndarray, image_format: str, jpeg_quality: int = 95) -> bytes:
    """Encode uint8 pixels. jpg uses 4:4:4 chroma (no subsampling: mask edges stay sharp);
    png and webp are lossless, so decoding gives back exactly `pixels`."""
    img = Image.fromarray(pixels)
    buf = io.BytesIO()
    if image_format == "jpg":
        img.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0)
    elif image_format == "png":
        img.save(buf, format="PNG", compress_level=6)
    elif image_format == "webp":
        img.save(buf, format="WEBP", lossless=True, quality=80, method=4, exact=True)
    else:
        raise ValueError(f"image format {image_format!r} is not one of {IMAGE_FORMATS}")
    return buf.getvalue()
