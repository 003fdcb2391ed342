"""GPU figures (one H100 or H200): encoder images/s merged vs un-merged for several batch
sizes and with torch.compile, then end-to-end `generate` pairs/s with all the node's cores.

Not run by this project yet (no GPU was available); on a GPU node:

    python bench/gpu.py                                   # ViT-L-14-336, R=288, bf16, random weights
    python bench/gpu.py --pairs 16000 --batches 128,256 --no-compile
    python bench/gpu.py --device cpu --model ViT-S-16 --merge 64 --batches 8 --pairs 64 --samples-per-shard 16   # smoke test

Inputs are synthetic 640x480 JPEGs (about the size of COCO images in LLaVA-665k), written
once into the scratch folder. Steady-state pairs/s as in bench/common.py. The codec floor
of one core at the model geometry (bench/codec.py) times the cores is printed beside it:
the CPU bound of the pipeline on this node.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from codec import codec_floor
from common import SCRATCH, init_ray, large_input, print_table, run_generate, save
from stages.tower import load_encoder, model_geometry


def encoder_rate(enc, batch: int, iters: int, compiled: bool) -> float:
    h, w = enc.image_size
    x = torch.randint(0, 256, (batch, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fn = torch.compile(enc.saliency_from_pixels, dynamic=False) if compiled else enc.saliency_from_pixels
    sync = torch.cuda.synchronize if enc.device.type == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up (and compilation)
        fn(x)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn(x)
    sync()
    return iters * batch / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-L-14-336")
    ap.add_argument("--merge", type=int, default=288)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="64,128,256")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--pairs", type=int, default=16000)
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: this benchmark needs one (see --device cpu for a smoke test)")

    common = dict(device=args.device, precision=args.precision)
    merged = load_encoder(args.model, "none", merge=args.merge, **common)
    plain = load_encoder(args.model, "none", merge=0, **common)
    plain.visual.load_state_dict(merged.visual.state_dict())
    enc_rows, enc_results = [], []
    for batch in [int(b) for b in args.batches.split(",")]:
        for compiled in ([False] if args.no_compile else [False, True]):
            try:
                rates = {name: encoder_rate(e, batch, args.iters, compiled) for name, e in (("unmerged", plain), ("merged", merged))}
            except Exception as exc:  # torch.compile may not handle the merge ops on every version: record it
                enc_results.append({"batch": batch, "compile": compiled, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            enc_results.append({"batch": batch, "compile": compiled, **rates})
            enc_rows.append([batch, "yes" if compiled else "no", f"{rates['unmerged']:.0f}", f"{rates['merged']:.0f}",
                             rates["merged"] / rates["unmerged"]])
    print_table(f"Encoder {args.model} R={args.merge} {args.precision} on {args.device}",
                ["batch", "compile", "un-merged img/s", "merged img/s", "speed-up"], enc_rows)
    best_batch = max((r for r in enc_results if "merged" in r and not r["compile"]), key=lambda r: r["merged"])["batch"]
    del merged, plain
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()

    llava, root = large_input(args.pairs)
    (size, _), (patch, _) = model_geometry(args.model)
    floor = codec_floor(llava, root, min(500, args.pairs), size, patch)
    cores = init_ray()
    run = run_generate(SCRATCH / "out-gpu", input=str(llava), image_root=str(root), model=args.model, pretrained="none",
                       merge=args.merge, precision=args.precision, device=args.device.split(":")[0],
                       batch_size=best_batch, samples_per_shard=args.samples_per_shard)
    print_table(f"End to end on {cores} cores + {args.device}", ["measure", "value"], [
        ["pipeline pairs/s (steady state)", f"{run['steady_per_s']:.0f}"],
        ["goal", ">= 2500 pairs/s"],
        ["codec floor, 1 core", f"{floor:.0f} pairs/s"],
        [f"CPU bound ({cores} x floor)", f"{cores * floor:.0f} pairs/s"],
        ["encoder batch", best_batch],
    ])
    save("gpu", {"args": vars(args), "cores": cores, "encoder": enc_results, "pipeline": run,
                 "pipeline_pairs_per_s": run["steady_per_s"], "codec_floor_per_core": floor,
                 "cpu_bound_pairs_per_s": cores * floor, "goal": 2500, "cpu_threads": os.cpu_count()}, args.out)


if __name__ == "__main__":
    main()
