"""GPU figures (one H100 or H200), in one run: the encoder merged vs un-merged against its FLOP
bound (bf16, batch 128+, with and without torch.compile), then end-to-end `generate` pairs/s with
the node's cores for each image path (pil; torch; torch with --device-encode), with the CPU cores
busy and the GPU's utilisation over each run's steady state.

Not run by this project yet (no GPU was available); on a GPU node:

    python bench/gpu.py                                   # ViT-L-14-336, R=288, bf16, random weights
    python bench/gpu.py --pairs 32000 --batches 128,256 --no-compile
    python bench/gpu.py --device cpu --precision fp32 --model ViT-S-16 --merge 64 --batches 8 --pairs 64 \\
        --samples-per-shard 16 --iters 2 --paths pil      # smoke test on a CPU machine (bf16 on CPU is slow)

Inputs are synthetic 640x480 JPEGs (about the size of COCO images in LLaVA-665k), written once into
the scratch folder. Steady-state pairs/s as in bench/common.py. CPU busy: the machine's CPU time
(all processes) over the steady state, in cores; GPU utilisation: nvidia-smi's, sampled every 0.5 s.
The codec floor of one core at the model geometry (bench/codec.py) times the cores is printed beside
it: the CPU bound of the pil path on this node.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import threading
import time

import psutil
import torch

from codec import codec_floor
from common import SCRATCH, commit_times, init_ray, large_input, print_table, run_generate, save
from encoder import saliency_flops
from stages.model.factory import load_encoder
from stages.model.configs import model_geometry

PATHS = {"pil": {"image_ops": "pil"}, "torch": {"image_ops": "torch"},
         "torch+encode": {"image_ops": "torch", "device_encode": True}}


def encoder_rate(enc, batch: int, iters: int) -> float:
    h, w = enc.image_size
    x = torch.randint(0, 256, (batch, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    if enc.device.type == "cuda":
        x = x.to(enc.device)  # the torch image path hands the encoder device pixels
    sync = torch.cuda.synchronize if enc.device.type == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up (and compilation)
        enc.saliency_from_pixels(x)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        enc.saliency_from_pixels(x)
    sync()
    return iters * batch / (time.perf_counter() - start)


class Usage(threading.Thread):
    """Samples the machine's busy CPU time and the GPU's utilisation every `interval` seconds."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.stop, self.samples = interval, threading.Event(), []

    def run(self) -> None:
        while not self.stop.is_set():
            cpu = psutil.cpu_times()
            busy = cpu.user + cpu.system + getattr(cpu, "irq", 0) + getattr(cpu, "softirq", 0) + getattr(cpu, "nice", 0)
            self.samples.append((time.time(), busy, gpu_utilisation()))
            time.sleep(self.interval)

    def over(self, t0: float, t1: float) -> dict:
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return {"cpu_cores_busy": None, "gpu_utilisation": None}
        gpu = [s[2] for s in inside if s[2] is not None]
        return {"cpu_cores_busy": (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0]),
                "gpu_utilisation": sum(gpu) / len(gpu) / 100 if gpu else None}


def gpu_utilisation() -> float | None:
    """nvidia-smi's utilisation.gpu of GPU 0 (percent), or None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=5)
        return float(out.stdout.strip().splitlines()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-L-14-336")
    ap.add_argument("--merge", type=int, default=288)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="128,256")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--paths", default="pil,torch,torch+encode", help="image paths to run end to end")
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
    bound = saliency_flops(plain, plain.schedule) / saliency_flops(merged, merged.schedule)
    enc_rows, enc_results = [], []
    for compiled in [False] if args.no_compile else [False, True]:
        if compiled:
            merged.enable_compile()
            plain.enable_compile()
        for batch in [int(b) for b in args.batches.split(",")]:
            try:
                rates = {name: encoder_rate(e, batch, args.iters) for name, e in (("unmerged", plain), ("merged", merged))}
            except Exception as exc:  # torch.compile may not take the merge ops on every version: record it
                enc_results.append({"batch": batch, "compile": compiled, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            speedup = rates["merged"] / rates["unmerged"]
            enc_results.append({"batch": batch, "compile": compiled, **rates, "speedup": speedup,
                                "fraction_of_bound": speedup / bound})
            enc_rows.append([batch, "yes" if compiled else "no", f"{rates['unmerged']:.0f}", f"{rates['merged']:.0f}",
                             speedup, f"{speedup / bound:.1%}"])
    print_table(f"Encoder {args.model} R={args.merge} {args.precision} on {args.device} (FLOP bound {bound:.3f}x; "
                "goal: >= 90% of it)", ["batch", "compile", "un-merged img/s", "merged img/s", "speed-up", "of bound"],
                enc_rows)
    measured = [r for r in enc_results if "merged" in r]
    if not measured:  # every batch failed: the end-to-end runs would fail the same way
        save("gpu", {"args": vars(args), "flop_bound": bound, "encoder": enc_results}, args.out)
        raise SystemExit("the encoder failed at every batch size: " + "; ".join(r["error"] for r in enc_results))
    fastest = max(measured, key=lambda r: r["merged"])
    del merged, plain
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()

    llava, root = large_input(args.pairs)
    (size, _), (patch, _) = model_geometry(args.model)
    floor = codec_floor(llava, root, min(500, args.pairs), size, patch)
    cores = init_ray()
    usage = Usage()
    usage.start()
    runs, rows = {}, []
    for name in args.paths.split(","):
        out = SCRATCH / f"out-gpu-{name.replace('+', '-')}"
        run = run_generate(out, input=str(llava), image_root=str(root), model=args.model, pretrained="none",
                           merge=args.merge, precision=args.precision, device=args.device.split(":")[0],
                           batch_size=fastest["batch"], samples_per_shard=args.samples_per_shard,
                           compile=fastest["compile"], **PATHS[name])
        commits = commit_times(out)
        lanes = run["sizing"]["actors"]
        run.update(usage.over(commits[min(lanes, len(commits)) - 1][0], commits[-1][0]))  # after the first wave
        runs[name] = run
        busy, util = run["cpu_cores_busy"], run["gpu_utilisation"]
        rows.append([name, f"{run['steady_per_s']:.0f}", f"{busy:.1f} of {cores}" if busy is not None else "-",
                     f"{util:.0%}" if util is not None else "-"])
        print(f"{name}: {run['steady_per_s']:.0f} pairs/s", flush=True)
    usage.stop.set()
    print_table(f"End to end on {cores} cores + {args.device} (goal >= 2500 pairs/s; codec floor {floor:.0f} pairs/s "
                f"per core, so the pil path's CPU bound is {cores * floor:.0f})",
                ["image ops", "pairs/s (steady state)", "CPU cores busy", "GPU utilisation"], rows)
    save("gpu", {"args": vars(args), "cores": cores, "flop_bound": bound, "encoder": enc_results,
                 "encoder_batch": fastest["batch"], "encoder_compile": fastest["compile"], "pipeline": runs,
                 "pipeline_pairs_per_s": {k: v["steady_per_s"] for k, v in runs.items()},
                 "codec_floor_per_core": floor, "cpu_bound_pairs_per_s": cores * floor, "goal": 2500,
                 "cpu_threads": os.cpu_count()}, args.out)


if __name__ == "__main__":
    main()
