"""Where output files live: one small interface for everything `generate` writes and the
readers read, so the commit protocol, the lease and the ownership rules are written once.

A name is a '/'-separated path relative to the store's root ("run.json",
"shards/000001.tar"). Two implementations:

- `LocalStore`, a folder on a POSIX file system. Writes are atomic: a temporary name next
  to the target, fsync, rename, fsync of the folder, so a crash leaves either the old state
  or the new one, plus at most a temporary file that `generate` recognises as its own.
- `FsspecStore`, a prefix of an object store (s3://, gs://, memory://, ... through fsspec).
  An object appears whole when its upload completes (a PUT, or a multipart upload streamed
  from the writer and completed on close; an aborted one leaves nothing), so writes go to
  the final key directly. Transient errors (throttling, 5xx, dropped connections) are
  retried with backoff; permanent ones (no bucket, access denied) are raised at once.
"""
from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator

from schemas.layout import TMP_SUFFIX


class LocalStore:
    """A folder on local (or NFS) disk."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    @property
    def url(self) -> str:
        return str(self.root)

    def path(self, name: str = "") -> Path:
        return self.root / name if name else self.root

    # --- reading ------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def is_file(self, name: str) -> bool:
        return self.path(name).is_file()

    def is_dir(self, name: str = "") -> bool:
        return self.path(name).is_dir()

    def list(self, folder: str = "") -> list[str]:
        """Names of the regular files directly in `folder` (relative to it), sorted; [] if absent."""
        try:
            with os.scandir(self.path(folder)) as entries:
                return sorted(e.name for e in entries if e.is_file(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def read_bytes(self, name: str) -> bytes:
        return self.path(name).read_bytes()

    def size(self, name: str) -> int:
        return self.path(name).stat().st_size

    def open_read(self, name: str) -> BinaryIO:
        return open(self.path(name), "rb")

    # --- writing ------------------------------------------------------------------------

    def makedirs(self, folder: str = "") -> None:
        self.path(folder).mkdir(parents=True, exist_ok=True)

    def delete(self, name: str) -> None:
        """Remove one file if it is there."""
        self.path(name).unlink(missing_ok=True)

    def tmp_name(self, name: str) -> str:
        """A hidden, unique temporary name next to `name`: globs for *.tar never see it, and two
        writers of one name never collide."""
        head, _, base = name.rpartition("/")
        tmp = f".{base}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
        return f"{head}/{tmp}" if head else tmp

    @contextlib.contextmanager
    def writer(self, name: str) -> Iterator[BinaryIO]:
        """A file to write `name` through; it appears under its name only when the block ends
        without an exception (fsynced and renamed into place), and never half-written."""
        tmp = self.path(self.tmp_name(name))
        tmp.parent.mkdir(parents=True, exist_ok=True)  # as on an object store, folders need not exist
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(name))
        except BaseException:  # disk full, a crash in the producer: leave no temp file behind
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.path(name).parent)

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.writer(name) as f:
            f.write(data)

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Write `name` only if it does not exist, atomically and with its whole content
        (written under a temporary name, then hard-linked: link refuses an existing target)."""
        tmp = self.path(self.tmp_name(name))
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.path(name))
            except FileExistsError:
                return False
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self.path(name).parent)
        return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


RETRIES = 5  # attempts of one object-store call on a transient error
BACKOFF_S = 0.5  # first wait; doubles each time
_TRANSIENT_NAMES = ("EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                    "ClientConnectorError", "ServerDisconnectedError", "ClientPayloadError", "ResponseStreamingError")
_TRANSIENT_WORDS = ("slowdown", "slow down", "throttl", "internalerror", "internal error", "try again", "serviceunavailable", "503", "500", "502", "504",
                    "reduce your request rate", "connection reset", "timed out", "timeout")


def is_transient(exc: BaseException) -> bool:
    """Whether an error of an object-store call is worth retrying (the service or the network
    hiccupped) rather than a fact (no such bucket, access denied, not found)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    names = {t.__name__ for t in type(exc).__mro__}
    if names & set(_TRANSIENT_NAMES):
        return True
    text = str(exc).lower()
    return any(word in text for word in _TRANSIENT_WORDS)


def _retry(call, *args, **kwargs):
    wait = BACKOFF_S
    for attempt in range(RETRIES):
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            if attempt == RETRIES - 1 or not is_transient(exc):
                raise
            time.sleep(wait)
            wait *= 2


class FsspecStore:
    """A prefix of an fsspec file system (object stores above all): same interface as LocalStore."""

    def __init__(self, fs, root: str, url: str):
        self.fs, self.root, self._url = fs, root.rstrip("/"), url.rstrip("/")

    def __repr__(self) -> str:
        return f"FsspecStore({self._url!r})"

    def __reduce__(self):  # Ray ships stores to tasks: rebuild from the file system's own pickling
        return (FsspecStore, (self.fs, self.root, self._url))

    @property
    def url(self) -> str:
        return self._url

    def path(self, name: str = "") -> str:
        return f"{self.root}/{name}" if name else self.root

    def exists(self, name: str) -> bool:
        return _retry(self.fs.exists, self.path(name))

    def is_file(self, name: str) -> bool:
        return _retry(self.fs.isfile, self.path(name))

    def is_dir(self, name: str = "") -> bool:
        return _retry(self.fs.isdir, self.path(name))

    def list(self, folder: str = "") -> list[str]:
        try:
            entries = _retry(self.fs.ls, self.path(folder), detail=True, refresh=True)
        except FileNotFoundError:
            return []
        prefix = self.path(folder).rstrip("/") + "/"
        names = []
        for entry in entries:
            name = entry["name"]
            if entry.get("type") == "file" and name.startswith(prefix) and "/" not in name[len(prefix):]:
                names.append(name[len(prefix):])
        return sorted(names)

    def read_bytes(self, name: str) -> bytes:
        return _retry(self.fs.cat_file, self.path(name))

    def size(self, name: str) -> int:
        return _retry(self.fs.size, self.path(name))

    def open_read(self, name: str):
        return _retry(self.fs.open, self.path(name), "rb")

    def makedirs(self, folder: str = "") -> None:
        """Nothing: objects need no folders (and s3fs's makedirs would create a missing bucket)."""

    def delete(self, name: str) -> None:
        try:
            _retry(self.fs.rm_file, self.path(name))
        except FileNotFoundError:
            pass

    def tmp_name(self, name: str) -> str:
        return LocalStore.tmp_name(self, name)  # the same hidden name (used for write probes only)

    @contextlib.contextmanager
    def writer(self, name: str) -> Iterator[BinaryIO]:
        """Streams to the final key (a multipart upload for big objects); the object appears when
        the block ends, and an exception aborts the upload so nothing appears."""
        f = _retry(self.fs.open, self.path(name), "wb")
        try:
            yield f
        except BaseException:
            if hasattr(f, "discard"):
                f.discard()  # aborts a multipart upload
                try:
                    f.closed = True  # discarded: a later close must not upload what is left
                except AttributeError:
                    pass
            else:
                f.close()
            self.delete(name)  # file systems that made the object at open (memory://) keep a part
            raise
        f.close()

    def write_bytes(self, name: str, data: bytes) -> None:
        _retry(self.fs.pipe_file, self.path(name), data)

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """A conditional create (S3 If-None-Match: *, exclusive open elsewhere): False if the
        object exists. Where the file system cannot do it, a check then a write."""
        try:
            _retry(self.fs.pipe_file, self.path(name), data, mode="create")
            return True
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError):  # no exclusive create here
            if self.exists(name):
                return False
            self.write_bytes(name, data)
            return True
        except OSError as exc:
            if "precondition" in str(exc).lower().replace("-", ""):
                return False
            raise


def is_url(location) -> bool:
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def local_path(location) -> str:
    """A local path for a path or file:// URL (unchanged otherwise)."""
    text = str(location)
    return text[len("file://"):] if text.startswith("file://") else text


def input_fs(location, storage_options: dict | None = None):
    """(fsspec file system, path in it) for an input location: a local path, file://, s3://,
    gs://, hf://, memory://... Credentials and endpoints come from the environment (AWS_*,
    GOOGLE_*, config files) and `storage_options`."""
    import fsspec

    if not is_url(location):
        return fsspec.filesystem("file"), local_path(location)
    return fsspec.core.url_to_fs(str(location), **(storage_options or {}))


def read_with_retries(call, *args, **kwargs):
    """Run one object-store call, retrying transient errors with backoff (see is_transient)."""
    return _retry(call, *args, **kwargs)


def open_store(location, storage_options: dict | None = None):
    """The store for an output location: a local path (or file:// URL), or an fsspec URL."""
    if isinstance(location, (LocalStore, FsspecStore)):
        return location
    text = str(location)
    if text.startswith("file://"):
        return LocalStore(text[len("file://"):])
    if "://" not in text:
        return LocalStore(location)
    import fsspec

    fs, root = fsspec.core.url_to_fs(text, **(storage_options or {}))
    return FsspecStore(fs, root, text)
