"""Webdataset tars (a tar, a glob, a {a..b} list, or a folder of tars): samples grouped by key,
an image member and json/txt/cls text members each. Slices carry where each member lies in its
tar (offset, size): read in place, never extracted. The digest is every member's name and size and
the text members' bytes."""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass

import braceexpand

from stages.errors import UserError
from stages.inputs.files import close_handles, read_at
from stages.inputs.records import (
    IMAGE_EXTS, TEXT_EXTS, InputError, InputRecord, Listing, Slice, Units, fill_text, open_input,
)
from stages.storage import input_fs, is_url


@dataclass(frozen=True)
class TarSample:
    """One webdataset sample: its tar, key, image member and text members, each as
    (name or ext, offset of the data in the tar, size)."""

    tar: str
    key: str
    image: tuple | None
    texts: tuple = ()


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


def tar_samples(tar_path: str, h, storage_options: dict | None = None) -> list[TarSample]:
    """Samples of one tar in order of first appearance (webdataset groups members by the part
    of the name before the first dot of its basename). Streams the tar once: text members are
    hashed as they pass, image members only by name and size."""
    samples: dict[str, dict] = {}
    try:
        with open_input(tar_path, storage_options) as f, tarfile.open(fileobj=f, mode="r|") as tf:
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


def list_units(spec: str, per_unit: int, storage_options: dict | None = None) -> Listing:
    h = hashlib.sha256()
    units = Units("webdataset", per_unit)
    for tar_path in expand_tar_paths(spec, storage_options):
        fs, p = input_fs(tar_path, storage_options)
        h.update(f"tar {fs.size(p)}\n".encode())
        for sample in tar_samples(tar_path, h, storage_options):
            units.add(item=sample)
    return Listing("webdataset", units.count, h.hexdigest()[:16], units.finish())


def read_unit(s: Slice, storage_options: dict | None = None) -> list[InputRecord]:
    records, handles = [], {"storage_options": storage_options}
    try:
        for sample in s.items:
            image = ("tar", sample.tar, sample.image[1], sample.image[2], sample.image[0]) if sample.image else None
            record = InputRecord(sample.key, image)
            for ext, offset, size in sample.texts:
                try:
                    _fill_tar_text(record, ext, read_at(handles, sample.tar, offset, size))
                except InputError as exc:
                    record.error = f"malformed_row: {ext} member: {exc}"
            records.append(record)
    finally:
        close_handles(handles)
    return records


def _fill_tar_text(record: InputRecord, ext: str, data: bytes) -> None:
    """prompt/answer/label of a tar sample from one of its json/txt/cls members."""
    raw = data.decode("utf-8", errors="replace")
    if ext == "json":
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError:
            record.error = "malformed_row: json member is not valid JSON"
            return
        if isinstance(meta, dict):
            fill_text(record, meta)
    elif ext == "txt":
        record.prompt = record.prompt or raw.strip()
    elif ext == "cls":
        record.label = raw.strip()
