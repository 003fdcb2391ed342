"""JSONL manifest: one JSON object per line (image path, id, text). Slices are byte ranges of
lines; the digest is the file's bytes."""
from __future__ import annotations

import hashlib
import json

from stages.inputs.records import InputRecord, Listing, Slice, Units, manifest_record, open_input, read_range


def list_units(path: str, per_unit: int, storage_options: dict | None = None) -> Listing:
    h = hashlib.sha256()
    units = Units("jsonl", per_unit, source=str(path))
    offset = 0
    with open_input(path, storage_options) as f:
        for line_no, raw in enumerate(f):
            h.update(raw)
            if raw.strip():
                units.add(offset, offset + len(raw), line=line_no)
            offset += len(raw)
    return Listing("jsonl", units.count, h.hexdigest()[:16], units.finish())


def read_unit(s: Slice, storage_options: dict | None = None) -> list[InputRecord]:
    records = []
    lines = read_range(s.source, s.start, s.stop, storage_options).splitlines(keepends=True)
    for line_no, raw in enumerate(lines, start=s.first_line):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8", errors="replace"))
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            records.append(InputRecord(f"line-{line_no + 1}", None, error=f"malformed_row: line {line_no + 1}: {exc}"))
            continue
        image = ("file", row["image"]) if isinstance(row.get("image"), str) else None
        records.append(manifest_record(row, line_no, image))
    return records
