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
import hashlib
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

import braceexpand

from stages.errors import UserError, one_line
from stages.storage import input_fs, is_url, local_path

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
    lister = {"llava": _list_llava, "jsonl": _list_jsonl, "parquet": _list_parquet, "folder": _list_folder,
              "webdataset": _list_webdataset}[kind]
    try:
        if kind == "folder":
            return lister(path, per_unit, storage_options, folder_labels)
        return lister(path, per_unit, storage_options)
    except UserError:
        raise
    except (OSError, ValueError) as exc:  # the input went away or the store failed after retries
        raise UserError(f"cannot read input {path}: {one_line(exc)}") from None


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


def _open(path: str, storage_options: dict | None):
    fs, p = input_fs(path, storage_options)
    return fs.open(p, "rb")


def _list_llava(path: str, per_unit: int, storage_options: dict | None = None) -> Listing:
    """Element boundaries of the top-level JSON array, found by parsing one element at a time
    from a sliding buffer. Bytes are decoded with surrogateescape so character positions map
    back to exact byte offsets (slices are byte ranges)."""
    h = hashlib.sha256()
    units = _Units("llava", per_unit, source=str(path))
    decoder = json.JSONDecoder()
    with _open(path, storage_options) as f:
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


def _list_jsonl(path: str, per_unit: int, storage_options: dict | None = None) -> Listing:
    h = hashlib.sha256()
    units = _Units("jsonl", per_unit, source=str(path))
    offset = 0
    with _open(path, storage_options) as f:
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


def _list_parquet(path: str, per_unit: int, storage_options: dict | None = None) -> Listing:
    """Rows from the footer; the digest from the raw bytes of the text columns' chunks (their
    content as stored, hashed without decoding) and the sizes of the image-bytes chunks."""
    import pyarrow.parquet as pq

    f = _open(path, storage_options)
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


def _list_folder(path: str, per_unit: int, storage_options: dict | None, folder_labels: bool) -> Listing:
    if is_url(path):  # an object store: keys under the prefix (no symlinks there)
        fs, root = input_fs(path, storage_options)
        root = root.rstrip("/")
        names = sorted(f[len(root) + 1:] for f in fs.find(root) if os.path.splitext(f)[1].lower() in IMAGE_EXTS)
    else:
        names = sorted(_walk(Path(local_path(path))))
    h = hashlib.sha256()
    units = _Units("folder", per_unit, folder_labels=folder_labels)
    for name in names:
        h.update(name.encode("utf-8", "surrogateescape") + b"\n")
        units.add(item=name)
    return Listing("folder", units.count, h.hexdigest()[:16], units.finish())


# --- webdataset tars ----------------------------------------------------------------------


def expand_tar_paths(spec: str, storage_options: dict | None = None) -> list[str]:
    """The tars a webdataset spec names (a tar, a folder of tars, a glob, a {a..b} list), local
    or under an fsspec URL; URLs come back as URLs."""
    fs, root = input_fs(spec, storage_options)
    prefix = spec[: spec.index("://") + 3] if is_url(spec) else ""

    def as_spec(p: str) -> str:  # a file system path back to the form the user gave
        return prefix + p if prefix and "://" not in p else p

    pattern = "{" in spec or any(c in spec for c in "*?[")
    if not pattern and fs.isdir(root):
        paths = sorted(as_spec(p) for p in fs.ls(root, detail=False) if str(p).endswith(".tar"))
    else:
        paths = set()
        for one in braceexpand.braceexpand(spec):
            if any(c in one for c in "*?["):
                paths.update(as_spec(p) for p in fs.glob(input_fs(one, storage_options)[1]))
            else:
                paths.add(one)
        paths = sorted(paths)
    missing = [p for p in paths if not fs.isfile(input_fs(p, storage_options)[1])]
    if not paths or missing:
        raise UserError(f"no webdataset tars found for {spec}" + (f" (missing: {missing[0]})" if missing else ""))
    return paths


def _tar_samples(tar_path: str, h, storage_options: dict | None = None) -> list[TarSample]:
    """Samples of one tar in order of first appearance (webdataset groups members by the part
    of the name before the first dot of its basename). Streams the tar once: text members are
    hashed as they pass, image members only by name and size."""
    samples: dict[str, dict] = {}
    try:
        with _open(tar_path, storage_options) as f, tarfile.open(fileobj=f, mode="r|") as tf:
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


def _list_webdataset(spec: str, per_unit: int, storage_options: dict | None = None) -> Listing:
    h = hashlib.sha256()
    units = _Units("webdataset", per_unit)
    for tar_path in expand_tar_paths(spec, storage_options):
        fs, p = input_fs(tar_path, storage_options)
        h.update(f"tar {fs.size(p)}\n".encode())
        for sample in _tar_samples(tar_path, h, storage_options):
            units.add(item=sample)
    return Listing("webdataset", units.count, h.hexdigest()[:16], units.finish())
