"""The torch image path (--image-ops torch): which images the prepare task leaves to the encoder
actor, decoding and fitting them there (device="cpu" here, the same code as on CUDA), and the
actor's decisions with them (tests/test_generate.py runs it through the CLI).

Pixels against the pil path: the same JPEG decode (libjpeg on CPU) and Pillow's resampling done in
torch (its fixed-point weights, exact integer sums) give stages.imaging.decode.load_pixels' pixels, bit
for bit: the tolerance on CPU is 0. On CUDA only nvJPEG's decode differs.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from stages.imaging.compose import compose_loser, decided_pairs
from stages.mixing.decide import UnitDecider
from stages.imaging.device import decode_jpegs, encode_jpegs, fit, unit_images
from stages.imaging.prepare import prepare_unit
from stages.imaging.decode import decode_rgb, device_jpeg_size, load_pixels
from stages.inputs.records import InputError, InputRecord
from stages.model.factory import load_encoder
from stages.imaging.codec import encode_image
from tests.conftest import make_image

pytestmark = pytest.mark.timeout(300)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def jpeg(pixels: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", **({"quality": 90} | kw))
    return buf.getvalue()


def textured(seed: int, size) -> np.ndarray:
    """Gradients, a hard-edged block and fine noise (W x H = `size`): where resampling kernels differ most."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full_like(xx, rng.integers(0, 255))], -1)
    img[h // 4 : h // 2 + 1, w // 3 : w // 2 + 1] = rng.integers(0, 255, size=3)
    return np.clip(img + rng.integers(-60, 60, size=img.shape), 0, 255).astype(np.uint8)


def device_fit(data: bytes, size, mode="pad", fill=(122, 116, 104), interpolation="bicubic") -> np.ndarray:
    (image,) = decode_jpegs([data], "cpu")
    return fit(image[None], size, mode, fill, interpolation)[0].numpy()


# --- which images go to the actor ------------------------------------------------------------


def test_only_plain_jpegs_are_left_to_the_actor():
    img = make_image(0, (48, 32))
    plain = jpeg(img)
    assert device_jpeg_size(plain) == (32, 48)
    assert device_jpeg_size(jpeg(img[..., 0])) == (32, 48)  # greyscale: decoded as R = G = B either way
    rotated = Image.fromarray(img).getexif()
    rotated[0x0112] = 6
    upright = Image.fromarray(img).getexif()
    upright[0x0112] = 1
    assert device_jpeg_size(jpeg(img, exif=upright.tobytes())) == (32, 48)
    cmyk = io.BytesIO()
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(cmyk, "JPEG")
    png = io.BytesIO()
    Image.fromarray(img).save(png, "PNG")
    bomb = bytearray(plain)
    sof = bomb.index(b"\xff\xc0")
    bomb[sof + 5 : sof + 9] = (65000).to_bytes(2, "big") * 2
    arithmetic = plain.replace(b"\xff\xc0", b"\xff\xc9", 1)  # SOF9: arithmetic coding, which nvJPEG does not decode
    for refused in (jpeg(img, exif=rotated.tobytes()), cmyk.getvalue(), png.getvalue(), bytes(bomb), arithmetic,
                    jpeg(img, progressive=True),  # one at a time on the GPU, Huffman on the actor's CPU
                    plain[: len(plain) // 2], plain + b"\x00trailer", b"", b"not an image"):
        assert device_jpeg_size(refused) is None


def test_decoded_and_fitted_jpeg_is_pils_bit_for_bit():
    """Every resize mode and interpolation, sizes that shrink, grow, keep one side or are one pixel."""
    fill = (122, 116, 104)
    for seed, size in enumerate([(80, 60), (33, 17), (1, 1), (1, 300), (300, 2), (64, 64), (96, 40)]):
        for kw in ({}, {"subsampling": 0}, {"progressive": True}):
            data = jpeg(textured(seed, size), **kw)
            (decoded,) = decode_jpegs([data], "cpu")
            assert np.array_equal(decoded.permute(1, 2, 0).numpy(), np.asarray(decode_rgb(data)))
            for mode in ("pad", "center-crop", "squash"):
                for interpolation in ("bicubic", "bilinear"):
                    expected = load_pixels(data, (64, 64), mode, fill, interpolation)[0]
                    assert np.array_equal(device_fit(data, (64, 64), mode, fill, interpolation), expected)
    small, large = jpeg(textured(7, (80, 60))), jpeg(textured(8, (640, 480)))  # 3.7x up; the GPU geometry
    for data, target, interpolation in ((small, (224, 224), "bilinear"), (small, (224, 224), "bicubic"),
                                        (large, (336, 336), "bicubic")):
        assert np.array_equal(device_fit(data, target, "pad", fill, interpolation),
                              load_pixels(data, target, "pad", fill, interpolation)[0])


def test_torch_interpolate_alone_is_not_pils():
    """Why the weights are Pillow's own: torch's antialiased bicubic is the same kernel in float, and
    lands levels away from Pillow's at sharp edges (this test fails if that ever changes, and then
    the simpler call would do)."""
    import torch.nn.functional as F

    data = jpeg(textured(3, (640, 480)))
    expected = load_pixels(data, (224, 224), "squash")[0].astype(int)
    (decoded,) = decode_jpegs([data], "cpu")
    plain = F.interpolate(decoded[None].float(), size=(224, 224), mode="bicubic", antialias=True, align_corners=False)
    plain = plain.round().clamp(0, 255)[0].permute(1, 2, 0).numpy().astype(int)
    assert np.abs(plain - expected).max() >= 2


def test_unit_images_join_both_decoders_and_fall_back_to_pil(tmp_path):
    """A unit of plain JPEGs (left to the actor), a PNG and a CMYK JPEG (decoded by the prepare
    task), and a JPEG that passes the header check but no decoder takes (PIL names it)."""
    images = {f"{i}.jpg": jpeg(textured(i, (70 + i, 50))) for i in range(3)}
    png = io.BytesIO()
    Image.fromarray(textured(9, (30, 40))).save(png, "PNG")
    cmyk = io.BytesIO()
    Image.new("CMYK", (20, 20), (255, 0, 255, 0)).save(cmyk, "JPEG")
    plain = images["0.jpg"]
    images |= {"p.png": png.getvalue(), "cmyk.jpg": cmyk.getvalue(),
               "headless.jpg": plain[: plain.index(b"\xff\xda")] + b"\xff\xd9"}  # frame header, no scan
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    order = ["0.jpg", "p.png", "1.jpg", "cmyk.jpg", "headless.jpg", "2.jpg"]
    records = [InputRecord(name, ("file", name)) for name in order]
    unit = prepare_unit(0, 0, records, (64, 64), "pad", str(tmp_path), image_ops="torch")
    assert [d is not None for d in unit.jpegs] == [True, False, True, False, True, True]
    assert len(unit.pixels) == 2 and [r["status"] for r in unit.rows] == ["ok"] * 6
    got = unit_images(unit, (64, 64), "pad", (122, 116, 104), "bicubic", "cpu")
    assert got.counts == {"host_decoded": 2, "device_decoded": 3, "device_refused": 1}
    with pytest.raises(InputError) as pil_error:
        decode_rgb(images["headless.jpg"])
    assert got.errors == {4: str(pil_error.value)} and str(pil_error.value).startswith("corrupt_image")
    for i, name in enumerate(order):
        if name.endswith((".png", "cmyk.jpg")):  # the prepare task's own pixels, as they were
            assert np.array_equal(got.pixels[i].numpy(), load_pixels(images[name], (64, 64), "pad")[0])
        elif i not in got.errors:
            assert np.array_equal(got.pixels[i].numpy(), device_fit(images[name], (64, 64)))


def test_the_actor_decides_on_the_images_it_fitted_and_can_encode_them(tiny_model_config, tmp_path):
    """The decider's winners are the fitted images, its rows mark what no decoder took as failed,
    and with encode_quality it returns the JPEGs a write task would make from the same pairs."""
    for i in range(5):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(textured(i, (60, 44 + 4 * i))))
    bad = jpeg(textured(7, (20, 20)))
    (tmp_path / "bad.jpg").write_bytes(bad[: bad.index(b"\xff\xda")] + b"\xff\xd9")  # frame header, no scan
    records = [InputRecord(f"s{i}", ("file", f"{i}.jpg")) for i in range(5)] + [InputRecord("bad", ("file", "bad.jpg"))]
    encoder = load_encoder(str(tiny_model_config), "none", merge=16)
    common = dict(method="mergemix", lam="beta:1.0", lam_mode="area", seed=3, batch_size=4, describe={})

    def prepared():
        return prepare_unit(0, 0, records, (64, 64), "pad", str(tmp_path), image_ops="torch")

    decided = UnitDecider(encoder, **common).decide(prepared())
    assert [r["status"] for r in decided.rows] == ["ok"] * 5 + ["failed"]
    assert decided.rows[-1]["error"].startswith("corrupt_image") and decided.rows[-1]["orig_size"] is None
    assert decided.images == {"host_decoded": 0, "device_decoded": 5, "device_refused": 1, "failed": 1}
    expected = np.stack([device_fit((tmp_path / f"{i}.jpg").read_bytes(), (64, 64)) for i in range(5)])
    assert np.array_equal(decided.winners, expected)
    sal = encoder.saliency_from_pixels(torch.from_numpy(expected))  # the encoder saw exactly the winners
    np.testing.assert_allclose([r["saliency"] for r in decided.rows[:5]], sal.grid.flatten(1).numpy(), rtol=1e-5,
                               atol=1e-7)
    pairs = decided_pairs(decided, np.zeros((0, 64, 64, 3), np.uint8))
    encoded = UnitDecider(encoder, **common, encode_quality=90).decide(prepared())
    assert encoded.winners is None and encoded.masks.tolist() == decided.masks.tolist()
    for i, key in enumerate(decided.ok_keys):
        pair = pairs[key]
        assert np.array_equal(pair.loser, compose_loser(expected[i], expected[decided.partners[i]], pair.mask))
        assert encoded.encoded[i] == (encode_image(pair.winner, "jpg", 90), encode_image(pair.loser, "jpg", 90))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fit_is_exact_and_nvjpeg_close_to_libjpeg():
    """On CUDA the fit of the same decoded image equals the CPU's bit for bit (exact integer sums);
    nvJPEG's decode differs from libjpeg's a little. Those bounds are expectations: no GPU run has
    checked them yet."""
    datas = [jpeg(textured(i, (640, 480))) for i in range(4)] + [jpeg(textured(9, (333, 500)))]
    for data, image in zip(datas, decode_jpegs(datas, "cuda")):
        (cpu,) = decode_jpegs([data], "cpu")
        ref = fit(cpu[None], (336, 336), "pad", (122, 116, 104))[0]
        assert torch.equal(fit(cpu[None].cuda(), (336, 336), "pad", (122, 116, 104))[0].cpu(), ref)
        diff = (fit(image[None], (336, 336), "pad", (122, 116, 104))[0].cpu().int() - ref.int()).abs().float()
        assert diff.mean() <= 1.0 and diff.flatten().kthvalue(int(0.999 * diff.numel())).values <= 8
    winners = torch.stack([fit(d[None], (336, 336))[0] for d in decode_jpegs(datas[:2], "cpu")])
    for data, winner in zip(encode_jpegs(winners.cuda(), 95), winners):
        assert np.abs(pixels(data).astype(int) - winner.numpy().astype(int)).mean() < 2
