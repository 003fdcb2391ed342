"""Codec floor vs the pipeline with the model cost removed (tiny tower), in one run.

Floor: one process, one core, per pair: read the file, decode + EXIF + RGB + pad-resize to
the encoder geometry, mix a loser, two JPEG encodes (quality 95, 4:4:4, as the writer
does), and append both to a tar. Nothing else: no hashes, mask, Parquet, fsync or model.

Pipeline: `generate` on local Ray with a tiny random tower at the same geometry, default
sizing, steady-state pairs/s (bench/common.py) divided by the machine's cores.
Each round measures the floor before and after the pipeline, so drift in machine load hits
both alike; best of each.

    python bench/codec.py                       # 224 px, 4000 pairs per pipeline round
    python bench/codec.py --image-size 336 --patch 28 --input 640x480 --pairs 2000   # the GPU geometry
"""
from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from common import SCRATCH, init_ray, large_input, print_table, run_generate, sample_input, save, tiny_model
from stages.imaging.decode import load_pixels
from stages.imaging.codec import encode_image


def codec_floor(llava: Path, root: Path, n: int, size: int, patch: int) -> float:
    """Pairs/s of the bare codec work on one core."""
    paths = [root / r["image"] for r in json.loads(llava.read_text())[:n]]
    grid = size // patch
    mask = np.random.default_rng(0).random((grid, grid)) < 0.5
    mask = np.kron(mask, np.ones((patch, patch), bool))[..., None]  # patch grid -> pixels
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        start = time.perf_counter()
        with open(Path(tmp) / "floor.tar", "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
            previous = None
            for i, path in enumerate(paths):
                pixels, _ = load_pixels(path.read_bytes(), (size, size), "pad")
                loser = np.where(mask, pixels, previous if previous is not None else pixels[::-1])
                for part, img in (("winner", pixels), ("loser", loser)):
                    data = encode_image(img, "jpg", 95)
                    info = tarfile.TarInfo(f"{i:06d}.{part}.jpg")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                previous = pixels
        return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--input", choices=["sample", "640x480"], default="sample",
                    help="sample-data images (160-320 px) or synthetic 640x480 JPEGs (COCO-sized, as bench/gpu.py)")
    ap.add_argument("--pairs", type=int, default=4000, help="samples per pipeline round")
    ap.add_argument("--floor-pairs", type=int, default=600, help="pairs per floor round")
    ap.add_argument("--samples-per-shard", type=int, default=500)
    ap.add_argument("--workers", type=int, default=None, help="encoder actors (default: the pipeline's own sizing)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    inputs = sample_input if args.input == "sample" else large_input
    llava, root = inputs(max(args.pairs, args.floor_pairs))
    model = tiny_model(args.image_size, args.patch)
    cores = init_ray()
    floors, runs = [], []
    for r in range(args.rounds):
        floors.append(codec_floor(llava, root, args.floor_pairs, args.image_size, args.patch))
        print(f"round {r}: floor {floors[-1]:.1f} pairs/s/core", flush=True)
        run = run_generate(SCRATCH / "out-codec", input=str(llava), image_root=str(root), model=str(model),
                           pretrained="none", merge=16, samples_per_shard=args.samples_per_shard,
                           workers=args.workers, batch_size=64)
        run["per_core"] = run["steady_per_s"] / cores
        runs.append(run)
        print(f"round {r}: pipeline {run['steady_per_s']:.1f} pairs/s steady ({run['wall_s']:.1f} s wall)", flush=True)
        floors.append(codec_floor(llava, root, args.floor_pairs, args.image_size, args.patch))  # after, too
        print(f"round {r}: floor {floors[-1]:.1f} pairs/s/core", flush=True)
    floor = max(floors)
    best = max(runs, key=lambda x: x["steady_per_s"])
    ratio = best["per_core"] / floor
    print_table(
        f"Codec floor vs pipeline, tiny tower at {args.image_size} px, {cores} cores",
        ["measure", "pairs/s", "pairs/s per core", "note"],
        [["codec floor (1 core)", floor, floor, f"decode+resize+mix+2 jpg+tar: {1000 / floor:.2f} ms per pair"],
         ["pipeline, tiny tower", best["steady_per_s"], best["per_core"],
          f"steady state, {best['units']} units: {1000 / best['per_core']:.2f} core-ms per pair"],
         ["ratio (goal >= 0.7)", "", ratio, "pipeline per core / floor"]],
    )
    save("codec", {"args": vars(args), "cores": cores, "floor_runs": floors, "pipeline_runs": runs,
                   "floor_pairs_per_s": floor, "pipeline_pairs_per_s": best["steady_per_s"],
                   "pipeline_per_core": best["per_core"], "floor_core_ms_per_pair": 1000 / floor,
                   "pipeline_core_ms_per_pair": 1000 / best["per_core"], "ratio": ratio, "goal": 0.7}, args.out)


if __name__ == "__main__":
    main()
