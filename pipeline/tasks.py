"""The CPU tasks of `generate`: prepare a unit, write a unit.

They live apart from pipeline.run, which imports the encoder, so that a Ray worker that
runs them (or unpickles their arguments) never imports torch: on a 2-core machine the
torch import of short-lived task workers took about half of the workers' CPU time, and
each such worker held a few hundred MB more (see bench/README.md). Keep this module, and
what it imports, free of torch.
"""
from __future__ import annotations

from stages.imaging.compose import decided_pairs
from stages.imaging.prepare import prepare_unit
from stages.model.constants import CLIP_MEAN_RGB
from stages.inputs.kinds import read_slice
from stages.storage import open_store
from stages.units import PreparedUnit, Unit, UnitDecisions
from stages.output.writer import write_unit


def prepare(unit: Unit, image_size, resize: str, image_root: str | None, fill=CLIP_MEAN_RGB,
            interpolation: str = "bicubic", storage_options: dict | None = None, image_ops: str = "pil") -> PreparedUnit:
    records = read_slice(unit.slice, storage_options)
    return prepare_unit(unit.unit_id, unit.slice.first_index, records, image_size, resize, image_root, fill,
                        interpolation, storage_options, image_ops)


def write(unit: PreparedUnit, decided: UnitDecisions, out: str, image_format: str, jpeg_quality: int,
          fingerprint: str, storage_options: dict | None = None) -> dict:
    """Write one unit to the output `out` (a folder or an object-store URL). `unit` is the
    prepared unit the actor saw (its pixels are the winners, read from Ray's object store
    without a copy; on the torch image path the actor returns them); `decided` is what the
    actor decided."""
    images = decided_pairs(decided, unit.pixels)
    return write_unit(open_store(out, storage_options), decided.unit_id, decided.rows, images,
                      image_format=image_format, jpeg_quality=jpeg_quality, fingerprint=fingerprint,
                      extra_stats=decided.extra_stats)
