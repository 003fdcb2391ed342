"""Parquet manifest: an image path or image-bytes column plus id and text columns. Slices are
row ranges; the digest is the text columns' raw chunks and the image chunks' sizes."""
from __future__ import annotations

import hashlib

from stages.errors import UserError
from stages.inputs.records import CHUNK, InputRecord, Listing, Slice, Units, manifest_record, open_input


BYTES_COLUMNS = ("image_bytes", "bytes", "jpg", "png")


def parquet_columns(names: list[str]) -> tuple[str | None, list[str]]:
    """(the image-bytes column or None, the text columns) of a manifest."""
    bytes_col = next((c for c in BYTES_COLUMNS if c in names), None)
    return bytes_col, [c for c in names if c != bytes_col]


def list_units(path: str, per_unit: int, storage_options: dict | None = None) -> Listing:
    """Rows from the footer; the digest from the raw bytes of the text columns' chunks (their
    content as stored, hashed without decoding) and the sizes of the image-bytes chunks."""
    import pyarrow.parquet as pq

    f = open_input(path, storage_options)
    try:
        pf = pq.ParquetFile(f)
    except Exception as exc:  # pyarrow raises several types for a bad file
        f.close()
        raise UserError(f"cannot read parquet manifest {path}: {exc}") from None
    meta = pf.metadata
    bytes_col, _ = parquet_columns(pf.schema_arrow.names)
    h = hashlib.sha256(str(pf.schema_arrow).encode())
    with f:
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            h.update(f"group {group.num_rows}\n".encode())
            for c in range(group.num_columns):
                chunk = group.column(c)
                h.update(f"{chunk.path_in_schema} {chunk.total_compressed_size}\n".encode())
                if chunk.path_in_schema.split(".")[0] == bytes_col:
                    continue
                start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
                f.seek(start)
                left = chunk.total_compressed_size
                while left > 0 and (data := f.read(min(left, CHUNK))):
                    h.update(data)
                    left -= len(data)
    units = Units("parquet", per_unit, source=str(path))
    for row in range(meta.num_rows):
        units.add(row, row + 1)
    return Listing("parquet", units.count, h.hexdigest()[:16], units.finish())


def read_unit(s: Slice, storage_options: dict | None = None) -> list[InputRecord]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(open_input(s.source, storage_options))
    bytes_col, text_cols = parquet_columns(pf.schema_arrow.names)
    records, first = [], 0
    for group in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(group).num_rows
        lo, hi = max(s.start, first), min(s.stop, first + n)
        if lo < hi:
            rows = pf.read_row_group(group, columns=text_cols).slice(lo - first, hi - lo).to_pylist()
            for row_number, row in enumerate(rows, start=lo):
                if bytes_col:
                    ref = ("parquet", s.source, row_number, bytes_col)
                else:
                    ref = ("file", row["image"]) if isinstance(row.get("image"), str) else None
                records.append(manifest_record(row, row_number, ref))
        first += n
    return records
