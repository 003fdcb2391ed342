"""Big inputs: the driver's peak memory and the time to the first committed unit.

LLaVA-665K's instruction JSON is about 1 GB. This generates inputs of that size (the
images are a small pool reused by every row: only the listing is measured), starts
`mergemix-pipeline generate` in a child process with the tiny tower, polls the driver's
VmHWM (the kernel's peak RSS of that one process) until the first `_stats.json` appears,
then stops the run (SIGKILL of its process group). Figures: peak RSS / input file size,
and seconds from the command's start to the first committed unit.

    python bench/big_input.py                       # 665,000-row LLaVA JSON and 1M-row Parquet
    python bench/big_input.py --kinds llava --rows 665000
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, SCRATCH, print_table, save, tiny_model

MB = 1024 * 1024
POOL = 64  # distinct images the rows point at


def _image_pool(root: Path) -> list[str]:
    from stages.samples.demo import draw_sample
    import numpy as np

    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(POOL):
        name = f"images/{i:03d}.jpg"
        if not (root / name).is_file():
            draw_sample(rng)[0].save(root / name, quality=90)
        names.append(name)
    return names


def _conversation(i: int) -> list[dict]:
    """About 1.7 KB of multi-turn text, the average row of LLaVA-665K."""
    turns = []
    for t in range(3):
        turns.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + f"Question {t} about sample {i}: "
                      + "what does the picture show in its upper left corner, and why? " * 3})
        turns.append({"from": "gpt", "value": f"Answer {t}: " + "the corner shows a textured background with a shape. " * 5})
    return turns


def llava_json(rows: int) -> tuple[Path, Path]:
    root = SCRATCH / "big"
    path = root / f"llava-{rows}.json"
    names = _image_pool(root)
    if not path.is_file():
        with open(path, "w") as f:
            f.write("[")
            for i in range(rows):
                row = {"id": f"{i:09d}", "image": names[i % POOL], "conversations": _conversation(i)}
                f.write(("," if i else "") + json.dumps(row))
            f.write("]")
    return path, root


def _wordy_conversations(start: int, n: int) -> list[str]:
    """JSON conversations of about 1.7 KB each, from random words: text that compresses about
    as well as real instruction data (a repeated template would shrink to nothing)."""
    import numpy as np

    rng = np.random.default_rng(start)
    letters = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))
    vocab = ["".join(rng.choice(letters, size=int(k))) for k in rng.integers(2, 10, size=4000)]
    words = np.array(vocab)[rng.integers(0, len(vocab), size=(n, 260))]
    out = []
    for i, row in enumerate(words):
        text = [" ".join(row[j * 43:(j + 1) * 43]) for j in range(6)]
        turns = [{"from": "human" if t % 2 == 0 else "gpt", "value": ("<image>\n" if t == 0 else "") + text[t]}
                 for t in range(6)]
        out.append(json.dumps(turns))
    return out


def parquet_manifest(rows: int) -> tuple[Path, Path]:
    """LLaVA-665K's rows as a Parquet manifest: id, image path, conversations (JSON text)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = SCRATCH / "big"
    path = root / f"manifest-llava-{rows}.parquet"
    names = _image_pool(root)
    if not path.is_file():
        writer = None
        for start in range(0, rows, 50_000):
            ids = range(start, min(rows, start + 50_000))
            table = pa.table({"id": [f"{i:09d}" for i in ids], "image": [names[i % POOL] for i in ids],
                              "conversations": _wordy_conversations(start, len(ids))})
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
        writer.close()
    return path, root


def vm_hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure(kind: str, path: Path, root: Path, timeout: float) -> dict:
    out = SCRATCH / f"big-out-{kind}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipeline.cli", "generate", "--input", str(path), "--image-root", str(root),
           "--output", str(out), "--model", str(tiny_model()), "--pretrained", "none", "--merge", "0",
           "--samples-per-shard", "1000", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    peak, first = 0, None
    try:
        while time.monotonic() - start < timeout:
            peak = max(peak, vm_hwm(proc.pid) or 0)
            if any((out / "shards").glob("*_stats.json")) if (out / "shards").is_dir() else False:
                first = time.monotonic() - start
                break
            if proc.poll() is not None:
                raise RuntimeError(f"generate ended early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
        peak = max(peak, vm_hwm(proc.pid) or 0)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    size = path.stat().st_size
    return {"kind": kind, "input": path.name, "input_mb": size / MB, "driver_peak_rss_mb": peak / MB,
            "peak_over_input": peak / size, "first_commit_s": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="llava,parquet", help="llava and/or parquet")
    ap.add_argument("--rows", type=int, default=None, help="rows per input (default: 665000 llava, 1000000 parquet)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for the first commit")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = []
    for kind in args.kinds.split(","):
        if kind == "llava":
            path, root = llava_json(args.rows or 665_000)
        else:
            path, root = parquet_manifest(args.rows or 1_000_000)
        results.append(measure(kind, path, root, args.timeout))
    print_table("big inputs: driver peak RSS and first commit", ["kind", "input MB", "driver peak MB", "peak / input",
                "first commit s"], [[r["kind"], r["input_mb"], r["driver_peak_rss_mb"], r["peak_over_input"],
                                     r["first_commit_s"]] for r in results])
    save("big_input", {"results": results, "goal": "driver peak RSS <= 1.5x the input file, first unit within 30 s"},
         args.out)


if __name__ == "__main__":
    main()
