"""The prepare task's work on one unit: read each input's bytes, decode, fit to the encoder
geometry. Every input becomes a row (ok, failed with its reason, or skipped), never an
exception for the unit; the ok rows' pixels are the exact uint8 images the encoder will see
and the writer will store as winners.

With the torch image path (`image_ops="torch"`) plain JPEGs are left encoded: the encoder actor
decodes and fits them on its device (stages.imaging.device); the rest are decoded here as always."""
from __future__ import annotations

import time
import numpy as np

from schemas.shard import empty_row, sample_key
from stages.model.constants import CLIP_MEAN_RGB
from stages.imaging.decode import device_jpeg_size, load_pixels
from stages.inputs.records import InputError, InputRecord, clean_text
from stages.inputs.files import close_handles, load_image_bytes
from stages.units import PreparedUnit


def prepare_unit(unit_id: int, first_index: int, records: list[InputRecord], image_size: tuple[int, int],
                 resize: str, image_root: str | None, fill=CLIP_MEAN_RGB, interpolation: str = "bicubic",
                 storage_options: dict | None = None, image_ops: str = "pil") -> PreparedUnit:
    """Decode one unit's inputs. Bad input becomes a failed/skipped row, never an exception.
    `fill` (pad and transparency colour) and `interpolation` are the tower's (stages.model.tower).
    `image_ops="torch"` leaves plain JPEGs to the encoder actor (PreparedUnit.jpegs)."""
    start = time.perf_counter()
    root = image_root or None  # a local folder or an object-store URL (stages.inputs.files)
    rows, handles = [], {}
    # Filled in place: no list of arrays plus a stacked copy (half the task's peak memory).
    pixels, n_ok = np.empty((len(records), *image_size, 3), np.uint8), 0
    jpegs = [] if image_ops == "torch" else None
    try:
        for i, rec in enumerate(records):
            row = empty_row(key=sample_key(unit_id, i), source_id=clean_text(rec.source_id), unit=unit_id, index=i,
                            input_index=first_index + i, resize_mode=resize)
            try:
                row.update(prompt=clean_text(rec.prompt), answer=clean_text(rec.answer),
                           conversations=clean_text(rec.conversations), label=clean_text(rec.label))
                if rec.error:
                    raise InputError(*rec.error.split(": ", 1))
                if rec.image is None:
                    row.update(status="skipped", error="no_image: text-only sample")
                else:
                    data = load_image_bytes(rec.image, root, handles, storage_options)
                    size = device_jpeg_size(data) if jpegs is not None else None
                    if size is not None:  # the actor decodes it
                        orig = size
                    else:
                        array, orig = load_pixels(data, image_size, resize, fill, interpolation)
                        pixels[n_ok] = array
                        n_ok += 1
                    if jpegs is not None:
                        jpegs.append(data if size is not None else None)
                    row.update(status="ok", orig_size=list(orig))
            except InputError as exc:
                row.update(status="failed", error=clean_text(str(exc)))
            except Exception as exc:  # an unforeseen reader error costs this row, not the unit
                row.update(status="failed", error=clean_text(f"read_error: {type(exc).__name__}: {str(exc)[:200]}"))
            rows.append(row)
    finally:
        close_handles(handles)
    stacked = pixels if n_ok == len(records) else pixels[:n_ok].copy()  # a copy only when rows failed
    return PreparedUnit(unit_id, rows, stacked, {"prepare_s": time.perf_counter() - start}, jpegs)
