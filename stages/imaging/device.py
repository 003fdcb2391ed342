"""The torch image path (`--image-ops torch`), run in the encoder actor: the JPEGs a prepare task
left encoded are decoded in batches on the encoder's device (nvJPEG through torchvision on CUDA,
libjpeg on CPU), fitted to the encoder geometry in torch (pad / center-crop / squash and Pillow's
resize, as stages.imaging.decode does with PIL), and joined with the images the prepare task decoded
itself (stages.imaging.decode.device_jpeg_size decides which) into the one uint8 batch the encoder
sees and the writer stores. Optionally the actor also JPEG-encodes winners and losers
(`encode_jpegs`), so that write tasks only pack tars.

Pixels against the pil path: resampling is Pillow's own, reproduced exactly (stages.imaging.resample).
On CPU the JPEG decode is libjpeg's, as Pillow's, so the torch path's pixels are the pil path's, bit for bit
(tests/test_device_images.py; bench/image_ops.py on photos). On CUDA nvJPEG decodes: its IDCT and
chroma upsampling are not libjpeg's, so there the pixels differ by what the decoders differ (not yet
measured). The price of exactness is float64: about 1.3 GFLOP per 640x480 image padded to 336 px,
tens of microseconds on an H100's FP64 tensor cores.

torchvision 0.29 deprecated its image codecs in favour of TorchCodec; they still ship and are what
this path uses (their DeprecationWarning is silenced here), a move to TorchCodec is for later.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from stages.imaging.resample import resample
from stages.imaging.decode import RESIZE_MODES, load_pixels
from stages.units import PreparedUnit
from stages.inputs.records import InputError

DECODE_CHUNK = 256  # JPEGs decoded per call: bounds the device memory of decoded, not yet fitted images
FIT_PIXELS = 1 << 24  # canvas pixels resampled per call (about 400 MB of float64 RGB)


@dataclass
class UnitImages:
    """A unit's ok images on the device, and what became of the JPEGs left to the actor."""

    pixels: torch.Tensor  # (n_ok, H, W, 3) uint8 on the device, in ok order; a failed row's slot is zeros
    errors: dict[int, str] = field(default_factory=dict)  # ok index -> error, for JPEGs no decoder could take
    counts: dict = field(default_factory=dict)  # device / host / fallback decodes


@contextlib.contextmanager
def _codecs():
    """torchvision.io's JPEG codecs, without their deprecation warning on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision",
                                DeprecationWarning)
        yield


def decode_jpegs(datas: list[bytes], device) -> list[torch.Tensor | None]:
    """(3, h, w) uint8 RGB per JPEG on `device`, None where this decoder refuses one. On CUDA the
    list goes to nvJPEG in one batched call; a bad image fails the whole call, so then each is
    tried alone."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    with _codecs():
        if device.type == "cuda" and tensors:
            try:
                return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
            except Exception:
                pass
        decoded: list[torch.Tensor | None] = []
        for t in tensors:
            try:
                decoded.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
            except Exception:  # PIL decides what it is (stages.imaging.decode names the reason)
                decoded.append(None)
        return decoded


def fit(images: torch.Tensor, size: tuple[int, int], mode: str = "pad", fill=(0, 0, 0),
        interpolation: str = "bicubic") -> torch.Tensor:
    """(n, 3, h, w) uint8 images of one size -> (n, H, W, 3) uint8 at `size` = (H, W), by the rules of
    stages.imaging.decode.resize_to: pad to a square with `fill` then resize, resize the short side then
    crop the centre, or resize straight."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    n, _, h, w = images.shape
    th, tw = size
    if mode == "pad":
        side = max(h, w)
        canvas = torch.empty((n, 3, side, side), dtype=torch.float64, device=images.device)
        canvas[:] = torch.tensor(fill, dtype=torch.float64, device=images.device).view(1, 3, 1, 1)
        top, left = (side - h) // 2, (side - w) // 2
        canvas[:, :, top : top + h, left : left + w] = images
        out = resample(canvas, (th, tw), interpolation)
    elif mode == "center-crop":
        scale = max(tw / w, th / h)
        nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
        top, left = (nh - th) // 2, (nw - tw) // 2
        out = resample(images, (nh, nw), interpolation, crop=(top, left, th, tw))
    else:
        out = resample(images, (th, tw), interpolation)
    return out.to(torch.uint8).permute(0, 2, 3, 1)


def unit_images(unit: PreparedUnit, size: tuple[int, int], resize: str, fill, interpolation: str,
                device) -> UnitImages:
    """The unit's ok images as one batch on `device`: the JPEGs left encoded decoded and fitted
    here, the rest as the prepare task decoded them. A JPEG this decoder refuses goes through
    stages.imaging.decode.load_pixels like any other image: it is ok with Pillow's pixels, or failed
    with Pillow's reason."""
    device = torch.device(device)
    jpegs = unit.jpegs if unit.jpegs is not None else [None] * len(unit.pixels)
    out = torch.empty((len(jpegs), *size, 3), dtype=torch.uint8, device=device)
    host = [i for i, data in enumerate(jpegs) if data is None]
    if host:
        out[torch.tensor(host, device=device)] = torch.from_numpy(unit.pixels).to(device)
    todo = [i for i, data in enumerate(jpegs) if data is not None]
    errors: dict[int, str] = {}
    fallback = 0
    for start in range(0, len(todo), DECODE_CHUNK):
        chunk = todo[start : start + DECODE_CHUNK]
        decoded = decode_jpegs([jpegs[i] for i in chunk], device)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in zip(chunk, decoded):
            if image is not None:
                by_size.setdefault(tuple(image.shape[1:]), []).append(i)
                continue
            fallback += 1
            try:  # what this decoder refuses, Pillow decodes or names
                out[i] = torch.from_numpy(load_pixels(jpegs[i], size, resize, fill, interpolation)[0]).to(device)
            except InputError as exc:
                errors[i] = str(exc)
                out[i] = 0
        images = dict(zip(chunk, decoded))
        for (h, w), idx in by_size.items():  # images of one size are fitted together
            side = max(h, w) if resize == "pad" else max(h, w, *size)  # the largest image a pass holds
            step = max(1, FIT_PIXELS // (side * side))
            for s in range(0, len(idx), step):
                part = idx[s : s + step]
                out[torch.tensor(part, device=device)] = fit(torch.stack([images[i] for i in part]), size, resize,
                                                             fill, interpolation)
    counts = {"host_decoded": len(host), "device_decoded": len(todo) - fallback, "device_refused": fallback}
    return UnitImages(out, errors, counts)


def to_host(pixels: torch.Tensor) -> np.ndarray:
    """A device batch as a numpy array: through a pinned buffer on CUDA (a fast copy; the caching
    host allocator reuses it across units)."""
    if pixels.device.type != "cuda":
        return pixels.numpy()
    host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
    host.copy_(pixels, non_blocking=True)
    torch.cuda.current_stream(pixels.device).synchronize()
    return host.numpy()


def encode_jpegs(images: torch.Tensor, quality: int) -> list[bytes]:
    """JPEG bytes of (n, H, W, 3) uint8 images where they are. On CUDA, nvJPEG (4:4:4 chroma, as the
    writer's own encoder); on CPU the writer's encoder itself (stages.imaging.codec.encode_image), so the
    bytes are those a write task would make."""
    if images.device.type != "cuda":
        from stages.imaging.codec import encode_image

        return [encode_image(image, "jpg", quality) for image in images.numpy()]
    from torchvision.io import encode_jpeg

    with _codecs():
        encoded = encode_jpeg([image.permute(2, 0, 1) for image in images], quality=quality)
    flat = to_host(torch.cat(encoded))  # one copy back for the whole batch
    ends = np.cumsum([len(e) for e in encoded])
    return [flat[a:b].tobytes() for a, b in zip(np.r_[0, ends[:-1]], ends)]

