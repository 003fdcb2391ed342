"""Cost per pair of each `--method` through the whole pipeline (`generate` on local Ray), same input,
same tower, one run: mergemix runs the merged tower forward in its encoder actors; the image-side
negatives run no tower (their actors only draw parameters, the write tasks make the losers).

Steady-state pairs/s (bench/common.steady_rate) per method and its ratio to mergemix's. The tower is
ViT-B-16 with random weights (cost does not depend on the weights), at its 224 px geometry; images
are the demo pictures (160-320 px JPEGs); losers stored as PNG (lossless, what noise wants) and as
JPEG. Rounds are interleaved over the methods, so drift in machine load hits all alike.

    python bench/methods.py                 # 2 rounds, 256 pairs per run: about 10 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import statistics

from common import SCRATCH, init_ray, print_table, run_generate, sample_input, save

METHODS = ["mergemix", "crop", "noise", "pixelate", "image-blur", "rotate", "blank", "other"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--merge", type=int, default=98)
    ap.add_argument("--pairs", type=int, default=256, help="samples per run")
    ap.add_argument("--samples-per-shard", type=int, default=32)
    ap.add_argument("--formats", default="png,jpg")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    cpus = init_ray()
    source, root = sample_input(args.pairs, pool=args.pairs)
    formats = args.formats.split(",")
    rates: dict[tuple[str, str], list[float]] = {}
    runs = []
    for round_ in range(args.rounds):
        for fmt in formats:
            for method in METHODS:
                found = run_generate(SCRATCH / "methods" / f"{method}-{fmt}", input=str(source), image_root=str(root),
                                     model=args.model, pretrained="none", merge=args.merge, method=method,
                                     image_format=fmt, samples_per_shard=args.samples_per_shard, device="cpu")
                rates.setdefault((method, fmt), []).append(found["steady_per_s"])
                runs.append({"round": round_, "method": method, "format": fmt, **found})
                print(f"round {round_} {fmt} {method}: {found['steady_per_s']:.1f} pairs/s", flush=True)

    rows, results = [], {}
    for fmt in formats:
        base = statistics.median(rates["mergemix", fmt])
        for method in METHODS:
            rate = statistics.median(rates[method, fmt])
            results[f"{method} {fmt}"] = {"pairs_per_s": rate, "vs_mergemix": rate / base,
                                          "cpu_ms_per_pair": 1e3 * cpus / rate}
            rows.append([fmt, method, rate, rate / base, 1e3 * cpus / rate])
    print_table(f"pairs/s through generate per method ({args.model} R={args.merge} random weights for mergemix; "
                f"{args.pairs} pairs, median of {args.rounds} rounds, {cpus} CPUs)",
                ["format", "method", "pairs/s", "x mergemix", "CPU ms/pair"], rows)
    save("methods", {"model": args.model, "merge": args.merge, "pairs": args.pairs, "rounds": args.rounds,
                     "samples_per_shard": args.samples_per_shard, "cpus": cpus,
                     "note": "CPU run on a shared machine: ratios within this run only", "results": results,
                     "runs": runs}, args.out)


if __name__ == "__main__":
    main()
