"""Peak memory of `generate` for 1k vs 10k samples: the driver and each Ray worker process.

Each size runs in a fresh child process (its own driver and local Ray cluster) with the tiny
tower. Units default to 100 samples, so both sizes reach the steady state (10 and 100 units,
more than are in flight): with 1000 per shard the 1k run is a single unit whose prepare and
write land in different workers, while in any longer run a worker does both, and the first
Arrow table a process builds costs it about 32 MB once (pyarrow's own initialisation, with any
memory pool). That is a fixed cost, not growth; `--samples-per-shard 1000` shows it. A thread
polls every process under the driver (raylet, GCS, workers) every 0.2 s and keeps, for
each, VmHWM (the kernel's peak RSS) and the largest RssAnon seen (private memory). RSS
also counts the pages of Ray's shared-memory object store that a worker has touched; those
are bounded by the store's size, not by the input, and are shared by all workers, so the
private figure is the one that shows accumulation. The driver's peak is its ru_maxrss.
Streaming means the 10k peaks stay within 1.1x of the 1k peaks.

    python bench/memory.py --sizes 1000,5000,10000
    python bench/memory.py --sizes 1000,10000 --samples-per-shard 1000 --out bench/results/memory_shard1000.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

from common import SCRATCH, init_ray, print_table, run_generate, sample_input, save, tiny_model

MB = 1024 * 1024


def memory_status(pid: int) -> dict | None:
    """VmHWM (the kernel's peak RSS) and RssAnon (private memory now) in bytes, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmHWM:", "RssAnon:")))
    except OSError:
        return None
    return {k: int(v.split()[0]) * 1024 for k, v in fields.items()} if len(fields) == 2 else None


def role(cmdline: str) -> str:
    if "UnitWorker" in cmdline:
        return "encoder actor"
    if "default_worker.py" in cmdline or cmdline.startswith("ray::"):
        return "task worker"
    return "ray system"


class Monitor(threading.Thread):
    """Polls the peak RSS of every descendant of this process."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval, self.stop = interval, threading.Event()
        self.peaks, self.private, self.roles = {}, {}, {}

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop.is_set():
            for child in me.children(recursive=True):
                try:
                    cmd = " ".join(child.cmdline())
                except (psutil.Error, OSError):
                    continue
                mem = memory_status(child.pid)
                if mem is None:
                    continue
                self.peaks[child.pid] = max(mem["VmHWM"], self.peaks.get(child.pid, 0))
                self.private[child.pid] = max(mem["RssAnon"], self.private.get(child.pid, 0))
                if self.roles.get(child.pid) != "encoder actor":  # a worker becomes the actor once its title is set
                    self.roles[child.pid] = role(cmd)
            time.sleep(self.interval)


def child(n: int, image_size: int, per_shard: int) -> dict:
    llava, root = sample_input(n)
    init_ray()
    monitor = Monitor()
    monitor.start()
    run = run_generate(SCRATCH / f"out-memory-{n}", input=str(llava), image_root=str(root),
                       model=str(tiny_model(image_size)), pretrained="none", merge=16, samples_per_shard=per_shard)
    time.sleep(2 * monitor.interval)
    monitor.stop.set()
    by_role: dict[str, list[int]] = {}
    private: dict[str, list[int]] = {}
    for pid, peak in monitor.peaks.items():
        by_role.setdefault(monitor.roles[pid], []).append(peak)
        private.setdefault(monitor.roles[pid], []).append(monitor.private[pid])
    driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"samples": n, "driver_peak": driver, "processes": {r: sorted(v) for r, v in by_role.items()},
            "max_peak": {r: max(v) for r, v in by_role.items()},
            "max_private": {r: max(v) for r, v in private.items()}, "run": run}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--samples-per-shard", type=int, default=100)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.image_size, args.samples_per_shard)), flush=True)
        return

    results = {}
    for n in [int(s) for s in args.sizes.split(",")]:
        sample_input(n)  # write the data outside the measured process
        proc = subprocess.run([sys.executable, __file__, "--child", str(n), "--image-size", str(args.image_size),
                               "--samples-per-shard", str(args.samples_per_shard)],
                              capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"child for {n} samples failed:\n{proc.stderr[-3000:]}")
        results[n] = json.loads(line[-1][len("RESULT "):])
        print(f"{n} samples: driver {results[n]['driver_peak'] / MB:.0f} MB, "
              + ", ".join(f"{r} max {v / MB:.0f} MB" for r, v in results[n]["max_peak"].items()), flush=True)
    small, large = (results[k] for k in sorted(results)[:: len(results) - 1])
    rows = [["driver", f"{small['driver_peak'] / MB:.0f}", f"{large['driver_peak'] / MB:.0f}",
             large["driver_peak"] / small["driver_peak"]]]
    ratios = {"driver": large["driver_peak"] / small["driver_peak"]}
    for r in ("encoder actor", "task worker", "ray system"):
        if r in small["max_peak"] and r in large["max_peak"]:
            for kind in ("max_private", "max_peak"):
                a, b = small[kind][r], large[kind][r]
                ratios[f"{r} {kind}"] = b / a
                what = "private (RssAnon)" if kind == "max_private" else "RSS incl. shared object store pages"
                rows.append([f"{r}, largest of {len(large['processes'][r])}: {what}", f"{a / MB:.0f}", f"{b / MB:.0f}", b / a])
    print_table(f"Peak memory, {small['samples']} vs {large['samples']} samples, {args.samples_per_shard} per shard "
                "(goal <= 1.1x)",
                ["process", f"{small['samples']} MB", f"{large['samples']} MB", "ratio"], rows)
    save("memory", {"args": vars(args), "results": {str(k): v for k, v in results.items()}, "ratios": ratios,
                    "goal": 1.1}, args.out)


if __name__ == "__main__":
    main()
