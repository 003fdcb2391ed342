"""The output layout: which names in an output directory belong to mergemix-pipeline.

    OUT/run.json                      effective config, fingerprint, versions, totals
    OUT/index.json                    wids-shard-index-v1 over the committed tars
    OUT/.mergemix-lease.json          held by the one `generate` run writing OUT (heartbeat)
    OUT/README.md                     dataset card (`datasets.load_dataset(OUT)`), only while it carries
                                      CARD_MARKER: a README.md without it is somebody else's
    OUT/shards/NNNNNN.tar             unit NNNNNN: webdataset tar
    OUT/shards/NNNNNN.parquet         unit NNNNNN: one row per input
    OUT/shards/NNNNNN_stats.json      unit NNNNNN: counts, sizes, fingerprint; written last (the commit)
    OUT/shards/.NNNNNN.<ext>.<hex12>.tmp   a unit file being written (local disk)

Anything else under OUT (other files, other folders, `999999.txt`, a `notes.parquet`) is
not ours: readers ignore it and `generate` never deletes or overwrites it. A tar or Parquet
file with a unit name but no stats file is an uncommitted leftover of an interrupted write.
"""
from __future__ import annotations

import json

import re

SHARDS_DIR = "shards"
RUN_FILE = "run.json"
INDEX_FILE = "index.json"
LEASE_FILE = ".mergemix-lease.json"
CARD_FILE = "README.md"
# The line that makes OUT/README.md ours: generate rewrites a card that carries it and leaves any
# other README.md alone (a user who deletes the line keeps their edits).
CARD_MARKER = "<!-- mergemix-pipeline dataset card"
STATS_SUFFIX = "_stats.json"
TMP_SUFFIX = ".tmp"
UNIT_EXTS = (".tar", ".parquet")
PRODUCER = "mergemix-pipeline"  # written into run.json and index.json: how we recognise our own files

_UNIT_FILE = re.compile(r"^([0-9]{6})(\.tar|\.parquet|_stats\.json)$")
_TMP_FILE = re.compile(r"^\.([0-9]{6})(\.tar|\.parquet|_stats\.json)\.[0-9a-f]{12}\.tmp$")
_ROOT_TMP_FILE = re.compile(r"^\.(run\.json|index\.json|\.mergemix-lease\.json|README\.md)\.[0-9a-f]{12}\.tmp$")


def shard_name(unit_id: int) -> str:
    """File stem of unit `unit_id`'s shard files, e.g. 123 -> '000123'."""
    if not 0 <= unit_id < 1_000_000:
        raise ValueError(f"unit {unit_id} out of range for 6-digit shard names")
    return f"{unit_id:06d}"


def tar_name(unit_id: int) -> str:
    return f"{shard_name(unit_id)}.tar"


def parquet_name(unit_id: int) -> str:
    return f"{shard_name(unit_id)}.parquet"


def stats_name(unit_id: int) -> str:
    return f"{shard_name(unit_id)}{STATS_SUFFIX}"


def unit_files(unit_id: int) -> tuple[str, str, str]:
    """The three names of a unit inside shards/: tar, Parquet, stats."""
    return tar_name(unit_id), parquet_name(unit_id), stats_name(unit_id)


def parse_unit_file(name: str) -> tuple[int, str] | None:
    """'000012.tar' -> (12, '.tar'); '000012_stats.json' -> (12, '_stats.json'); else None."""
    m = _UNIT_FILE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def parse_tmp_file(name: str) -> int | None:
    """The unit of one of our temporary names ('.000012.tar.0123456789ab.tmp'), else None."""
    m = _TMP_FILE.match(name)
    return int(m.group(1)) if m else None


def is_root_tmp_file(name: str) -> bool:
    """One of our temporary names for run.json, index.json, the lease or the card, in OUT itself."""
    return bool(_ROOT_TMP_FILE.match(name))


def is_ours(run_or_index: object) -> bool:
    """Whether a parsed run.json / index.json was written by us (older outputs lack the
    producer field but carry our schema_version and fingerprint / wids kind)."""
    if not isinstance(run_or_index, dict):
        return False
    if run_or_index.get("producer") == PRODUCER:
        return True
    has_version = "schema_version" in run_or_index
    return has_version and ("fingerprint" in run_or_index or run_or_index.get("__kind__") == "wids-shard-index-v1")


def is_our_card(data: bytes) -> bool:
    """Whether the bytes of an OUT/README.md are a dataset card we wrote (it carries CARD_MARKER)."""
    return CARD_MARKER.encode() in data


def json_file_bytes(obj: dict) -> bytes:
    """The bytes of our JSON files (a unit's stats, run.json, index.json): indented, no NaN."""
    return (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode()
