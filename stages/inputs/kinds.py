"""The input kinds, one module each (llava, jsonl, parquet, folder, webdataset: its listing and its
reading), behind one registry. The driver streams an input once (`list_input`: its kind, record
count, digest and one small `Slice` per unit, never the records); each prepare task reads its own
slice (`read_slice`). Memory stays bounded whatever the input's size.

The digest identifies the records: a resume whose digest differs is refused, so units of two
different inputs are never mixed."""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from stages.errors import UserError, one_line
from stages.inputs import folder, jsonl, llava, parquet, webdataset
from stages.inputs.records import IMAGE_EXTS, InputRecord, Listing, Slice
from stages.storage import input_fs, is_url, local_path

KINDS = {"llava": llava, "jsonl": jsonl, "parquet": parquet, "folder": folder, "webdataset": webdataset}


def detect_kind(path: str, storage_options: dict | None = None) -> str:
    """The input's kind from its name, or from what a folder holds. Local or any fsspec URL."""
    suffix = PurePosixPath(path.split("://", 1)[-1]).suffix.lower()
    if any(c in path for c in "*{?") or suffix == ".tar":
        return "webdataset"
    try:
        fs, p = input_fs(path, storage_options)
        if fs.isdir(p):
            return "webdataset" if _has_tars(fs, p) and not _has_images(fs, p) else "folder"
        exists = fs.exists(p)
    except Exception as exc:  # no such bucket, no endpoint, no credentials: one line, not a traceback
        raise UserError(f"cannot read input {path}: {one_line(exc)}") from None
    if not exists:
        raise UserError(f"input {path} does not exist")
    kinds = {".json": "llava", ".jsonl": "jsonl", ".parquet": "parquet"}
    if suffix not in kinds:
        raise UserError(f"cannot tell the input kind of {path}: use a LLaVA .json, a .jsonl or .parquet manifest, .tar shards or an image folder")
    return kinds[suffix]


def _has_tars(fs, folder: str) -> bool:
    return any(str(name).endswith(".tar") for name in fs.ls(folder, detail=False))


def _has_images(fs, folder: str) -> bool:
    return any(os.path.splitext(str(f))[1].lower() in IMAGE_EXTS for f in fs.find(folder))


def default_image_root(input_path: str, kind: str) -> str | None:
    """Without --image-root: an image folder is its own root, and a JSON/JSONL/Parquet file's
    relative image paths resolve next to it (as LLaVA's data layout has them)."""
    if kind == "folder":
        return input_path
    if kind in ("llava", "jsonl", "parquet"):
        if is_url(input_path):
            return input_path.rsplit("/", 1)[0]
        return str(Path(local_path(input_path)).resolve().parent)
    return None


def list_input(path: str, per_unit: int, *, folder_labels: bool = False, storage_options: dict | None = None) -> Listing:
    """Stream the input once: its kind, record count, digest and one slice per unit."""
    if per_unit < 1:
        raise ValueError(f"per_unit must be >= 1, got {per_unit}")
    kind = detect_kind(path, storage_options)
    try:
        options = {"folder_labels": folder_labels} if kind == "folder" else {}
        return KINDS[kind].list_units(path, per_unit, storage_options, **options)
    except UserError:
        raise
    except (OSError, ValueError) as exc:  # the input went away or the store failed after retries
        raise UserError(f"cannot read input {path}: {one_line(exc)}") from None


def read_slice(s: Slice, storage_options: dict | None = None) -> list[InputRecord]:
    """The records of one unit, in input order (the input local or under an fsspec URL)."""
    records = KINDS[s.kind].read_unit(s, storage_options)
    if len(records) != s.count:
        raise ValueError(f"{s.source or s.kind}: {len(records)} records where the listing found {s.count}; "
                         "the input changed while the run was going")
    return records
