"""Cost of the image-side negatives (stages.mixing.negatives) per 336 x 336 image, against composing a
mergemix loser (stages.imaging.compose.compose_loser, a 24 x 24 patch selection), in one run.

Per method: draw + make per image (best of --rounds, the rounds interleaved over the methods so
drift in machine load hits all alike), its ratio to compose_loser, and what storing the loser
costs: a JPEG (q95, 4:4:4) and a PNG (level 6) encode, as stages.writer encodes, with sizes.
Input: `stages.sample_data` pictures (a shape on a textured background) resized to 336 x 336.

    python bench/negatives.py
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
from PIL import Image

from common import print_table, save  # first: it puts the checkout on sys.path
from stages.mixing import negatives as N
from stages.imaging.compose import compose_loser
from stages.mixing.ratios import sample_rng
from stages.samples.demo import draw_sample
from stages.imaging.codec import encode_image

SIZE = 336
GRID = 24  # ViT-L/14 at 336 px

ROWS = [  # label, method, settings
    ("crop", "crop", N.NegativeSettings()),
    ("noise pixel t=500", "noise", N.NegativeSettings()),
    ("noise normalized t=500", "noise", N.NegativeSettings(noise_space="normalized")),
    ("pixelate k=16", "pixelate", N.NegativeSettings()),
    ("pixelate k=32", "pixelate", N.NegativeSettings(pixelate=32)),
    ("image-blur r=20", "image-blur", N.NegativeSettings()),
    ("image-blur r=40", "image-blur", N.NegativeSettings(blur_radius=40.0)),
    ("rotate", "rotate", N.NegativeSettings()),
    ("blank", "blank", N.NegativeSettings()),
    ("other", "other", N.NegativeSettings()),
]


def images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [np.asarray(draw_sample(rng)[0].resize((SIZE, SIZE), Image.BICUBIC)) for _ in range(n)]


def time_negatives(method: str, settings: N.NegativeSettings, winners: list[np.ndarray]) -> tuple[float, list]:
    n = len(winners)
    losers = []
    start = time.perf_counter()
    for i, winner in enumerate(winners):
        params = N.draw(method, sample_rng(0, f"{i:06d}", method), SIZE, SIZE, settings)
        losers.append(N.make(method, winner, winners[(i + 1) % n], params).loser)
    return (time.perf_counter() - start) / n, losers


def time_compose(winners: list[np.ndarray], masks: list[np.ndarray]) -> float:
    n = len(winners)
    start = time.perf_counter()
    for i, winner in enumerate(winners):
        compose_loser(winner, winners[(i + 1) % n], masks[i])
    return (time.perf_counter() - start) / n


def time_encode(losers: list[np.ndarray], fmt: str) -> tuple[float, float]:
    start = time.perf_counter()
    sizes = [len(encode_image(x, fmt)) for x in losers]
    return (time.perf_counter() - start) / len(losers), float(np.mean(sizes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    winners = images(args.images)
    rng = np.random.default_rng(1)
    masks = [np.where(rng.random((GRID, GRID)) < 0.5, 255, 0).astype(np.uint8) for _ in winners]
    labels = ["compose"] + [label for label, _, _ in ROWS]
    best = {label: {"build": math.inf, "jpg": math.inf, "png": math.inf} for label in labels}
    sizes = {}
    composed = [compose_loser(w, winners[(i + 1) % len(winners)], masks[i]) for i, w in enumerate(winners)]
    for _ in range(args.rounds):
        losers = {"compose": composed}
        best["compose"]["build"] = min(best["compose"]["build"], time_compose(winners, masks))
        for label, method, settings in ROWS:
            seconds, losers[label] = time_negatives(method, settings, winners)
            best[label]["build"] = min(best[label]["build"], seconds)
        for label in labels:
            for fmt in ("jpg", "png"):
                seconds, sizes[label, fmt] = time_encode(losers[label], fmt)
                best[label][fmt] = min(best[label][fmt], seconds)

    rows, results = [], {}
    for label in labels:
        b = best[label]
        ratio = b["build"] / best["compose"]["build"]
        results[label] = {"build_ms": 1e3 * b["build"], "vs_compose": ratio, "jpg_ms": 1e3 * b["jpg"],
                          "jpg_kb": sizes[label, "jpg"] / 1e3, "png_ms": 1e3 * b["png"],
                          "png_kb": sizes[label, "png"] / 1e3}
        rows.append([label, 1e3 * b["build"], ratio, 1e3 * b["jpg"], sizes[label, "jpg"] / 1e3, 1e3 * b["png"],
                     sizes[label, "png"] / 1e3])
    print_table(f"negatives per {SIZE}x{SIZE} image ({args.images} images, best of {args.rounds} rounds; "
                "compose = mergemix's patch selection; encodes of the loser as stages.writer)",
                ["loser", "build ms", "x compose", "jpg ms", "jpg KB", "png ms", "png KB"], rows)
    save("negatives", {"images": args.images, "rounds": args.rounds, "size": SIZE, "grid": GRID,
                       "note": "CPU times on a shared machine: compare within this run only", "results": results},
         args.out)


if __name__ == "__main__":
    main()
