"""Encoder throughput: merged vs un-merged saliency, same model and batch, in one run.

Both runs stop at the saliency layer (later blocks are not needed for saliency). Beside each
measurement we print the FLOP bound of the schedule: linear layers plus attention, with the
tokens per block as scheduled, relative to the un-merged tower.

    python bench/encoder.py                                  # ViT-B-16 @224, R=98, CPU
    python bench/encoder.py --model ViT-L-14-336 --merge 288 --device cuda --precision bf16 --batch 128
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages.model.encoder import MergingEncoder  # noqa: E402
from stages.model.factory import load_encoder  # noqa: E402


def saliency_flops(enc: MergingEncoder, schedule: list[int]) -> float:
    """Multiply-adds x2 of the blocks up to the saliency row, tokens per block as scheduled."""
    block = enc.blocks[0]
    width = block.ln_1.normalized_shape[0]
    hidden = block.mlp[0].out_features if hasattr(block.mlp, "__getitem__") else 4 * width
    tokens, total = enc.num_patches + 1, 0.0
    for r in schedule:
        total += 2 * tokens * width * 4 * width  # qkv + out projection
        total += 2 * 2 * tokens * tokens * width  # QK^T and AV
        tokens -= r
        total += 2 * 2 * tokens * width * hidden  # MLP on the merged sequence
    total += 2 * tokens * width * width + 2 * width * width + 2 * tokens * width  # saliency row: K, q_cls, q.K
    return total


def images_per_second(enc: MergingEncoder, batch: torch.Tensor, iters: int, warmup: int) -> float:
    sync = torch.cuda.synchronize if enc.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        enc.saliency_from_pixels(batch)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        enc.saliency_from_pixels(batch)
    sync()
    return iters * batch.shape[0] / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--merge", type=int, default=98)
    ap.add_argument("--attn-layer", type=int, default=-2)
    ap.add_argument("--schedule", default="constant")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="alternate merged/un-merged this many times; best of each")
    ap.add_argument("--out", default="bench/results/encoder.json")
    args = ap.parse_args()

    common = dict(attn_layer=args.attn_layer, device=args.device, precision=args.precision)
    merged = load_encoder(args.model, "none", merge=args.merge, schedule=args.schedule, **common)
    plain = load_encoder(args.model, "none", merge=0, **common)
    plain.visual.load_state_dict(merged.visual.state_dict())
    h, w = merged.image_size
    batch = torch.randint(0, 256, (args.batch, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    speeds = {"unmerged": [], "merged": []}
    for _ in range(args.rounds):  # interleave so drift in machine load hits both alike
        speeds["unmerged"].append(images_per_second(plain, batch, args.iters, args.warmup))
        speeds["merged"].append(images_per_second(merged, batch, args.iters, args.warmup))
    best = {k: max(v) for k, v in speeds.items()}
    bound = saliency_flops(plain, plain.schedule) / saliency_flops(merged, merged.schedule)
    speedup = best["merged"] / best["unmerged"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    rows = [
        ("device", device),
        ("model / batch / precision", f"{args.model} / {args.batch} / {args.precision}"),
        ("merge schedule", f"R={args.merge} over {len(merged.schedule)} blocks: {merged.schedule}"),
        ("un-merged images/s", f"{best['unmerged']:.1f}"),
        ("merged images/s", f"{best['merged']:.1f}"),
        ("speed-up (measured)", f"{speedup:.3f}x"),
        ("FLOP bound", f"{bound:.3f}x"),
        ("fraction of bound", f"{speedup / bound:.1%}"),
    ]
    for k, v in rows:
        print(f"{k:<28} {v}")
    result = {"args": vars(args), "device": device, "torch": torch.__version__, "runs": speeds, "best": best,
              "speedup": speedup, "flop_bound": bound, "fraction_of_bound": speedup / bound, "schedule": merged.schedule}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
