"""Torch-free reading of our shards, on local disk or an object store: find the committed
tars, read tar samples safely, read Parquet with a schema check. Used by the loader,
validate, inspect and preview."""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from schemas.layout import RUN_FILE, SHARDS_DIR, STATS_SUFFIX
from schemas.shard import check_arrow_schema, check_schema_version, part_ext
from stages.errors import UserError, one_line
from stages.readers.output_state import committed_units
from stages.storage import is_url, open_store


@dataclass(frozen=True)
class ShardRef:
    """One tar to read: `name` inside `store` (a LocalStore or an object-store prefix); `where`
    names it for people. `filesize` is the committed size when known (catches truncation up front)."""

    store: object
    name: str
    filesize: int | None = None

    @property
    def where(self) -> str:
        return f"{self.store.url.rstrip('/')}/{self.name}"

    @property
    def parquet_name(self) -> str:
        """The Parquet file the writer puts beside this tar (same stem)."""
        return self.name[: -len(".tar")] + ".parquet"

    def open(self) -> BinaryIO:
        return self.store.open_read(self.name)

    def size(self) -> int:
        return self.store.size(self.name)


def _parent(location: str) -> tuple[str, str]:
    """('folder or prefix', 'file name') of a path or URL."""
    head, _, name = str(location).rstrip("/").rpartition("/")
    return (head or "."), name


def output_store(out, storage_options: dict | None = None):
    """The store of an existing output (a folder or an object-store prefix holding shards/), or
    a UserError naming what is wrong."""
    store = open_store(out, storage_options)
    try:
        if not is_url(str(out)):
            if not store.exists(""):
                raise UserError(f"{out} does not exist: pass the output directory given to `generate`")
            if not store.is_dir(""):
                raise UserError(f"{out} is not a directory: pass the output directory given to `generate`")
        if not store.is_dir(SHARDS_DIR):
            if is_url(str(out)) and not store.exists(RUN_FILE):
                raise UserError(f"{out} does not exist or holds no output: pass the output given to `generate`")
            raise UserError(f"{out} has no {SHARDS_DIR}/ folder: pass the output directory given to `generate`")
    except UserError:
        raise
    except Exception as exc:  # an object store that cannot be reached, a bucket that does not exist
        raise UserError(f"cannot read {out}: {one_line(exc)}") from None
    return store


def resolve_shards(source, storage_options: dict | None = None) -> list[ShardRef]:
    """Tars to read from an output dir, its shards/ dir, a glob, a tar path, or a list of these;
    local or object-store URLs. In an output directory only committed units (with a stats file)
    count."""
    if isinstance(source, (list, tuple)):
        refs = []
        for item in source:
            refs.extend(resolve_shards(item, storage_options))
        if not refs:
            raise UserError("the list of shards is empty: pass an output directory, a glob or tar paths")
        return refs
    text = str(source).rstrip("/")
    if any(c in text for c in "*?["):
        folder, pattern = _parent(text)
        store = open_store(folder, storage_options)
        names = [n for n in store.list() if n.endswith(".tar") and PurePosixPath(n).match(pattern)]
        if not names:
            raise UserError(f"no .tar files match {text}: check the pattern")
        return [ShardRef(store, n) for n in names]
    if text.endswith(".tar"):
        folder, name = _parent(text)
        store = open_store(folder, storage_options)
        if not store.is_file(name):
            raise UserError(f"{text} does not exist: pass an output directory, a shards/ folder, a glob or tar paths")
        return [ShardRef(store, name)]
    if text.endswith(f"/{SHARDS_DIR}") or text == SHARDS_DIR:
        text = _parent(text)[0]
    store = open_store(text, storage_options)
    if not store.exists("") and not store.is_dir(SHARDS_DIR):
        raise UserError(f"{text} does not exist: pass an output directory, a shards/ folder, a glob or tar paths")
    if not is_url(text) and store.is_file(""):
        raise UserError(f"{text} is not a .tar shard: pass an output directory, a glob or tar paths")
    units = committed_units(store)
    if not units:
        loose = [n for n in store.list() if n.endswith(".tar")]
        if loose and not [n for n in store.list() if n.endswith(STATS_SUFFIX)]:
            raise UserError(f"{text} holds tars but no *{STATS_SUFFIX} commit markers: pass a glob ('{text}/*.tar') to read them anyway")
        raise UserError(f"{text} has no committed shards: run `mergemix-pipeline generate` (or resume it) first")
    return [ShardRef(store, f"{SHARDS_DIR}/{st['tar']['file']}", st["tar"].get("filesize")) for st in units.values()]


def safe_member_name(name: str) -> str:
    """Refuse members that could escape a directory if extracted: absolute paths and '..'."""
    if name.startswith(("/", "\\")) or ":" in PurePosixPath(name).parts[0] or "\\" in name:
        raise UserError(f"unsafe tar member name {name!r}: refusing to read this shard")
    if ".." in PurePosixPath(name).parts:
        raise UserError(f"unsafe tar member name {name!r}: refusing to read this shard")
    return name


def split_member(name: str) -> tuple[str, str]:
    """'dir/000001_000002.winner.jpg' -> ('dir/000001_000002', 'winner.jpg') (webdataset rule: first dot of the basename)."""
    head, _, base = name.rpartition("/")
    if "." not in base:
        raise UserError(f"tar member {name!r} has no extension: not a webdataset shard")
    stem, ext = base.split(".", 1)
    return (f"{head}/{stem}" if head else stem), ext


def iter_tar_members(ref: ShardRef) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular member, in order; corrupt or unsafe tars raise UserError."""
    try:
        size = ref.size()
    except OSError as exc:
        raise UserError(f"cannot read shard {ref.where}: {exc.strerror or one_line(exc)}") from None
    if ref.filesize is not None and size != ref.filesize:
        raise UserError(f"shard {ref.where} is {size} bytes, its stats say {ref.filesize}: truncated or replaced; regenerate this unit")
    try:
        with ref.open() as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for info in tar:
                safe_member_name(info.name)
                if not info.isfile():
                    raise UserError(f"tar member {info.name!r} in {ref.where} is not a regular file: refusing to read this shard")
                f = tar.extractfile(info)
                data = f.read()
                if len(data) != info.size:
                    raise tarfile.ReadError("unexpected end of data")
                yield info.name, data
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UserError(f"shard {ref.where} is corrupt ({one_line(exc)}); regenerate this unit or remove it") from None


def iter_tar_samples(ref: ShardRef, problems: list[str] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive members by key (webdataset's rule): yields (key, {ext: bytes}). A member
    that repeats within its sample, or a key that comes back after another, is a damaged
    shard: UserError, or with `problems` the problem appended there and the member skipped."""
    key, parts, seen = None, {}, set()

    def problem(text: str) -> None:
        if problems is None:
            raise UserError(f"shard {ref.where}: {text}")
        problems.append(text)

    for name, data in iter_tar_members(ref):
        k, ext = split_member(name)
        if k != key:
            if key is not None:
                yield key, parts
            if k in seen:
                problem(f"members of {k} are not together (webdataset reads them as two samples)")
            key, parts = k, {}
            seen.add(k)
        if ext in parts:
            problem(f"duplicate member {name}")
            continue
        parts[ext] = data
    if key is not None:
        yield key, parts


def parse_record(data: bytes, where: str) -> dict:
    """The K.json sample record, with its schema version checked."""
    try:
        record = json.loads(data)
    except ValueError:
        raise UserError(f"{where}: sample record is not valid JSON; the shard is damaged") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: sample record is not a JSON object; the shard is damaged")
    try:
        check_schema_version(record.get("schema_version"), where)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return record


def read_sample(parts: dict[str, bytes], where: str, include_mask: bool = True):
    """A sample's record and decoded pixels: (record, winner, loser, mask or None), uint8 arrays
    (mask: gh x gw, 255 = from the winner; mixup: the winner's blend weight). Missing or
    undecodable members are a damaged shard (UserError naming `where`)."""
    if "json" not in parts:
        raise UserError(f"{where} has no .json record; the shard is damaged")
    record = parse_record(parts["json"], where)
    fmt = record.get("image_format")
    wanted = ["winner", "loser"] + (["mask"] if include_mask else [])
    missing = [part_ext(p, fmt) for p in wanted if part_ext(p, fmt) not in parts]
    if missing:
        raise UserError(f"{where} lacks {missing}; the shard is damaged (run `validate`)")
    try:
        winner, loser = (decode_image(parts[part_ext(p, fmt)]) for p in ("winner", "loser"))
        mask = decode_image(parts[part_ext("mask", fmt)], "L") if include_mask else None
    except (OSError, ValueError) as exc:
        raise UserError(f"{where}: image does not decode ({exc}); the shard is damaged") from None
    return record, winner, loser, mask


def decode_image(data: bytes, mode: str = "RGB") -> np.ndarray:
    """Encoded image bytes -> uint8 array (H x W x 3 for RGB, H x W for L)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert(mode))


def read_parquet(store, name: str, columns: list[str] | None = None) -> pa.Table:
    """A shard's Parquet table (`name` in `store`); wrong schema version or damage -> UserError."""
    where = f"{store.url.rstrip('/')}/{name}"
    try:
        pf = pq.ParquetFile(store.open_read(name))
        schema = pf.schema_arrow
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise UserError(f"{where} is not a readable Parquet file ({one_line(exc)}); regenerate this unit") from None
    try:
        check_arrow_schema(schema, where)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    try:
        return pf.read(columns=columns)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise UserError(f"{where} is damaged ({one_line(exc)}); regenerate this unit") from None
