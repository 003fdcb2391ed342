"""How often a mask depends on which CPU kernels computed the saliency, and whether rounding the
saliency before ranking would help.

The same prepared pixels go through the same tower in fresh processes, one per combination of
torch's CPU capability (ATEN_CPU_CAPABILITY: default, avx2, and avx512 where this CPU has it) and
torch threads (1, 4): these stand in for other machines' kernels. Against the first combination
it reports the largest relative saliency difference, the share of rows whose merges differ, and
the share of rows whose `mergemix` mask differs (5 lam draws per row from beta:1), ranking the
saliency as generate does and after rounding the normalised saliency (each row summing to 1) to
a precision q. It also reports how close the data comes to ties: the share of rows whose top-k
boundary (token level) or merges come within 1e-4 of one.

    python bench/determinism.py --photos DIR                         # padded crops of photographs
    python bench/determinism.py --demo                               # the sample-data demo pictures
    python bench/determinism.py --photos DIR --model ViT-B-16 --merge 98
Without --model: the tests' tiny tower (64 px, 4 blocks) with --merge 16.
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import machine, print_table, save, tiny_model  # noqa: F401  (common puts the checkout on sys.path)
from stages.imaging.decode import load_pixels
from stages.mixing.masks import topk_margin, topk_patch_mask
from stages.mixing.ratios import parse_lam_spec, sample_lams
from stages.model.factory import load_encoder
from stages.model.tower import resolve_tower
from stages.samples.demo import write_sample_data

ROUNDINGS = (None, 1e-6, 1e-5, 1e-4, 1e-3)
LAM_DRAWS = 5


def capabilities() -> list[str]:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return ["default", "avx2"] + (["avx512"] if " avx512f" in flags else [])


def photo_crops(folder: Path, n: int, seed: int) -> list[bytes]:
    """n JPEGs cut from the photographs in `folder` at random aspect ratios (1:2 to 2:1), so that
    padding to a square leaves a flat border, as LLaVA pads."""
    photos = [Image.open(p).convert("RGB") for p in sorted(folder.iterdir()) if p.suffix.lower() in (".jpg", ".png")]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
        cw = int(min(w, h * aspect) * rng.uniform(0.4, 1.0))
        ch = max(8, int(cw / aspect))
        ch = min(ch, h)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        buf = io.BytesIO()
        img.crop((x0, y0, x0 + cw, y0 + ch)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def child(pixels_file: str, model: str, merge: int, threads: int, out: str) -> None:
    """One combination: saliency, token scores, sources and merge margins of every image."""
    torch.set_num_threads(threads)
    enc = load_encoder(model, "none", merge=merge)
    px = np.load(pixels_file)["pixels"]
    grids, tokens, sources, margins = [], [], [], []
    for s in range(0, len(px), 32):
        sal = enc.saliency_from_pixels(px[s:s + 32])
        grids.append(sal.grid.flatten(1).numpy())
        tokens.append(sal.token_scores.numpy())
        sources.append(sal.source.numpy())
        margins.append(enc.merge_margins(px[s:s + 32]).numpy())
    np.savez(out, grid=np.concatenate(grids), tokens=np.concatenate(tokens), source=np.concatenate(sources),
             merge_margin=np.concatenate(margins), capability=torch.backends.cpu.get_cpu_capability())


def masks(grid: np.ndarray, lam: np.ndarray, q: float | None) -> np.ndarray:
    g = torch.from_numpy(grid).double()
    if q is not None:
        g = torch.round(g / g.sum(dim=1, keepdim=True) / q) * q
    return topk_patch_mask(g, torch.from_numpy(lam)).numpy()


def tie_stats(result: dict, lams: np.ndarray, num_patches: int) -> dict:
    tokens, source = torch.from_numpy(result["tokens"]), torch.from_numpy(result["source"])
    sizes = torch.stack([torch.bincount(s, minlength=tokens.shape[1]) for s in source]).double()
    margins = np.stack([topk_margin(tokens, torch.from_numpy(np.floor(lam * num_patches)), sizes).numpy()
                        for lam in lams])
    grid = result["grid"]
    exact_grid = np.mean([[0 < k < num_patches and np.sort(row)[::-1][k - 1] == np.sort(row)[::-1][k]
                           for row, k in zip(grid, np.floor(lam * num_patches).astype(int))] for lam in lams])
    return {"rows": int(len(grid)), "grid_kth_equals_next": float(exact_grid),
            "boundary_margin_below_1e-4": float((margins < 1e-4).mean()),
            "boundary_margin_below_1e-5": float((margins < 1e-5).mean()),
            "boundary_tie_between_tokens": float((margins == 0).mean()),
            "merge_margin_below_1e-4": float((result["merge_margin"] < 1e-4).mean()),
            "merge_margin_min": float(result["merge_margin"].min())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=Path, help="folder of photographs (.jpg/.png)")
    ap.add_argument("--demo", action="store_true", help="use the sample-data demo pictures instead")
    ap.add_argument("--n", type=int, default=300, help="images")
    ap.add_argument("--model", default=None, help="open_clip model (random weights) [the tests' tiny tower]")
    ap.add_argument("--merge", type=int, default=16)
    ap.add_argument("--threads", default="1,4")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        pixels_file, model, merge, threads, out = args.child
        return child(pixels_file, model, int(merge), int(threads), out)

    model = args.model or str(tiny_model(image_size=64, patch=8, layers=4, width=64))
    tower = resolve_tower(model, "none")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.demo:
            write_sample_data(tmp / "demo", n=args.n, seed=0)
            data = [p.read_bytes() for p in sorted((tmp / "demo" / "images").iterdir())]
        else:
            data = photo_crops(args.photos, args.n, seed=0)
        pixels = np.stack([load_pixels(d, tower.image_size, "pad", tower.pad_rgb, tower.interpolation)[0] for d in data])
        np.savez(tmp / "pixels.npz", pixels=pixels)
        combos = [(cap, int(t)) for cap in capabilities() for t in args.threads.split(",")]
        results = {}
        for cap, threads in combos:
            out = tmp / f"{cap}-{threads}.npz"
            subprocess.run([sys.executable, __file__, "--child", str(tmp / "pixels.npz"), model, str(args.merge),
                            str(threads), str(out)], env=dict(os.environ, ATEN_CPU_CAPABILITY=cap), check=True,
                           stderr=subprocess.DEVNULL)
            results[(cap, threads)] = dict(np.load(out))

    keys = [f"{i:06d}" for i in range(len(pixels))]
    lams = np.stack([sample_lams(parse_lam_spec("beta:1.0"), seed, keys) for seed in range(LAM_DRAWS)])
    base_key = combos[0]
    base = results[base_key]
    num_patches = base["grid"].shape[1]
    rows, table = [], []
    for (cap, threads), r in results.items():
        rel = float(np.max(np.abs(r["grid"] - base["grid"]) / np.abs(base["grid"]).max(axis=1, keepdims=True)))
        merges = float((r["source"] != base["source"]).any(axis=1).mean())
        differ = {str(q): float(np.mean([(masks(r["grid"], lam, q) != masks(base["grid"], lam, q)).any(axis=1).mean()
                                         for lam in lams])) for q in ROUNDINGS}
        rows.append({"capability": cap, "threads": threads, "ran_as": str(r["capability"]), "max_rel_saliency_diff": rel,
                     "rows_with_other_merges": merges, "rows_with_other_mask": differ})
        table.append([f"{cap}/{threads}", f"{rel:.1e}", f"{merges:.2%}", *(f"{differ[str(q)]:.2%}" for q in ROUNDINGS)])
    ties = tie_stats(base, lams, num_patches)
    print_table(f"{len(pixels)} {'demo pictures' if args.demo else 'padded photo crops'}, {model}, R={args.merge}; "
                f"against {base_key[0]}/{base_key[1]}",
                ["kernels/threads", "max rel diff", "other merges", *(f"mask differs q={q}" for q in ROUNDINGS)], table)
    print_table("how close the data comes to ties (first combination)", list(ties), [list(ties.values())])
    save("determinism", {"data": "demo" if args.demo else f"photo crops of {args.photos}", "model": model,
                         "merge": args.merge, "lam_draws_per_row": LAM_DRAWS, "baseline": list(base_key),
                         "roundings": [str(q) for q in ROUNDINGS], "combinations": rows, "ties": ties}, args.out)


if __name__ == "__main__":
    main()
