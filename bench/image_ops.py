"""The torch image path's pixels against the pil path's, on photographs: the same JPEG through
stages.imaging.decode.load_pixels (PIL) and through stages.imaging.device (decode on --device, Pillow's
resampling in torch), every resize mode, at the encoder geometry. Prints the largest and mean
difference and the share of values that differ, and the time per image of each path.

On CPU both decode with libjpeg and the torch path reproduces Pillow's resampling exactly, so the
difference is 0; on CUDA it is what nvJPEG's decode differs from libjpeg's.

    python bench/image_ops.py --photos DIR               # every .jpg/.png in DIR, re-encoded as JPEG q90
    python bench/image_ops.py --device cuda --photos DIR
Without --photos: synthetic 640x480 JPEGs (bench/common.py).
"""
from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import large_input, print_table, save
from stages.imaging.device import decode_jpegs, fit
from stages.imaging.decode import load_pixels

FILL = (122, 116, 104)


def jpegs(photos: str | None, n: int) -> dict[str, bytes]:
    if not photos:
        llava, root = large_input(n)
        return {p.name: p.read_bytes() for p in sorted((root / "images").glob("*.jpg"))[:n]}
    found = {}
    for path in sorted(Path(photos).iterdir()):
        if path.suffix.lower() in (".jpg", ".jpeg", ".png"):
            buf = io.BytesIO()
            Image.open(path).convert("RGB").save(buf, "JPEG", quality=90)  # baseline 4:2:0, as most datasets
            found[path.name] = buf.getvalue()
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default=None)
    ap.add_argument("--n", type=int, default=20, help="synthetic images without --photos")
    ap.add_argument("--size", type=int, default=336)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    images = jpegs(args.photos, args.n)
    rows, result = [], {}
    for mode in ("pad", "center-crop", "squash"):
        diffs, pil_s, torch_s = [], 0.0, 0.0
        for data in images.values():
            start = time.perf_counter()
            expected = load_pixels(data, (args.size, args.size), mode, FILL)[0]
            pil_s += time.perf_counter() - start
            start = time.perf_counter()
            (decoded,) = decode_jpegs([data], args.device)
            got = fit(decoded[None], (args.size, args.size), mode, FILL)[0].cpu().numpy()
            torch_s += time.perf_counter() - start
            diffs.append(np.abs(got.astype(int) - expected.astype(int)).ravel())
        d = np.concatenate(diffs)
        result[mode] = {"max": int(d.max()), "mean": float(d.mean()), "share_differing": float((d > 0).mean()),
                        "pil_ms_per_image": 1000 * pil_s / len(images), "torch_ms_per_image": 1000 * torch_s / len(images)}
        rows.append([mode, int(d.max()), f"{d.mean():.4f}", f"{(d > 0).mean():.3%}",
                     f"{1000 * pil_s / len(images):.1f}", f"{1000 * torch_s / len(images):.1f}"])
    print_table(f"torch image path vs pil, {len(images)} {'photos' if args.photos else 'synthetic 640x480 JPEGs'} "
                f"at {args.size} px, torch on {args.device}",
                ["resize", "max |diff|", "mean |diff|", "values differing", "pil ms/image", "torch ms/image"], rows)
    save("image_ops", {"args": vars(args), "images": sorted(images), "device": args.device, "result": result}, args.out)


if __name__ == "__main__":
    main()
