"""Capacity model: pairs/s of one GPU node, from CPU costs measured here and the encoder's FLOPs.

CPU side, measured at the GPU geometry (336 px, 24 x 24 patches, from 640x480 JPEGs), in CPU time
(less disturbed than wall time by other load on a shared machine, not immune to it):
- the stage functions alone, in this process with one thread: prepare (pil: decode + pad + resize;
  torch: read + header check), write (compose, two JPEG encodes, mask, hashes, tar, Parquet; or only
  packing JPEGs the actor made), and for reference the encoder forward with a tiny tower and the
  torch path's image work on this CPU (both device work on a GPU node);
- `generate` on local Ray with a tiny random tower, per image path a small and a large run, while a
  thread samples the CPU time of every process (driver, Ray's own, task workers, encoder actor);
  the difference between the runs per extra pair leaves out the fixed costs (start-up, model load).
The CPU side of a pair is its stages plus what Ray, the driver and the workers' background add
(the pil run's total less its stages). The torch runs are reported too, but here their image work
runs on this CPU in the actor, units crawl and background CPU per second weighs on every pair.
The encoder actor keeps one core per GPU for its host side: its decisions less the tiny tower's
forward, and putting its results (on the torch path also the winners) in the object store; the
host side of nvJPEG and of the fit's launches on a GPU is not measured here.

GPU side, derived until a GPU run measures it: images/s of the merged encoder (FLOPs of the blocks
up to the saliency row, as bench/encoder.py counts them) at a stated share of the GPU's dense bf16
peak; on the torch path plus the exact float64 resample of stages.imaging.device at the same share
of the FP64 peak. nvJPEG's hardware decoder works beside the SMs and nvJPEG encoding
(--device-encode) is not modelled: both wait for bench/gpu.py.

Projection for 8, 16 and 32 cores per GPU: min(CPU: (cores - 1) x 1000 / CPU core-ms per pair,
actor core: 1000 / actor host ms per pair, GPU: images/s), and which side binds.

    python bench/capacity.py                                   # ViT-L-14-336, R=288, H100 SXM peaks, 50%
    python bench/capacity.py --utilisation 0.35 --pairs 1000
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import threading
import time
from pathlib import Path

import psutil

from common import SCRATCH, init_ray, large_input, print_table, run_generate, save, tiny_model

H100_SXM = {"bf16_tflops": 989.4, "fp64_tflops": 66.9}  # dense tensor-core peaks (no sparsity)
PATHS = {"pil": {"image_ops": "pil"}, "torch": {"image_ops": "torch"},
         "torch + device encode": {"image_ops": "torch", "device_encode": True}}


# --- CPU side: per-process CPU time of generate runs -------------------------------------------


def role(proc: psutil.Process, me: int) -> str:
    if proc.pid == me:
        return "driver"
    cmd = " ".join(proc.cmdline())
    if "UnitWorker" in cmd:
        return "encoder actor"
    if "default_worker.py" in cmd or cmd.startswith("ray::"):
        return "task workers"
    return "ray system"


class CpuSampler(threading.Thread):
    """Samples the CPU time (user + system) of this process and all its descendants."""

    def __init__(self, interval: float = 0.25):
        super().__init__(daemon=True)
        self.interval, self.stop = interval, threading.Event()
        self.samples: list[tuple[float, dict[int, float]]] = []
        self.roles: dict[int, str] = {}
        self.own = 0.0  # this thread's CPU, taken off the driver's

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            start = time.thread_time()
            now, cpu = time.time(), {}
            for proc in [me, *me.children(recursive=True)]:
                try:
                    t = proc.cpu_times()
                    cpu[proc.pid] = t.user + t.system
                    if self.roles.get(proc.pid) != "encoder actor":  # a worker is the actor once titled so
                        self.roles[proc.pid] = role(proc, me.pid)
                except (psutil.Error, OSError):
                    continue
            self.samples.append((now, cpu))
            self.own += time.thread_time() - start
            time.sleep(self.interval)

    def between(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds per role from t0 to t1 (each process at its last sample before each time)."""

        def at(t: float) -> dict[int, float]:
            seen: dict[int, float] = {}
            for when, cpu in self.samples:
                if when > t:
                    break
                seen.update(cpu)
            return seen

        start, end = at(t0), at(t1)
        spent: dict[str, float] = {}
        for pid, cpu in end.items():
            spent[self.roles[pid]] = spent.get(self.roles[pid], 0.0) + cpu - start.get(pid, 0.0)
        return spent


def run_cpu(name: str, flags: dict, pairs: int, root: Path, model: Path, per_shard: int) -> dict:
    """CPU seconds per role of one whole `generate` run of `pairs` samples."""
    llava, _ = large_input(pairs)
    sampler = CpuSampler()
    sampler.start()
    time.sleep(2 * sampler.interval)
    start = time.time()
    out = SCRATCH / f"out-capacity-{name.replace(' ', '-').replace('+', '')}"
    run = run_generate(out, input=str(llava), image_root=str(root), model=str(model), pretrained="none", merge=288,
                       samples_per_shard=per_shard, batch_size=32, **flags)
    end = time.time()
    time.sleep(2 * sampler.interval)
    sampler.stop.set()
    sampler.join()
    spent = sampler.between(start, end)
    spent["driver"] = max(0.0, spent.get("driver", 0.0) - sampler.own)
    return {"pairs": pairs, "cpu_s": spent, "wall_s": end - start, "steady_per_s": run["steady_per_s"]}


def measure_path(name: str, flags: dict, sizes: tuple[int, int], root: Path, model: Path, per_shard: int) -> dict:
    """Core-ms per pair by role, from two runs of different sizes: (CPU(large) - CPU(small)) / (pairs
    difference). Fixed costs (worker and actor start-up, imports, model load, the first and last
    units' pipeline fill) cancel; so does the skew of units the actor finished before the first commit."""
    small, large = (run_cpu(name, flags, n, root, model, per_shard) for n in sizes)
    pairs = large["pairs"] - small["pairs"]
    roles = set(small["cpu_s"]) | set(large["cpu_s"])
    per_pair = {r: 1000 * (large["cpu_s"].get(r, 0.0) - small["cpu_s"].get(r, 0.0)) / pairs for r in roles}
    cpu_side = sum(v for r, v in per_pair.items() if r != "encoder actor")
    return {"path": name, "sizes": list(sizes), "core_ms_per_pair": per_pair, "cpu_side_core_ms_per_pair": cpu_side,
            "runs": [small, large]}


# --- CPU side: the stage functions alone -------------------------------------------------------


def stage_costs(llava: Path, root: Path, model: Path, n: int, repeats: int = 3) -> dict:
    """Core-ms per pair of each stage function, in this process with one thread, the least of
    `repeats` calls after a first that pays one-time costs: prepare and write as the CPU tasks run
    them, their object-store traffic, the actor's host work (its decisions without a forward: method
    random), and for reference the tiny tower's forward and the torch path's image work on this CPU
    (device work on a GPU node)."""
    import ray
    import torch

    from stages.imaging.compose import decided_pairs
    from stages.mixing.decide import UnitDecider
    from stages.inputs.kinds import list_input
    from stages.imaging.prepare import prepare_unit
    from stages.inputs.kinds import read_slice
    from stages.model.factory import load_encoder
    from stages.model.tower import resolve_tower
    from stages.output.writer import write_unit

    torch.set_num_threads(1)
    records = read_slice(list_input(str(llava), n).slices[0])
    tower = resolve_tower(str(model), "none")
    encoder = load_encoder(str(model), "none", merge=288)
    costs = {}

    def cpu_ms(fn):
        value, best = fn(), float("inf")
        for _ in range(repeats):
            start = time.process_time()
            fn()
            best = min(best, time.process_time() - start)
        return value, 1000 * best / len(records)

    def prepare(ops):
        return lambda: prepare_unit(0, 0, records, tower.image_size, "pad", str(root), tower.pad_rgb,
                                    tower.interpolation, ops)

    def decide(unit, method="mergemix", quality=None):
        decider = UnitDecider(encoder, method=method, lam="beta:1.0", lam_mode="area", seed=0, batch_size=32,
                              describe={}, encode_quality=quality)
        return lambda: decider.decide(copy.deepcopy(unit))

    def write(decided, unit):
        def run():
            with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
                write_unit(tmp, 0, copy.deepcopy(decided.rows), decided_pairs(decided, unit.pixels), image_format="jpg",
                           jpeg_quality=95, fingerprint="x")
        return cpu_ms(run)[1]

    pil, costs["prepare (pil)"] = cpu_ms(prepare("pil"))
    _, costs["put of the prepared unit (pil)"] = cpu_ms(lambda: ray.put(pil))
    decided, costs["decide without a forward (actor host work)"] = cpu_ms(decide(pil, "random"))
    _, costs["put of the decisions (actor)"] = cpu_ms(lambda: ray.put(decided))
    costs["write (2 JPEG encodes)"] = write(decided, pil)
    _, costs["tiny tower forward (reference)"] = cpu_ms(lambda: decide(pil)().timings)
    costs["tiny tower forward (reference)"] -= costs["decide without a forward (actor host work)"]
    torch_unit, costs["prepare (torch)"] = cpu_ms(prepare("torch"))
    _, costs["put of the prepared unit (torch)"] = cpu_ms(lambda: ray.put(torch_unit))
    decided = decide(torch_unit)()
    costs["torch image work, here on CPU (reference; the GPU's on a GPU node)"] = \
        1000 * decided.timings["images_s"] / len(records)
    _, costs["put of the winners (actor, torch)"] = cpu_ms(lambda: ray.put(decided.winners))
    costs["write (JPEGs made in the actor)"] = write(decide(torch_unit, quality=95)(), torch_unit)
    return costs


# --- GPU side: FLOPs ---------------------------------------------------------------------------


def encoder_flops(model: str, merge: int) -> dict:
    """FLOPs per image of the saliency forward, merged and un-merged (structure only, no weights)."""
    from encoder import saliency_flops

    from stages.model.encoder import MergingEncoder
    from stages.model.factory import build_clip
    from stages.model.tower import resolve_tower

    visual = build_clip(resolve_tower(model, "none"), None, device="meta").visual
    merged, plain = MergingEncoder(visual, merge=merge), MergingEncoder(visual, merge=0)
    return {"merged": saliency_flops(merged, merged.schedule), "unmerged": saliency_flops(plain, plain.schedule),
            "schedule": merged.schedule, "image_size": list(merged.image_size)}


def resample_flops(source: tuple[int, int], size: int) -> float:
    """float64 FLOPs of stages.imaging.device.fit for one image padded to a square: two dense passes."""
    side = max(source)
    return 2 * 3 * (side * side * size + size * side * size)


# --- the projection ----------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-L-14-336")
    ap.add_argument("--merge", type=int, default=288)
    ap.add_argument("--utilisation", type=float, default=0.5, help="share of the GPU's dense peaks reached")
    ap.add_argument("--bf16-tflops", type=float, default=H100_SXM["bf16_tflops"])
    ap.add_argument("--fp64-tflops", type=float, default=H100_SXM["fp64_tflops"])
    ap.add_argument("--pairs", type=int, default=1200, help="samples of the larger pil run, the smaller has a quarter "
                    "(the torch runs take half of these: their image work runs on this CPU here)")
    ap.add_argument("--samples-per-shard", type=int, default=50)
    ap.add_argument("--stage-pairs", type=int, default=200)
    ap.add_argument("--cores", default="8,16,32")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    llava, root = large_input(args.pairs)
    model = tiny_model(336, 14)  # the GPU geometry: 24 x 24 patches, as ViT-L-14-336
    flops = encoder_flops(args.model, args.merge)
    gpu_images = args.utilisation * args.bf16_tflops * 1e12 / flops["merged"]
    fit_s = resample_flops((480, 640), 336) / (args.utilisation * args.fp64_tflops * 1e12)
    gpu_torch = 1 / (1 / gpu_images + fit_s)
    print(f"encoder {flops['merged'] / 1e9:.1f} GFLOP per image merged, {flops['unmerged'] / 1e9:.1f} un-merged; "
          f"{gpu_images:.0f} images/s at {args.utilisation:.0%} of {args.bf16_tflops:.0f} TFLOPS; exact resample "
          f"{1000 * fit_s:.3f} ms per image at {args.utilisation:.0%} of {args.fp64_tflops:.0f} FP64 TFLOPS", flush=True)

    cores = init_ray()
    stages = stage_costs(llava, root, model, args.stage_pairs)
    for name, ms in stages.items():
        print(f"stage {name}: {ms:.2f} core-ms per pair", flush=True)
    runs = {}
    for name, flags in PATHS.items():
        pairs = args.pairs if name == "pil" else args.pairs // 2
        runs[name] = measure_path(name, flags, (pairs // 4, pairs), root, model, args.samples_per_shard)
        print(f"{name}: " + ", ".join(f"{r} {v:.2f}" for r, v in sorted(runs[name]["core_ms_per_pair"].items()))
              + f" core-ms per pair (CPU side {runs[name]['cpu_side_core_ms_per_pair']:.2f})", flush=True)

    # The CPU side of a pair: its stages, their puts, and what the driver and Ray's own processes spend
    # per pair in the pil run. The runs' task-worker figures are shown beside: on this shared 2-core
    # machine they swing with the load, and the torch runs crawl (their image work runs on this CPU).
    overhead = sum(runs["pil"]["core_ms_per_pair"].get(r, 0.0) for r in ("driver", "ray system"))
    cpu_ms = {"pil": stages["prepare (pil)"] + stages["put of the prepared unit (pil)"] + stages["write (2 JPEG encodes)"],
              "torch": stages["prepare (torch)"] + stages["put of the prepared unit (torch)"]
              + stages["write (2 JPEG encodes)"],
              "torch + device encode": stages["prepare (torch)"] + stages["put of the prepared unit (torch)"]
              + stages["write (JPEGs made in the actor)"]}
    cpu_ms = {k: v + overhead for k, v in cpu_ms.items()}
    # The actor's host side (one core per GPU): its decisions without the forward, their put, and on
    # the torch path the winners' put; nvJPEG's and the fit's host side on a GPU are not measured here.
    host = stages["decide without a forward (actor host work)"] + stages["put of the decisions (actor)"]
    actor_ms = {"pil": host, "torch": host + stages["put of the winners (actor, torch)"],
                "torch + device encode": host}
    table, projection = [], []
    for name in PATHS:
        gpu = gpu_images if name == "pil" else gpu_torch
        for n in [int(c) for c in args.cores.split(",")]:
            bounds = {"CPU": (n - 1) * 1000 / cpu_ms[name], "actor core": 1000 / actor_ms[name], "GPU": gpu}
            side = min(bounds, key=bounds.get)
            projection.append({"path": name, "cores": n, **{k: round(v) for k, v in bounds.items()},
                               "pairs_per_s": round(bounds[side]), "binds": side})
            table.append([name, n, f"{cpu_ms[name]:.2f}", f"{bounds['CPU']:.0f}", f"{bounds['actor core']:.0f}",
                          f"{gpu:.0f}", f"{bounds[side]:.0f}", side])
    print_table(f"Capacity of one GPU node: {args.model} R={args.merge} bf16, GPU at {args.utilisation:.0%} of "
                f"{args.bf16_tflops:.0f} TFLOPS bf16 / {args.fp64_tflops:.0f} FP64 (derived, not measured); "
                f"CPU costs measured here ({cores} cores)",
                ["image ops", "cores/GPU", "CPU core-ms/pair", "CPU bound", "actor core", "GPU bound", "pairs/s",
                 "binds"], table)
    sensitivity = {f"{u:.0%}": round(u * args.bf16_tflops * 1e12 / flops["merged"]) for u in (0.35, 0.5, 0.65)}
    print(f"GPU bound (pil) at other utilisations: {sensitivity}; 2,500 pairs/s needs "
          f"{2500 * flops['merged'] / (args.bf16_tflops * 1e12):.0%} of the bf16 peak for the encoder alone")
    save("capacity", {"args": vars(args), "cores_here": cores, "flops": flops, "gpu_images_per_s": gpu_images,
                      "gpu_torch_images_per_s": gpu_torch, "fit_ms_per_image": 1000 * fit_s,
                      "stage_core_ms_per_pair": stages, "runs": runs, "driver_and_ray_core_ms_per_pair": overhead,
                      "cpu_side_core_ms_per_pair": cpu_ms, "actor_host_ms_per_pair": actor_ms,
                      "projection": projection, "gpu_bound_by_utilisation": sensitivity,
                      "flop_bound_merged_vs_unmerged": flops["unmerged"] / flops["merged"]},
         args.out)


if __name__ == "__main__":
    main()
