"""Where output files live: one small interface for everything `generate` writes and the
readers read, so the commit protocol, the lease and the ownership rules are written once.

`LocalStore` is a folder on a POSIX file system. A name is a '/'-separated path relative to
the store's root ("run.json", "shards/000001.tar"). Writes are atomic: a temporary name
next to the target, fsync, rename, fsync of the folder, so a crash leaves either the old
state or the new one, plus at most a temporary file that `generate` recognises as its own.
"""
from __future__ import annotations

import contextlib
import os
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

    def delete(self, name: str) -> bool:
        """Remove one file; False if it was not there."""
        try:
            self.path(name).unlink()
            return True
        except FileNotFoundError:
            return False

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


def open_store(location: str | os.PathLike | LocalStore) -> LocalStore:
    """The store for an output location (a local path today)."""
    return location if isinstance(location, LocalStore) else LocalStore(location)
