"""`export`: the pairs of an output in the layouts the trainers people use read.

    swift  DEST/train.jsonl + DEST/images/   ms-swift RLHF rows: messages, images, rejected_images
    hf     DEST (save_to_disk) + DEST/data/  a `datasets` dataset: Image columns, TRL prompt/chosen/rejected
    llava  DEST/llava.json + DEST/images/    LLaVA JSON with image, rejected_image, margin

An export streams the committed pairs one at a time, never writes to OUT (a local folder or an
object-store URL), and builds DEST under a hidden temporary name next to it, renamed into place
at the end: an interrupted export leaves no half-written DEST. Each export writes a README.md
in DEST with the command line of its trainer.
"""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from stages.errors import UserError
from stages.export import hf, llava, swift
from stages.export.pairs import Pairs
from stages.readers.output_state import committed_units, require_finished
from stages.readers.shards import output_store
from stages.storage import is_url, local_path

WRITERS = {"swift": swift.write, "hf": hf.write, "llava": llava.write}
FORMATS = tuple(WRITERS)


@dataclass
class ExportResult:
    to: str
    dest: Path
    pairs: int
    units: int
    first: dict | None  # the first row as written (hf: images as bytes + path)


def check_dest(dest, out) -> Path:
    """DEST as a local path: new or an empty folder, and not OUT or inside it."""
    if is_url(str(dest)):
        raise UserError(f"DEST {dest} must be a local folder (write it there, then copy it to the bucket)")
    path = Path(local_path(dest)).expanduser().resolve()
    if not is_url(str(out)):
        source = Path(local_path(out)).expanduser().resolve()
        if path == source or source in path.parents:
            raise UserError(f"DEST {dest} is inside the output {out}: export never writes into an output; choose a folder outside it")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"DEST {dest} exists and is not an empty folder: choose a new folder")
    return path


def export_units(store, out, allow_partial: bool, echo=print) -> dict[int, dict]:
    """The committed units to export: all of a finished output; those committed now with allow_partial."""
    reasons = require_finished(store, out, allow_partial, "export the units committed now")
    units = committed_units(store)
    if not any(st["tar"]["nsamples"] for st in units.values()):
        raise UserError(f"{out} holds no pairs to export (no committed unit has an ok sample); `inspect` it to see why")
    if reasons:
        echo(f"exporting the {len(units)} units committed now of an unfinished output: {'; '.join(reasons)}")
    return units


@contextmanager
def staging(dest: Path):
    """A hidden folder next to DEST to write into; renamed to DEST when the block ends without error."""
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:12]}.partial"
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if dest.exists():
            dest.rmdir()  # checked empty before the export started
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export(out, dest, to: str, *, storage_options: dict | None = None, allow_partial: bool = False,
           progress: bool = True, echo=print) -> ExportResult:
    """Export the pairs of output `out` to the new folder `dest` in format `to` (swift, hf, llava)."""
    if to not in WRITERS:
        raise UserError(f"--to {to!r} is not one of {', '.join(FORMATS)}")
    store = output_store(out, storage_options)
    path = check_dest(dest, out)
    units = export_units(store, out, allow_partial, echo)
    pairs = Pairs(store, units, progress)
    with staging(path) as tmp:
        first = WRITERS[to](pairs, tmp, str(out))
    return ExportResult(to, path, len(pairs), len(units), first)
