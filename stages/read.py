"""Reading inputs in the CPU prepare task: the records of one unit's slice, and the bytes of
each record's image.

A malformed row becomes a record with `error` set, never an exception for the whole unit.
Image paths are confined to the image root: absolute paths, `..` escapes and symlinks that
leave it are refused per row. Only regular files are read: a FIFO or a device named like an
image would block or never end, so it becomes a failed row instead of a stalled unit.
"""
from __future__ import annotations

import json
import os
import posixpath
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from stages.listing import Slice, parquet_columns
from stages.storage import input_fs, is_url, local_path, read_with_retries

PROMPT_COLUMNS = ("prompt", "question", "caption", "text")
MAX_FILE_BYTES = 512 << 20  # larger image files are refused before reading (too_large)


@dataclass
class InputRecord:
    """One input sample. `image` says where the image is: ("file", path relative to the image
    root), ("tar", tar path, data offset, size, member name), ("parquet", file, row, column)
    or None (text-only)."""

    source_id: str
    image: tuple | None
    prompt: str | None = None
    answer: str | None = None
    conversations: str | None = None  # JSON text of the LLaVA conversation list
    label: str | None = None
    error: str | None = None  # set when the row itself is malformed
    extra: dict = field(default_factory=dict)


class InputError(Exception):
    """A per-row problem: becomes a failed row whose error starts with `reason`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def clean_text(value: str | None) -> str | None:
    """Text that can be stored as UTF-8: JSON escapes such as "\\ud800" decode to lone
    surrogates, which Arrow and JSON encoders refuse; they become U+FFFD instead of costing
    the whole unit."""
    if value is None:
        return None
    return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


# --- the records of a slice --------------------------------------------------------------


def read_slice(s: Slice, storage_options: dict | None = None) -> list[InputRecord]:
    """The records of one unit, in input order (the input local or under an fsspec URL)."""
    reader = {"llava": _read_llava, "jsonl": _read_jsonl, "parquet": _read_parquet, "folder": _read_folder,
              "webdataset": _read_webdataset}[s.kind]
    records = reader(s, storage_options)
    if len(records) != s.count:
        raise ValueError(f"{s.source or s.kind}: {len(records)} records where the listing found {s.count}; "
                         "the input changed while the run was going")
    return records


def _open(path: str, storage_options: dict | None):
    fs, p = input_fs(path, storage_options)
    return read_with_retries(fs.open, p, "rb")


def _read_range(path: str, start: int, stop: int, storage_options: dict | None) -> bytes:
    with _open(path, storage_options) as f:  # on an object store: one range request
        f.seek(start)
        return f.read(stop - start)


def _read_llava(s: Slice, storage_options: dict | None = None) -> list[InputRecord]:
    text = _read_range(s.source, s.start, s.stop, storage_options).decode("utf-8", errors="replace")
    rows = json.loads("[" + text + "]")  # the slice runs from its first element to its last
    return [_llava_record(s.first_index + i, row) for i, row in enumerate(rows)]


def _llava_record(i: int, row) -> InputRecord:
    if not isinstance(row, dict):
        return InputRecord(f"row-{i}", None, error=f"malformed_row: entry {i} is {type(row).__name__}, not an object")
    source_id = str(row.get("id", f"row-{i}"))
    conv = row.get("conversations")
    if conv is not None and not _valid_conversations(conv):
        return InputRecord(source_id, None, error="malformed_row: conversations must be a list of {from, value}")
    prompt, answer = _first_turn(conv or [])
    image = row.get("image")
    if image is not None and not isinstance(image, str):
        return InputRecord(source_id, None, error="malformed_row: image must be a path string")
    return InputRecord(
        source_id,
        ("file", image) if image else None,
        prompt=prompt,
        answer=answer,
        conversations=json.dumps(conv, ensure_ascii=False) if conv is not None else None,
    )


def _valid_conversations(conv) -> bool:
    return isinstance(conv, list) and all(isinstance(t, dict) and isinstance(t.get("value", ""), str) for t in conv)


def _first_turn(conv: list) -> tuple[str | None, str | None]:
    """Prompt = first human turn without the <image> placeholder; answer = the reply to it."""
    prompt = answer = None
    for turn in conv:
        role, value = turn.get("from"), turn.get("value", "")
        if role == "human" and prompt is None:
            prompt = value.replace("<image>", "").strip()
        elif role == "gpt" and prompt is not None:
            answer = value
            break
    return prompt, answer


def _read_jsonl(s: Slice, storage_options: dict | None = None) -> list[InputRecord]:
    records = []
    lines = _read_range(s.source, s.start, s.stop, storage_options).splitlines(keepends=True)
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
        records.append(_manifest_record(row, line_no, image))
    return records


def _read_parquet(s: Slice, storage_options: dict | None = None) -> list[InputRecord]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(_open(s.source, storage_options))
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
                records.append(_manifest_record(row, row_number, ref))
        first += n
    return records


def _manifest_record(row: dict, i: int, image_ref) -> InputRecord:
    record = InputRecord(str(row.get("id", f"row-{i}")), image_ref)
    _fill_text(record, row)
    return record


def _fill_text(record: InputRecord, meta: dict) -> None:
    conv = meta.get("conversations")
    if isinstance(conv, str):
        try:
            conv = json.loads(conv)
        except json.JSONDecodeError:
            conv = None
    if conv is not None and _valid_conversations(conv):
        record.conversations = json.dumps(conv, ensure_ascii=False)
        record.prompt, record.answer = _first_turn(conv)
    for col in PROMPT_COLUMNS:
        if record.prompt is None and isinstance(meta.get(col), str):
            record.prompt = meta[col]
    if record.answer is None and isinstance(meta.get("answer"), str):
        record.answer = meta["answer"]
    if record.label is None and meta.get("label") is not None:
        record.label = str(meta["label"])


def _read_folder(s: Slice, storage_options: dict | None = None) -> list[InputRecord]:
    return [InputRecord(rel, ("file", rel), label=rel.split("/")[0] if s.folder_labels and "/" in rel else None)
            for rel in s.items]


def _read_webdataset(s: Slice, storage_options: dict | None = None) -> list[InputRecord]:
    records, handles = [], {"storage_options": storage_options}
    try:
        for sample in s.items:
            image = ("tar", sample.tar, sample.image[1], sample.image[2], sample.image[0]) if sample.image else None
            record = InputRecord(sample.key, image)
            for ext, offset, size in sample.texts:
                try:
                    _fill_tar_text(record, ext, _read_at(handles, sample.tar, offset, size))
                except InputError as exc:
                    record.error = f"malformed_row: {ext} member: {exc}"
            records.append(record)
    finally:
        close_handles(handles)
    return records


def _fill_tar_text(record: InputRecord, ext: str, data: bytes) -> None:
    """prompt/answer/label of a tar sample from one of its json/txt/cls members."""
    raw = data.decode("utf-8", errors="replace")
    if ext == "json":
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError:
            record.error = "malformed_row: json member is not valid JSON"
            return
        if isinstance(meta, dict):
            _fill_text(record, meta)
    elif ext == "txt":
        record.prompt = record.prompt or raw.strip()
    elif ext == "cls":
        record.label = raw.strip()


def _read_at(handles: dict, path: str, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of a tar (its members are read in place, never extracted; on an
    object store, a range request)."""
    if path not in handles:
        handles[path] = _open(path, handles.get("storage_options"))
    f = handles[path]
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise InputError("corrupt_image", f"tar member at {offset} is cut short in {path}")
    return data


# --- image bytes -------------------------------------------------------------------------


def resolve_inside(root: Path, relative: str) -> Path:
    """The real path of `relative` under `root`; refuses anything that would leave root."""
    if os.path.isabs(relative) or relative.startswith("~"):
        raise InputError("path_outside_root", f"absolute path {relative!r} refused")
    if ".." in Path(relative).parts:
        raise InputError("path_outside_root", f"path {relative!r} escapes the image root")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, relative))
    if os.path.commonpath([real_root, real]) != real_root:
        raise InputError("path_outside_root", f"path {relative!r} resolves outside the image root (symlink?)")
    return Path(real)


def read_image_file(path: Path, name: str) -> bytes:
    """Bytes of a regular file. Opened non-blocking, so a FIFO cannot stall the task; anything
    that is not a regular file, or is implausibly large for an image, is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise InputError("missing_file", f"{name} not found") from None
    except OSError as exc:
        raise InputError("unreadable_file", f"{name}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError("not_a_file", f"{name} is not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise InputError("too_large", f"{name} is {info.st_size >> 20} MiB (limit {MAX_FILE_BYTES >> 20} MiB)")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        try:
            return f.read()
        except OSError as exc:
            raise InputError("unreadable_file", f"{name}: {exc.strerror or exc}") from None


def key_inside(root: str, relative: str) -> str:
    """The object key of `relative` under an object-store root URL; refuses anything that would
    leave the root's prefix (absolute keys, URLs of other buckets, '..' escapes)."""
    if "://" in relative or relative.startswith(("/", "\\", "~")):
        raise InputError("path_outside_root", f"absolute path {relative!r} refused")
    normal = posixpath.normpath(relative)
    if normal == ".." or normal.startswith("../") or ".." in PurePosixPath(relative).parts:
        raise InputError("path_outside_root", f"path {relative!r} escapes the image root")
    return f"{root.rstrip('/')}/{normal}"


def read_image_object(url: str, name: str, storage_options: dict | None) -> bytes:
    """Bytes of an image object; at most MAX_FILE_BYTES are fetched (a bigger one is refused)."""
    fs, path = input_fs(url, storage_options)
    try:
        with read_with_retries(fs.open, path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise InputError("missing_file", f"{name} not found") from None
    except (PermissionError, IsADirectoryError) as exc:
        raise InputError("unreadable_file", f"{name}: {exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise InputError("too_large", f"{name} is over {MAX_FILE_BYTES >> 20} MiB")
    return data


def load_image_bytes(ref: tuple, image_root, cache: dict | None = None, storage_options: dict | None = None) -> bytes:
    """Bytes of one image. `cache` keeps open tar files and Parquet row groups across a unit."""
    kind = ref[0]
    cache = {} if cache is None else cache
    cache.setdefault("storage_options", storage_options)
    if kind == "file":
        if image_root is None:
            raise InputError("no_image_root", "image paths need --image-root")
        if is_url(str(image_root)):
            return read_image_object(key_inside(str(image_root), ref[1]), ref[1], storage_options)
        return read_image_file(resolve_inside(Path(local_path(image_root)), ref[1]), ref[1])
    if kind == "tar":
        _, path, offset, size, _name = ref
        if size > MAX_FILE_BYTES:
            raise InputError("too_large", f"tar member is {size >> 20} MiB (limit {MAX_FILE_BYTES >> 20} MiB)")
        return _read_at(cache, path, offset, size)
    if kind == "parquet":
        _, path, row, column = ref
        group, local = _parquet_position(cache, path, row)
        key = (path, group, column)
        if key not in cache:
            cache[key] = _parquet_file(cache, path).read_row_group(group, columns=[column]).column(0).to_pylist()
        value = cache[key][local]
        if not value:
            raise InputError("empty_file", "image bytes are empty")
        return value
    raise ValueError(f"unknown image reference {ref!r}")


def _parquet_position(cache: dict, path: str, row: int) -> tuple[int, int]:
    """(row group, row inside it) of a manifest row."""
    key = ("rows", path)
    if key not in cache:
        meta = _parquet_file(cache, path).metadata
        cache[key] = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    for group, n in enumerate(cache[key]):
        if row < n:
            return group, row
        row -= n
    raise ValueError(f"row beyond the end of {path}")


def _parquet_file(cache: dict, path: str):
    """The manifest's ParquetFile, opened once per unit (its file closes with the unit's handles)."""
    key = ("file", path)
    if key not in cache:
        import pyarrow.parquet as pq

        cache[key] = _open(path, cache.get("storage_options"))
        cache[("pf", path)] = pq.ParquetFile(cache[key])
    return cache[("pf", path)]


def close_handles(cache: dict) -> None:
    for value in cache.values():
        if hasattr(value, "close"):
            value.close()
    cache.clear()
