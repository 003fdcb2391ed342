"""`inspect`: what an output holds, for people: counts per status and failure reason, lam /
lam_hat / margin histograms, methods, model and config."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.layout import RUN_FILE, SHARDS_DIR, STATS_SUFFIX, parse_unit_file
from stages.readers.output_state import committed_units
from stages.readers.shards import output_store, read_parquet
from schemas.shard import error_reason

_INSPECT_COLUMNS = ["status", "error", "lam", "lam_hat", "margin", "method", "lam_mode", "model", "pretrained",
                    "image_format", "image_size", "grid", "merge_total", "merge_schedule", "attn_layer"]


def text_histogram(values: np.ndarray, bins: int = 10, width: int = 40, lo: float = 0.0, hi: float = 1.0) -> list[str]:
    """Fixed-range histogram as text lines: '[0.0, 0.1)  ########  12'."""
    counts, edges = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))
    top = max(int(counts.max()), 1) if len(counts) else 1
    lines = []
    for i, n in enumerate(counts):
        close = "]" if i == bins - 1 else ")"
        lines.append(f"  [{edges[i]:.1f}, {edges[i + 1]:.1f}{close}  {'#' * round(width * n / top):<{width}}  {n}")
    return lines


def _counts_line(column: pa.ChunkedArray) -> str:
    vc = pc.value_counts(column).to_pylist()
    pairs = sorted(((v["values"], v["counts"]) for v in vc), key=lambda p: (-p[1], str(p[0])))
    return ", ".join(f"{v if v is not None else '-'} {n}" for v, n in pairs) or "-"


def inspect_output(out_dir, storage_options: dict | None = None) -> str:
    """A human report: counts per status and failure reason, lam / lam_hat / margin
    histograms, methods, model and config summary. `out_dir`: a folder or an object-store prefix."""
    store = output_store(out_dir, storage_options)
    units = committed_units(store)
    uncommitted = sorted({name.split(".")[0] for name in store.list(SHARDS_DIR)
                          if (u := parse_unit_file(name)) and u[1] != STATS_SUFFIX and u[0] not in units})
    lines = [f"output       {out_dir}"]
    run = None
    try:
        run = json.loads(store.read_bytes(RUN_FILE))
    except FileNotFoundError:
        pass
    except ValueError:
        lines.append("run.json     unreadable")
    if isinstance(run, dict):
        lines.append(f"fingerprint  {run.get('fingerprint', '-')}   schema {run.get('schema_version', '-')}")
    tar_bytes = sum(st["tar"]["filesize"] for st in units.values())
    lines.append(f"units        {len(units)} committed, {len(uncommitted)} uncommitted   tars {tar_bytes / 2**20:.1f} MiB")
    if not units:
        lines.append("no committed units: run or resume `mergemix-pipeline generate`")
        return "\n".join(lines)

    tables = [read_parquet(store, f"{SHARDS_DIR}/{st['parquet']['file']}", columns=_INSPECT_COLUMNS) for st in units.values()]
    table = pa.concat_tables(tables)
    status = table["status"]
    n = len(table)
    n_ok = pc.sum(pc.equal(status, "ok")).as_py() or 0
    per = {s: pc.sum(pc.equal(status, s)).as_py() or 0 for s in ("ok", "failed", "skipped")}
    lines.append(f"inputs       {n}: ok {per['ok']} ({100 * per['ok'] / max(n, 1):.1f}%), failed {per['failed']}, skipped {per['skipped']}")
    bad = table.filter(pc.not_equal(status, "ok"))
    if len(bad):
        reasons = Counter((s, error_reason(e)) for s, e in zip(bad["status"].to_pylist(), bad["error"].to_pylist()))
        lines.append("  not ok, by reason:")
        for (s, reason), k in sorted(reasons.items(), key=lambda p: (-p[1], p[0])):
            lines.append(f"    {s:<8} {reason:<24} {k}")
    ok = table.filter(pc.equal(status, "ok"))
    if n_ok:
        first = ok.slice(0, 1).to_pylist()[0]
        lines.append(f"methods      {_counts_line(ok['method'])}")
        lines.append(f"lam_mode     {_counts_line(ok['lam_mode'])}")
        lines.append(f"model        {_counts_line(ok['model'])}   pretrained: {first['pretrained'] or 'none (random weights)'}")
        lines.append(f"merging      R={first['merge_total']} schedule {first['merge_schedule']} attn_layer {first['attn_layer']}")
        size, grid = first["image_size"], first["grid"]
        lines.append(f"images       {_counts_line(ok['image_format'])}   {size[0]}x{size[1]} px, grid {grid[0]}x{grid[1]}")
        for name in ("lam", "lam_hat", "margin"):
            vals = ok[name].drop_null().to_numpy()
            if len(vals):
                lines.append(f"{name:<12} mean {vals.mean():.3f}  std {vals.std():.3f}  min {vals.min():.3f}  max {vals.max():.3f}")
                lines += text_histogram(vals)
    if isinstance(run, dict) and isinstance(run.get("config"), dict):
        lines.append("config")
        for k, v in run["config"].items():
            lines.append(f"  {k:<22} {json.dumps(v) if not isinstance(v, str) else v}")
    if uncommitted:
        lines.append(f"uncommitted  {', '.join(uncommitted[:10])}{' ...' if len(uncommitted) > 10 else ''} (no stats file; resume `generate`)")
    return "\n".join(lines)
