"""Write one work unit as shard files, committed atomically; write the run-level files.

A unit is committed when `shards/NNNNNN_stats.json` exists: the tar and the Parquet file are
written first (each atomically, see stages.storage), and the stats file last, so a crash at
any point leaves either a committed unit or leftovers that stages.readers.output_state recognises and
removes. Tars have fixed headers (mtime 0, uid/gid 0, mode 0444, USTAR) so the same content
gives byte-identical tars.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.layout import SHARDS_DIR, json_file_bytes, shard_name, unit_files
from schemas.shard import (
    IMAGE_FORMATS,
    SCHEMA_VERSION,
    STATUSES,
    error_reason,
    mask_problem,
    member_name,
    table_from_rows,
)
from stages.imaging.codec import encode_image
from stages.imaging.compose import PairImages
from stages.storage import open_store

TAR_MTIME = 0  # fixed so identical content gives identical bytes
WRITE_CHUNK = 64  # samples encoded and typed at a time (bounds the write task's memory)


def _check_pair(key: str, pair: PairImages, method: str | None = None, lam: float | None = None) -> None:
    if pair.encoded is None:  # pixels to encode here (actor-encoded pairs carry JPEG bytes instead)
        for name in ("winner", "loser"):
            arr = getattr(pair, name)
            if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
                raise ValueError(f"{key}: {name} must be uint8 H x W x 3, got {arr.dtype} {arr.shape}")
        if pair.winner.shape != pair.loser.shape:
            raise ValueError(f"{key}: winner {pair.winner.shape} and loser {pair.loser.shape} differ")
    if pair.mask.dtype != np.uint8 or pair.mask.ndim != 2:
        raise ValueError(f"{key}: mask must be uint8 gh x gw, got {pair.mask.dtype} {pair.mask.shape}")
    problem = mask_problem(method, lam, None, pair.mask)  # the shard contract's rule (schemas.shard)
    if problem:
        raise ValueError(f"{key}: {problem}")


class _HashingFile:
    """File wrapper that feeds every written byte to md5 (for wids) and counts them."""

    def __init__(self, f):
        self.f, self.md5, self.size = f, hashlib.md5(), 0

    def write(self, data) -> int:
        self.md5.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_MTIME, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _encode_pair(row: dict, pair: PairImages, image_format: str, jpeg_quality: int) -> list[tuple[str, bytes]]:
    """Encode one ok sample's images, fill its row's image fields; returns its tar members."""
    key = row["key"]
    _check_pair(key, pair, row.get("method"), row.get("lam"))
    if pair.encoded is not None:  # JPEGs the encoder actor made (--device-encode): packed as they are
        if image_format != "jpg":
            raise ValueError(f"{key}: actor-encoded images are JPEG, the output is {image_format}")
        winner, loser = pair.encoded
    else:
        winner = encode_image(pair.winner, image_format, jpeg_quality)
        loser = encode_image(pair.loser, image_format, jpeg_quality)
    encoded = {"winner": winner, "loser": loser, "mask": encode_image(pair.mask, "png")}
    for part, data in encoded.items():
        row[f"{part}_sha256"] = hashlib.sha256(data).hexdigest()
    row["image_format"] = image_format
    row["jpeg_quality"] = int(jpeg_quality) if image_format == "jpg" else None
    return [(member_name(key, part, image_format), data) for part, data in encoded.items()]


def _append_chunk(tar: tarfile.TarFile, chunk: list[dict], images: Mapping[str, PairImages], image_format: str,
                  jpeg_quality: int) -> tuple[pa.Table, float]:
    """Encode a chunk's images, type its rows, append its ok samples to `tar`; returns the
    typed rows and the seconds spent encoding. Typed here so the JSON records are exactly what
    the Parquet file reads back."""
    t = time.perf_counter()
    members = {row["key"]: _encode_pair(row, images[row["key"]], image_format, jpeg_quality)
               for row in chunk if row["status"] == "ok"}
    encode_s = time.perf_counter() - t
    table = table_from_rows(chunk)
    for record in table.to_pylist():
        if record["status"] != "ok":
            continue
        key = record["key"]
        record_bytes = json.dumps(record, ensure_ascii=False, allow_nan=False).encode()
        for mname, data in [*members[key], (member_name(key, "json", image_format), record_bytes)]:
            tar.addfile(_tarinfo(mname, len(data)), io.BytesIO(data))
    return table, encode_s


def write_unit(
    out_dir,
    unit_id: int,
    rows: list[dict],
    images: Mapping[str, PairImages],
    *,
    image_format: str = "jpg",
    jpeg_quality: int = 95,
    fingerprint: str,
    extra_stats: dict | None = None,
) -> dict:
    """Write and commit unit `unit_id`: tar (ok samples), Parquet (all rows), then stats.

    `rows` are one per input in input order (every FIELDS key present, see
    `schemas.shard.empty_row`); ok rows need `images[row["key"]]`. Fills the fields only the
    writer knows, in `rows` (in place): the hashes, image_format, jpeg_quality, fingerprint.
    `out_dir` is the output directory (a path or a store). Returns the stats dict written.
    """
    t0 = time.perf_counter()
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image format {image_format!r} is not one of {IMAGE_FORMATS}")
    if not 1 <= int(jpeg_quality) <= 100:
        raise ValueError(f"jpeg quality {jpeg_quality} is not in 1..100")
    store = open_store(out_dir)
    store.makedirs(SHARDS_DIR)
    name = shard_name(unit_id)
    tar_name, pq_name, stats_name = (f"{SHARDS_DIR}/{n}" for n in unit_files(unit_id))
    seen = set()
    for pos, row in enumerate(rows):
        key = row.get("key")
        if key in seen:
            raise ValueError(f"unit {unit_id}: duplicate key {key!r}")
        seen.add(key)
        if row.get("status") not in STATUSES:
            raise ValueError(f"{key}: status {row.get('status')!r} is not one of {STATUSES}")
        if row["unit"] != unit_id or row["index"] != pos:
            raise ValueError(f"{key}: unit/index {row['unit']}/{row['index']} != {unit_id}/{pos}")
        if row["status"] != "ok" and key in images:
            raise ValueError(f"{key}: images given for a {row['status']} row")
        if row["status"] == "ok" and key not in images:
            raise ValueError(f"{key}: ok row without images")
        row["fingerprint"] = fingerprint
        row["schema_version"] = SCHEMA_VERSION

    # Streamed in chunks (_append_chunk): the task holds one chunk of encoded bytes, not the
    # unit's, so its memory does not grow with --samples-per-shard.
    tables, encode_s = [], 0.0
    t_start = time.perf_counter()
    try:
        with store.writer(tar_name) as raw:
            hf = _HashingFile(raw)
            with tarfile.open(fileobj=hf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for start in range(0, len(rows), WRITE_CHUNK):
                    table, seconds = _append_chunk(tar, rows[start : start + WRITE_CHUNK], images, image_format,
                                                   jpeg_quality)
                    tables.append(table)
                    encode_s += seconds
        tar_md5, tar_size = hf.md5.hexdigest(), hf.size
        t_tar = time.perf_counter()
        table = pa.concat_tables(tables).combine_chunks() if tables else table_from_rows([])
        with store.writer(pq_name) as f:
            pq.write_table(table, f, compression="zstd")
    except BaseException:  # not committed: take back a tar that was already renamed into place
        store.delete(tar_name)
        raise
    t_parquet = time.perf_counter()

    counts = {s: 0 for s in STATUSES}
    reasons: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] += 1
        if row["status"] != "ok":
            reason = error_reason(row.get("error"))
            reasons[reason] = reasons.get(reason, 0) + 1
    stats = {
        "unit": unit_id,
        "shard": name,
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fingerprint,
        "image_format": image_format,
        "counts": {"total": len(rows), **counts},
        "errors": dict(sorted(reasons.items())),
        "tar": {"file": f"{name}.tar", "nsamples": counts["ok"], "filesize": tar_size, "md5sum": tar_md5},
        "parquet": {"file": f"{name}.parquet", "rows": len(rows), "filesize": store.size(pq_name)},
        "timings": {
            "encode_s": round(t_start - t0 + encode_s, 6),  # row checks included, as before
            "tar_s": round(t_tar - t_start - encode_s, 6),
            "parquet_s": round(t_parquet - t_tar, 6),
        },
    }
    extra = dict(extra_stats or {})
    stats["timings"].update(extra.pop("timings", {}) or {})
    stats.update(extra)
    stats["timings"]["write_s"] = round(time.perf_counter() - t0, 6)
    try:
        store.write_bytes(stats_name, json_file_bytes(stats))  # the commit
    except BaseException:
        if not store.exists(stats_name):  # not committed: take back the tar and parquet too
            store.delete(tar_name)
            store.delete(pq_name)
        raise
    return stats
