"""Shared pieces of the benchmarks: input data, tiny towers, steady-state throughput of a
`generate` run, machine description, table printing and the JSON results.

No bench script may be named like a package of ours: Ray workers put the script's folder
first on sys.path, so a bench/pipeline.py would shadow `pipeline` there.

Steady state: a unit is committed when its `_stats.json` is renamed into place, so the
modification times of the stats files are the commit times. Throughput is the samples of
every unit after the first committed one, divided by the time from the first commit to the
last. That leaves out Ray start-up, model load and the pipeline's fill (fixed costs), which
are reported separately as `wall_s` and `first_commit_s`.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.samples.demo import write_sample_data  # noqa: E402

SCRATCH = Path(os.environ.get("MM_BENCH_DIR", "/tmp/mm-bench"))
RESULTS = ROOT / "bench" / "results"


def tiny_model(image_size: int = 224, patch: int = 32, layers: int = 4, width: int = 32) -> Path:
    """An open_clip model-config JSON of a tower whose cost is negligible next to the codecs
    (same shape as the test suite's tiny tower, at a real image geometry)."""
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": image_size, "patch_size": patch, "width": width, "layers": layers, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
    }
    path = SCRATCH / "models" / f"mm-bench-tiny-{image_size}-p{patch}-l{layers}-w{width}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


def sample_input(n: int, pool: int = 10_000) -> tuple[Path, Path]:
    """A LLaVA JSON of `n` image samples (no text-only row) and its image root.

    Images are written once (`pool` of them, reused by every size) into SCRATCH/data.
    """
    root = SCRATCH / f"data{pool}"
    full = root / "llava.json"
    if not full.is_file():
        write_sample_data(root, n=pool, seed=0)
    if n > pool:
        raise ValueError(f"at most {pool} samples")
    path = root / f"llava-{n}.json"
    if not path.is_file():
        rows = [r for r in json.loads(full.read_text()) if r.get("image")][:n]
        path.write_text(json.dumps(rows))
    return path, root


def _write_image(args) -> dict:
    i, root = args
    from PIL import Image

    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:480, 0:640]
    img = np.stack([xx * 255 // 639, yy * 255 // 479, np.full_like(xx, rng.integers(0, 255))], -1)
    img = np.clip(img + rng.integers(0, 40, size=img.shape), 0, 255).astype(np.uint8)
    name = f"images/{i:06d}.jpg"
    Image.fromarray(img).save(root / name, quality=90)
    return {"id": f"g{i:06d}", "image": name, "conversations": [
        {"from": "human", "value": "<image>\nDescribe the picture."}, {"from": "gpt", "value": "A gradient."}]}


def large_input(n: int) -> tuple[Path, Path]:
    """A LLaVA JSON of `n` synthetic 640x480 JPEGs (about the size of the COCO images in
    LLaVA-665k) and its image root, written once into SCRATCH/data-640."""
    root = SCRATCH / "data-640"
    (root / "images").mkdir(parents=True, exist_ok=True)
    path = root / f"llava-{n}.json"
    if not path.is_file():
        with ProcessPoolExecutor() as pool:
            rows = list(pool.map(_write_image, [(i, root) for i in range(n)], chunksize=64))
        path.write_text(json.dumps(rows))
    return path, root


def commit_times(out: Path) -> list[tuple[float, int]]:
    """(commit time, samples) per committed unit, in commit order."""
    result = []
    for stats_path in (Path(out) / "shards").glob("*_stats.json"):
        stats = json.loads(stats_path.read_text())
        result.append((stats_path.stat().st_mtime, int(stats["counts"]["total"])))
    return sorted(result)


def steady_rate(out: Path, lanes: int = 1) -> dict:
    """Samples/s in steady state (see the module docstring). With `lanes` encoder actors the
    first wave commits `lanes` units at about the same time, so the clock starts at the
    last commit of that wave and counts the samples committed after it."""
    commits = commit_times(out)
    if len(commits) < lanes + 2:
        raise ValueError(f"{out}: need at least {lanes + 2} committed units for a steady-state rate, got {len(commits)}")
    span = commits[-1][0] - commits[lanes - 1][0]
    samples = sum(n for _, n in commits[lanes:])
    return {"units": len(commits), "samples": sum(n for _, n in commits), "steady_samples": samples,
            "steady_s": span, "steady_per_s": samples / span}


def run_generate(out: Path, **flags) -> dict:
    """Run `generate` in this process (Ray must already be initialised) and measure it."""
    from pipeline.config import GenerateConfig
    from pipeline.run import generate

    base = dict(output=str(out), overwrite=True, progress=False, seed=0)
    cfg = GenerateConfig.build(base | flags)
    start = time.time()
    result = generate(cfg)
    wall = time.time() - start
    if not result.ok:
        raise RuntimeError(f"generate failed units: {result.failed_units}")
    run = json.loads((Path(out) / "run.json").read_text())["this_run"]
    try:
        rate = steady_rate(out, lanes=run["sizing"]["actors"])
    except ValueError:  # too few units for a steady state (e.g. the memory benchmark's 1k run)
        rate = {"units": len(commit_times(out)), "steady_per_s": None}
    first = commit_times(out)[0][0]
    return {"wall_s": wall, "first_commit_s": first - start, "counts": result.counts,
            "workers": cfg.workers, "sizing": run["sizing"], **rate}


def init_ray(num_cpus: int | None = None) -> int:
    import ray

    cpus = num_cpus or os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return cpus


def machine() -> dict:
    """What a figure was measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for dist in ("torch", "open_clip_torch", "ray", "pillow", "numpy", "pyarrow"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        import PIL.features

        versions["libjpeg_turbo"] = PIL.features.check_feature("libjpeg_turbo")
    except Exception:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform(), "versions": versions,
            "load_average_at_end": os.getloadavg()}  # other work on the machine skews absolute figures
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except Exception:
        pass
    return info


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def save(name: str, result: dict, out: str | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "command": "python " + " ".join([f"bench/{name}.py", *sys.argv[1:]]),
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **result}
    path.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {path}")
    return path
