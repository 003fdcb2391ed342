"""Scaling on local Ray: 2 encoder actors (`--workers 2`) vs 1, in one run.

Each actor runs one torch thread, so on a 2-core machine one actor can use one core for
the model and two can use both. Measured for a tower whose cost dominates (ViT-S-16 at
224, random weights, R=64) and for the tiny tower (codec-bound: the model is negligible,
so this shows how the CPU tasks share the machine). Steady-state pairs/s
(bench/common.py); rounds alternate 1 and 2 workers; best of each.

    python bench/scaling.py
    python bench/scaling.py --model ViT-B-16 --merge 98 --pairs 160
"""
from __future__ import annotations

import argparse

from common import SCRATCH, init_ray, print_table, run_generate, sample_input, save, tiny_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-S-16")
    ap.add_argument("--merge", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=320, help="samples per run of the model-bound tower")
    ap.add_argument("--tiny-pairs", type=int, default=2000, help="samples per run of the tiny tower (0: skip)")
    ap.add_argument("--samples-per-shard", type=int, default=32)
    ap.add_argument("--tiny-samples-per-shard", type=int, default=200)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    workers = [int(w) for w in args.workers.split(",")]
    cores = init_ray()
    towers = {args.model: (args.pairs, str(args.model), args.merge, args.samples_per_shard)}
    if args.tiny_pairs:
        towers["tiny"] = (args.tiny_pairs, str(tiny_model()), 16, args.tiny_samples_per_shard)
    runs = {t: {w: [] for w in workers} for t in towers}
    for r in range(args.rounds):
        for tower, (n, model, merge, per_shard) in towers.items():
            llava, root = sample_input(n)
            for w in workers:
                run = run_generate(SCRATCH / f"out-scaling-{w}", input=str(llava), image_root=str(root), model=model,
                                   pretrained="none", merge=merge, samples_per_shard=per_shard, workers=w,
                                   batch_size=min(per_shard, 64))
                runs[tower][w].append(run)
                print(f"round {r}: {tower}, {w} worker(s): {run['steady_per_s']:.2f} pairs/s steady "
                      f"({run['wall_s']:.1f} s wall)", flush=True)
    best = {t: {w: max(v, key=lambda x: x["steady_per_s"])["steady_per_s"] for w, v in by_w.items()}
            for t, by_w in runs.items()}
    base = workers[0]
    rows = []
    for tower, by_w in best.items():
        for w, rate in by_w.items():
            rows.append([tower, w, f"{rate:.2f}", by_w[w] / by_w[base]])
    print_table(f"Scaling on local Ray, {cores} cores (goal: 2 vs 1 >= 1.7x for the model-bound tower)",
                ["tower", "workers", "pairs/s (steady)", f"speed-up vs {base}"], rows)
    save("scaling", {"args": vars(args), "cores": cores, "runs": {t: {str(w): v for w, v in by_w.items()} for t, by_w in runs.items()},
                     "pairs_per_s": {t: {str(w): v for w, v in by_w.items()} for t, by_w in best.items()},
                     "speedup": {t: by_w[workers[-1]] / by_w[base] for t, by_w in best.items()}, "goal": 1.7}, args.out)


if __name__ == "__main__":
    main()
