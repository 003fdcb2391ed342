"""Pipeline pairs/s vs encoder-only images/s, same machine, model and batch, in one run.

Encoder-only: the merged tower's saliency on uint8 pixels already at the model geometry
(what an encoder actor does per batch), in this process with one torch thread (what one
CPU encoder actor runs) and with as many threads as cores (for reference: on a shared
machine the multi-threaded figure suffers most from other load).
Pipeline: `generate` on local Ray with the same model, steady-state pairs/s
(bench/common.py), with the default sizing and with one encoder actor per core. The ratio
is pipeline pairs/s / (actors x one-thread encoder images/s): the share of the model's own
speed that the whole pipeline keeps. On a GPU: pipeline / encoder images/s on that GPU.
Rounds alternate the measurements; best of each.

    python bench/pipeline_vs_encoder.py                              # ViT-B-16 @224, R=98, random weights
    python bench/pipeline_vs_encoder.py --model ViT-L-14-336 --merge 288 --pairs 4096 --batch 128   # on a GPU node
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import SCRATCH, init_ray, print_table, run_generate, sample_input, save
from stages.model.factory import load_encoder
from stages.imaging.decode import load_pixels


def encoder_only(model: str, merge: int, batch: int, device: str, precision: str, threads: int, llava, root,
                 iters: int) -> float:
    """Images/s of the merged saliency on real prepared pixels."""
    import json

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        enc = load_encoder(model, "none", merge=merge, device=device, precision=precision)
        rows = json.loads(llava.read_text())[:batch]
        pixels = np.stack([load_pixels((root / r["image"]).read_bytes(), enc.image_size, "pad")[0] for r in rows])
        x = torch.from_numpy(pixels)
        sync = torch.cuda.synchronize if enc.device.type == "cuda" else (lambda: None)
        enc.saliency_from_pixels(x)  # warm-up
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            enc.saliency_from_pixels(x)
        sync()
        return iters * batch / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--merge", type=int, default=98)
    ap.add_argument("--pairs", type=int, default=160, help="samples per pipeline run")
    ap.add_argument("--batch", type=int, default=16, help="encoder batch; also the pipeline's --batch-size")
    ap.add_argument("--samples-per-shard", type=int, default=16)
    ap.add_argument("--iters", type=int, default=4, help="encoder-only batches per round")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-default", action="store_true", help="do not run the default-sizing pipeline")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    llava, root = sample_input(args.pairs)
    cores = init_ray()
    gpu = args.device.startswith("cuda")
    threads = torch.get_num_threads() if gpu else cores
    flags = dict(input=str(llava), image_root=str(root), model=args.model, pretrained="none", merge=args.merge,
                 samples_per_shard=args.samples_per_shard, batch_size=args.batch, device=args.device,
                 precision=args.precision)
    variants = {"per_core": None if gpu else cores}
    if not args.skip_default:
        variants["default"] = None
    if gpu:
        variants = {"default": None}
    enc_runs, enc1_runs, runs = [], [], {k: [] for k in variants}
    for r in range(args.rounds):
        enc_runs.append(encoder_only(args.model, args.merge, args.batch, args.device, args.precision, threads,
                                     llava, root, args.iters))
        print(f"round {r}: encoder-only {enc_runs[-1]:.2f} images/s ({threads} threads)", flush=True)
        if not gpu:
            enc1_runs.append(encoder_only(args.model, args.merge, args.batch, args.device, args.precision, 1,
                                          llava, root, args.iters))
            print(f"round {r}: encoder-only {enc1_runs[-1]:.2f} images/s (1 thread)", flush=True)
        for name, workers in variants.items():
            run = run_generate(SCRATCH / f"out-pipeline-{name}", workers=workers, **flags)
            runs[name].append(run)
            print(f"round {r}: pipeline ({name}, {run['sizing']['actors']} actors) {run['steady_per_s']:.2f} pairs/s "
                  f"steady ({run['wall_s']:.1f} s wall)", flush=True)
    encoder = max(enc_runs)
    encoder1 = max(enc1_runs) if enc1_runs else None
    best = {k: max(v, key=lambda x: x["steady_per_s"]) for k, v in runs.items()}
    rows = [[f"encoder only ({threads} threads)", f"{encoder:.2f} images/s", "", ""]]
    if encoder1:
        rows.append(["encoder only (1 thread)", f"{encoder1:.2f} images/s", "", ""])
    ratios = {}
    for name, run in best.items():
        reference = run["sizing"]["actors"] * encoder1 if encoder1 else encoder
        ratios[name] = run["steady_per_s"] / reference
        rows.append([f"pipeline, {name} sizing", f"{run['steady_per_s']:.2f} pairs/s",
                     f"{run['sizing']['actors']} x {run['sizing']['threads']} thread(s)", ratios[name]])
    print_table(f"Pipeline vs encoder only: {args.model} R={args.merge} batch {args.batch}, {args.device}, {cores} cores",
                ["measure", "rate", "actors", "ratio: pipeline / (actors x encoder) (goal >= 0.85)"], rows)
    save("pipeline_vs_encoder", {"args": vars(args), "cores": cores, "encoder_threads": threads, "encoder_runs": enc_runs,
                                 "encoder_1thread_runs": enc1_runs, "pipeline_runs": runs,
                                 "encoder_images_per_s": encoder, "encoder_1thread_images_per_s": encoder1,
                                 "pipeline_pairs_per_s": {k: v["steady_per_s"] for k, v in best.items()},
                                 "ratios": ratios, "goal": 0.85}, args.out)


if __name__ == "__main__":
    main()
