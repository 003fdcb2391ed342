"""Image bytes in the prepare task: from a file under the image root, an object under a root URL, a
tar member or a Parquet cell. Paths are confined to the image root: absolute paths, `..` escapes
and symlinks that leave it are refused per row. Only regular files are read: a FIFO or a device
named like an image would block or never end, so it becomes a failed row instead of a stalled unit."""
from __future__ import annotations

import os
import posixpath
import stat
from pathlib import Path, PurePosixPath

from stages.inputs.records import InputError, open_input
from stages.storage import input_fs, is_url, local_path, read_with_retries


MAX_FILE_BYTES = 512 << 20  # larger image files are refused before reading (too_large)


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
        return read_at(cache, path, offset, size)
    if kind == "parquet":
        _, path, row, column = ref
        group, local = parquet_position(cache, path, row)
        key = (path, group, column)
        if key not in cache:
            cache[key] = parquet_file(cache, path).read_row_group(group, columns=[column]).column(0).to_pylist()
        value = cache[key][local]
        if not value:
            raise InputError("empty_file", "image bytes are empty")
        return value
    raise ValueError(f"unknown image reference {ref!r}")


def read_at(handles: dict, path: str, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of a tar (its members are read in place, never extracted; on an
    object store, a range request)."""
    if path not in handles:
        handles[path] = open_input(path, handles.get("storage_options"))
    f = handles[path]
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise InputError("corrupt_image", f"tar member at {offset} is cut short in {path}")
    return data


def parquet_position(cache: dict, path: str, row: int) -> tuple[int, int]:
    """(row group, row inside it) of a manifest row."""
    key = ("rows", path)
    if key not in cache:
        meta = parquet_file(cache, path).metadata
        cache[key] = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    for group, n in enumerate(cache[key]):
        if row < n:
            return group, row
        row -= n
    raise ValueError(f"row beyond the end of {path}")


def parquet_file(cache: dict, path: str):
    """The manifest's ParquetFile, opened once per unit (its file closes with the unit's handles)."""
    key = ("file", path)
    if key not in cache:
        import pyarrow.parquet as pq

        cache[key] = open_input(path, cache.get("storage_options"))
        cache[("pf", path)] = pq.ParquetFile(cache[key])
    return cache[("pf", path)]


def close_handles(cache: dict) -> None:
    for value in cache.values():
        if hasattr(value, "close"):
            value.close()
    cache.clear()
