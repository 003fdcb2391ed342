"""The driver's files of a run, written once every unit is done: run.json (config, fingerprint,
versions, totals), index.json (the wids shard index) and the dataset card."""
from __future__ import annotations

import sys
from importlib import metadata

from schemas.layout import INDEX_FILE, PRODUCER, RUN_FILE, SHARDS_DIR, json_file_bytes
from schemas.shard import SCHEMA_VERSION, STATUSES
from stages.output.card import write_card
from stages.readers.output_state import committed_units
from stages.storage import open_store


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the output (for run.json)."""
    versions = {"python": sys.version.split()[0]}
    for dist in ("mergemix-pipeline", "torch", "open_clip_torch", "numpy", "pillow", "pyarrow", "webdataset", "ray"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def write_run_files(out_dir, run_info: dict) -> str | None:
    """Write OUT/run.json (run_info + versions + totals over committed units), OUT/index.json
    (wids-shard-index-v1 with relative urls, so the directory can move) and the dataset card
    OUT/README.md (stages.output.card). Returns a notice when the card was skipped (a README.md of
    somebody else's is there), else None."""
    store = open_store(out_dir)
    units = committed_units(store)
    totals = {"units": len(units), "total": 0, **{s: 0 for s in STATUSES}}
    errors: dict[str, int] = {}
    timings: dict[str, float] = {}
    tar_bytes = 0
    for stats in units.values():
        for name in ("total", *STATUSES):
            totals[name] += int(stats.get("counts", {}).get(name, 0))
        for reason, n in stats.get("errors", {}).items():
            errors[reason] = errors.get(reason, 0) + n
        for name, v in stats.get("timings", {}).items():
            if isinstance(v, (int, float)):
                timings[name] = round(timings.get(name, 0.0) + v, 6)
        tar_bytes += stats["tar"]["filesize"]
    totals["errors"] = dict(sorted(errors.items()))
    totals["tar_bytes"] = tar_bytes
    totals["unit_timings_sum_s"] = timings

    run = {"producer": PRODUCER, **run_info}
    run.setdefault("schema_version", SCHEMA_VERSION)
    run.setdefault("versions", package_versions())
    run["totals"] = totals
    store.write_bytes(RUN_FILE, json_file_bytes(run))

    index = {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "producer": PRODUCER,
        "name": store.url.rstrip("/").rsplit("/", 1)[-1],
        "schema_version": SCHEMA_VERSION,
        "shardlist": [
            {
                "url": f"{SHARDS_DIR}/{stats['tar']['file']}",
                "nsamples": stats["tar"]["nsamples"],
                "filesize": stats["tar"]["filesize"],
                "md5sum": stats["tar"]["md5sum"],
            }
            for stats in units.values()
        ],
    }
    store.write_bytes(INDEX_FILE, json_file_bytes(index))
    return write_card(store, units, run)
