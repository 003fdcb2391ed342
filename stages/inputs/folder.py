"""A folder of images, recursive (ImageFolder class subfolders as labels with --folder-labels).
Slices carry the relative paths; the digest is the sorted paths."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

from stages.inputs.records import IMAGE_EXTS, InputRecord, Listing, Slice, Units
from stages.storage import input_fs, is_url, local_path


def walk(root: Path, rel: str = "") -> Iterator[str]:
    with os.scandir(root / rel if rel else root) as entries:
        for e in entries:
            name = f"{rel}/{e.name}" if rel else e.name
            if e.is_dir(follow_symlinks=False):
                yield from walk(root, name)
            elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTS and (e.is_file() or e.is_symlink()):
                yield name


def list_units(path: str, per_unit: int, storage_options: dict | None = None, folder_labels: bool = False) -> Listing:
    if is_url(path):  # an object store: keys under the prefix (no symlinks there)
        fs, root = input_fs(path, storage_options)
        root = root.rstrip("/")
        names = sorted(f[len(root) + 1:] for f in fs.find(root) if os.path.splitext(f)[1].lower() in IMAGE_EXTS)
    else:
        names = sorted(walk(Path(local_path(path))))
    h = hashlib.sha256()
    units = Units("folder", per_unit, folder_labels=folder_labels)
    for name in names:
        h.update(name.encode("utf-8", "surrogateescape") + b"\n")
        units.add(item=name)
    return Listing("folder", units.count, h.hexdigest()[:16], units.finish())


def read_unit(s: Slice, storage_options: dict | None = None) -> list[InputRecord]:
    return [InputRecord(rel, ("file", rel), label=rel.split("/")[0] if s.folder_labels and "/" in rel else None)
            for rel in s.items]
