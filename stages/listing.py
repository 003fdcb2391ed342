"""The driver's view of an input: what kind it is, how many records, a digest of them, and
where each work unit's records are. It streams: memory stays bounded whatever the input's
size (a 1 GB LLaVA JSON is read in chunks), and the driver keeps one small `Slice` per unit
instead of the records. Each CPU prepare task reads its own slice (stages.read).

Kinds:
- LLaVA instruction JSON: a list of {id, image, conversations}; slices are byte ranges.
- JSONL manifest: slices are byte ranges of lines.
- Parquet manifest: slices are row ranges.
- A folder of images (recursive): slices carry the relative paths.
- Webdataset tars (a tar, a glob, a brace list, or a folder of tars): slices carry, per
  sample, where its image and text members lie in their tar (offset, size).

The digest identifies the records: the file's bytes for JSON/JSONL; the text columns and
the file's row-group layout for Parquet; the sorted relative paths for a folder; every
member's name and size and the text members' bytes for tars. A resume whose digest differs
is refused, so units of two different inputs are never mixed.
"""
from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import braceexpand

from stages.errors import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TEXT_EXTS = ("json", "txt", "cls")
BYTES_COLUMNS = ("image_bytes", "bytes", "jpg", "png")
CHUNK = 8 << 20  # bytes read at a time while listing


@dataclass(frozen=True)
class Slice:
    """Where one unit's records are. `first_index`: input_index of its first record."""

    kind: str
    source: str = ""  # the input file (llava, jsonl, parquet)
    start: int = 0  # byte offset (llava, jsonl) or row (parquet)
    stop: int = 0
    first_index: int = 0
    count: int = 0
    first_line: int = 0  # jsonl: file line number (0-based) at `start`
    items: tuple = ()  # folder: relative paths; webdataset: TarSample per record
    folder_labels: bool = False


@dataclass(frozen=True)
class TarSample:
    """One webdataset sample: its tar, key, image member and text members, each as
    (name or ext, offset of the data in the tar, size)."""

    tar: str
    key: str
    image: tuple | None
    texts: tuple = ()


@dataclass
class Listing:
    kind: str
    count: int
    digest: str
    slices: list[Slice] = field(default_factory=list)


def detect_kind(path: str) -> str:
    p = Path(path)
    if any(c in path for c in "*{?") or p.suffix == ".tar":
        return "webdataset"
    if p.is_dir():
        return "webdataset" if any(p.glob("*.tar")) and not _has_images(p) else "folder"
    if not p.exists():
        raise UserError(f"input {path} does not exist")
    kinds = {".json": "llava", ".jsonl": "jsonl", ".parquet": "parquet"}
    if p.suffix.lower() not in kinds:
        raise UserError(f"cannot tell the input kind of {path}: use a LLaVA .json, a .jsonl or .parquet manifest, .tar shards or an image folder")
    return kinds[p.suffix.lower()]


def _has_images(folder: Path) -> bool:
    return any(f.suffix.lower() in IMAGE_EXTS for f in folder.rglob("*") if f.is_file())


def default_image_root(input_path: str, kind: str) -> str | None:
    """Without --image-root: an image folder is its own root, and a JSON/JSONL/Parquet file's
    relative image paths resolve next to it (as LLaVA's data layout has them)."""
    if kind == "folder":
        return input_path
    if kind in ("llava", "jsonl", "parquet"):
        return str(Path(input_path).resolve().parent)
    return None


def list_input(path: str, per_unit: int, *, folder_labels: bool = False) -> Listing:
    """Stream the input once: its kind, record count, digest and one slice per unit."""
    if per_unit < 1:
        raise ValueError(f"per_unit must be >= 1, got {per_unit}")
    kind = detect_kind(path)
    lister = {"llava": _list_llava, "jsonl": _list_jsonl, "parquet": _list_parquet, "folder": _list_folder,
              "webdataset": _list_webdataset}[kind]
    if kind == "folder":
        return lister(path, per_unit, folder_labels)
    return lister(path, per_unit)


class _Units:
    """Collects records into slices of `per_unit`: call `add(start, end)` per record with its
    position (byte offset, row, ...) and `items` where the slice carries them."""

    def __init__(self, kind: str, per_unit: int, **common):
        self.kind, self.per_unit, self.common = kind, per_unit, common
        self.slices: list[Slice] = []
        self.count = 0
        self._start = self._end = 0
        self._items: list = []
        self._first_line = 0

    def add(self, start: int = 0, end: int = 0, item=None, line: int = 0) -> None:
        if self.count % self.per_unit == 0:
            self._start, self._items, self._first_line = start, [], line
        self._end = end
        if item is not None:
            self._items.append(item)
        self.count += 1
        if self.count % self.per_unit == 0:
            self._close()

    def _close(self) -> None:
        n = self.count - len(self.slices) * self.per_unit
        self.slices.append(Slice(self.kind, start=self._start, stop=self._end, first_index=self.count - n, count=n,
                                 first_line=self._first_line, items=tuple(self._items), **self.common))

    def finish(self) -> list[Slice]:
        if self.count % self.per_unit:
            self._close()
        return self.slices


# --- LLaVA JSON: a streamed top-level array ---------------------------------------------


def _chunks(f: BinaryIO, h) -> Iterator[bytes]:
    while data := f.read(CHUNK):
        h.update(data)
        yield data


def _list_llava(path: str, per_unit: int) -> Listing:
    """Element boundaries of the top-level JSON array, found by parsing one element at a time
    from a sliding buffer. Bytes are decoded with surrogateescape so character positions map
    back to exact byte offsets (slices are byte ranges)."""
    h = hashlib.sha256()
    units = _Units("llava", per_unit, source=str(path))
    decoder = json.JSONDecoder()
    with open(path, "rb") as f:
        chunks = _chunks(f, h)
        utf8 = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        buf, pos, eof = "", 0, False
        mark_char, mark_byte = 0, 0  # buf[mark_char] is at byte mark_byte of the file

        def more() -> bool:
            nonlocal buf, pos, eof, mark_char
            if eof:
                return False
            byte_at(pos)  # move the mark up to pos, then drop what is parsed
            buf, mark_char, pos = buf[pos:], 0, 0
            data = next(chunks, None)
            if data is None:
                eof = True
                buf += utf8.decode(b"", final=True)
                return False
            buf += utf8.decode(data)
            return True

        def byte_at(i: int) -> int:
            """Byte offset of buf[i] (i >= the last one asked for): only the new stretch is encoded."""
            nonlocal mark_char, mark_byte
            mark_byte += len(buf[mark_char:i].encode("utf-8", "surrogateescape"))
            mark_char = i
            return mark_byte

        def peek() -> str:
            """Skip whitespace; the next character, or '' at the end of the file."""
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf):
                    return buf[pos]
                if not more():
                    return ""

        def invalid(at: int, msg: str) -> UserError:
            return UserError(f"{path} is not valid JSON near byte {byte_at(at)} ({msg}); "
                             "expected a LLaVA list of {id, image, conversations}")

        if peek() == "\ufeff":  # a byte-order mark
            pos += 1
        first = peek()
        if first != "[":
            kind = "an object" if first == "{" else "empty" if first == "" else "not a JSON list"
            raise UserError(f"{path} must hold a JSON list of {{id, image, conversations}} objects (it is {kind})")
        pos += 1
        closed = peek() == "]"
        while not closed:
            if peek() == "":
                raise invalid(pos, "the list is not closed: truncated?")
            while True:
                try:
                    _, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:  # a number could go on in the next chunk
                        break
                except json.JSONDecodeError as exc:
                    if eof:
                        raise invalid(exc.pos, exc.msg) from None
                more()
            units.add(byte_at(pos), byte_at(end))
            pos = end
            sep = peek()
            if sep not in (",", "]"):
                raise invalid(pos, "expected ',' or ']' after an element" if sep else "the list is not closed: truncated?")
            pos += 1
            closed = sep == "]"
        if peek() != "":
            raise invalid(pos, "extra data after the list")
    return Listing("llava", units.count, h.hexdigest()[:16], units.finish())


# --- JSONL -------------------------------------------------------------------------------


def _list_jsonl(path: str, per_unit: int) -> Listing:
    h = hashlib.sha256()
    units = _Units("jsonl", per_unit, source=str(path))
    offset = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f):
            h.update(raw)
            if raw.strip():
                units.add(offset, offset + len(raw), line=line_no)
            offset += len(raw)
    return Listing("jsonl", units.count, h.hexdigest()[:16], units.finish())


# --- Parquet -------------------------------------------------------------------------------


def parquet_columns(names: list[str]) -> tuple[str | None, list[str]]:
    """(the image-bytes column or None, the text columns) of a manifest."""
    bytes_col = next((c for c in BYTES_COLUMNS if c in names), None)
    return bytes_col, [c for c in names if c != bytes_col]


def _list_parquet(path: str, per_unit: int) -> Listing:
    """Rows from the footer; the digest from the raw bytes of the text columns' chunks (their
    content as stored, hashed without decoding) and the sizes of the image-bytes chunks."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise UserError(f"cannot read parquet manifest {path}: {exc}") from None
    meta = pf.metadata
    bytes_col, _ = parquet_columns(pf.schema_arrow.names)
    h = hashlib.sha256(str(pf.schema_arrow).encode())
    with open(path, "rb") as f:
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
    units = _Units("parquet", per_unit, source=str(path))
    for row in range(meta.num_rows):
        units.add(row, row + 1)
    return Listing("parquet", units.count, h.hexdigest()[:16], units.finish())


# --- image folder -------------------------------------------------------------------------


def _walk(root: Path, rel: str = "") -> Iterator[str]:
    with os.scandir(root / rel if rel else root) as entries:
        for e in entries:
            name = f"{rel}/{e.name}" if rel else e.name
            if e.is_dir(follow_symlinks=False):
                yield from _walk(root, name)
            elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTS and (e.is_file() or e.is_symlink()):
                yield name


def _list_folder(path: str, per_unit: int, folder_labels: bool) -> Listing:
    names = sorted(_walk(Path(path)))
    h = hashlib.sha256()
    units = _Units("folder", per_unit, folder_labels=folder_labels)
    for name in names:
        h.update(name.encode("utf-8", "surrogateescape") + b"\n")
        units.add(item=name)
    return Listing("folder", units.count, h.hexdigest()[:16], units.finish())


# --- webdataset tars ----------------------------------------------------------------------


def expand_tar_paths(spec: str) -> list[str]:
    if Path(spec).is_dir():
        paths = sorted(str(p) for p in Path(spec).glob("*.tar"))
    else:
        paths = sorted({p for s in braceexpand.braceexpand(spec) for p in (glob.glob(s) if any(c in s for c in "*?[") else [s])})
    missing = [p for p in paths if not Path(p).is_file()]
    if not paths or missing:
        raise UserError(f"no webdataset tars found for {spec}" + (f" (missing: {missing[0]})" if missing else ""))
    return paths


def _tar_samples(tar_path: str, h) -> list[TarSample]:
    """Samples of one tar in order of first appearance (webdataset groups members by the part
    of the name before the first dot of its basename). Streams the tar once: text members are
    hashed as they pass, image members only by name and size."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(tar_path, mode="r|") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                key, _, ext = base.partition(".")
                key = os.path.join(os.path.dirname(m.name), key)
                ext = ext.lower()
                h.update(json.dumps([m.name, m.size]).encode("utf-8", "surrogateescape"))
                parts = samples.setdefault(key, {})
                if ext in TEXT_EXTS:
                    h.update(tf.extractfile(m).read())
                parts[ext] = (m.name, m.offset_data, m.size)  # a repeated extension: the last one counts
    except (tarfile.TarError, OSError) as exc:
        raise UserError(f"cannot read webdataset tar {tar_path}: {exc}") from None
    out = []
    for key, parts in samples.items():
        image = next((parts[e] for e in parts if "." + e in IMAGE_EXTS), None)
        texts = tuple((e, parts[e][1], parts[e][2]) for e in TEXT_EXTS if e in parts)
        out.append(TarSample(tar_path, key, image, texts))
    return out


def _list_webdataset(spec: str, per_unit: int) -> Listing:
    h = hashlib.sha256()
    units = _Units("webdataset", per_unit)
    for tar_path in expand_tar_paths(spec):
        h.update(f"tar {os.path.getsize(tar_path)}\n".encode())
        for sample in _tar_samples(tar_path, h):
            units.add(item=sample)
    return Listing("webdataset", units.count, h.hexdigest()[:16], units.finish())
