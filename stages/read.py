"""Input readers: turn every supported input into an ordered list of light `InputRecord`s.

The driver lists records (ids, text, where the image lives) without reading image bytes;
CPU tasks fetch the bytes later with `load_image_bytes`. Kinds:

- LLaVA instruction JSON: a list of {id, image, conversations}; images under --image-root.
- A folder of images (recursive); with folder labels, ImageFolder-style class subfolders.
- Webdataset tars (image + json/txt/cls members), a tar, a glob, a brace list, or a folder of tars.
- A Parquet or JSONL manifest: `image` (path) or `image_bytes` column, plus text columns.

A malformed row becomes a record with `error` set, never an exception for the whole run.
Image paths are confined to the image root: absolute paths, `..` escapes and symlinks that
leave it are refused per row.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand

from stages.errors import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TEXT_EXTS = ("json", "txt", "cls")
PROMPT_COLUMNS = ("prompt", "question", "caption", "text")
BYTES_COLUMNS = ("image_bytes", "bytes", "jpg", "png")


@dataclass
class InputRecord:
    """One input sample. `image` says where the image is: ("file", path relative to the image
    root), ("tar", tar path, member name), ("parquet", file, row group, row) or None (text-only)."""

    source_id: str
    image: tuple | None
    prompt: str | None = None
    answer: str | None = None
    conversations: str | None = None  # JSON text of the LLaVA conversation list
    label: str | None = None
    error: str | None = None  # set when the row itself is malformed
    extra: dict = field(default_factory=dict)  # text members of a tar sample, read by the task


def records_digest(records: list[InputRecord]) -> str:
    """A hash of the listed inputs (ids, where each image is, text): changes when the input
    list or its text changes. Image bytes are not read for it."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.source_id, r.image, r.prompt, r.answer, r.conversations, r.label, r.error],
                            ensure_ascii=False, default=str).encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return h.hexdigest()[:16]


def detect_kind(path: str) -> str:
    p = Path(path)
    if any(c in path for c in "*{?") or p.suffix == ".tar":
        return "webdataset"
    if p.is_dir():
        return "webdataset" if any(p.glob("*.tar")) and not _has_images(p) else "folder"
    if not p.exists():
        raise UserError(f"input {path} does not exist")
    kinds = {".json": "llava", ".jsonl": "jsonl", ".parquet": "parquet"}
    if p.suffix.lower() not in kinds:
        raise UserError(f"cannot tell the input kind of {path}: use a LLaVA .json, a .jsonl or .parquet manifest, .tar shards or an image folder")
    return kinds[p.suffix.lower()]


def _has_images(folder: Path) -> bool:
    return any(f.suffix.lower() in IMAGE_EXTS for f in folder.rglob("*") if f.is_file())


def read_records(path: str, *, folder_labels: bool = False) -> list[InputRecord]:
    kind = detect_kind(path)
    if kind == "llava":
        return read_llava(Path(path))
    if kind == "folder":
        return read_folder(Path(path), folder_labels)
    if kind == "webdataset":
        return read_webdataset(path)
    if kind == "jsonl":
        return read_jsonl(Path(path))
    return read_parquet(Path(path))


# --- LLaVA JSON ------------------------------------------------------------------------


def read_llava(path: Path) -> list[InputRecord]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); expected a LLaVA list of {{id, image, conversations}}") from None
    if not isinstance(rows, list):
        raise UserError(f"{path} must hold a JSON list of {{id, image, conversations}} objects")
    return [_llava_record(i, row) for i, row in enumerate(rows)]


def _llava_record(i: int, row) -> InputRecord:
    if not isinstance(row, dict):
        return InputRecord(f"row-{i}", None, error=f"malformed_row: entry {i} is {type(row).__name__}, not an object")
    source_id = str(row.get("id", f"row-{i}"))
    conv = row.get("conversations")
    if conv is not None and not _valid_conversations(conv):
        return InputRecord(source_id, None, error="malformed_row: conversations must be a list of {from, value}")
    prompt, answer = _first_turn(conv or [])
    image = row.get("image")
    if image is not None and not isinstance(image, str):
        return InputRecord(source_id, None, error="malformed_row: image must be a path string")
    return InputRecord(
        source_id,
        ("file", image) if image else None,
        prompt=prompt,
        answer=answer,
        conversations=json.dumps(conv, ensure_ascii=False) if conv is not None else None,
    )


def _valid_conversations(conv) -> bool:
    return isinstance(conv, list) and all(isinstance(t, dict) and isinstance(t.get("value", ""), str) for t in conv)


def _first_turn(conv: list) -> tuple[str | None, str | None]:
    """Prompt = first human turn without the <image> placeholder; answer = the reply to it."""
    prompt = answer = None
    for turn in conv:
        role, value = turn.get("from"), turn.get("value", "")
        if role == "human" and prompt is None:
            prompt = value.replace("<image>", "").strip()
        elif role == "gpt" and prompt is not None:
            answer = value
            break
    return prompt, answer


# --- image folder ----------------------------------------------------------------------


def read_folder(root: Path, folder_labels: bool) -> list[InputRecord]:
    files = sorted(
        (f for f in root.rglob("*") if f.suffix.lower() in IMAGE_EXTS and (f.is_file() or f.is_symlink())),
        key=lambda f: f.relative_to(root).as_posix(),
    )
    records = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        label = rel.split("/")[0] if folder_labels and "/" in rel else None
        records.append(InputRecord(rel, ("file", rel), label=label))
    return records


# --- webdataset tars -------------------------------------------------------------------


def expand_tar_paths(spec: str) -> list[str]:
    if Path(spec).is_dir():
        paths = sorted(str(p) for p in Path(spec).glob("*.tar"))
    else:
        paths = sorted({p for s in braceexpand.braceexpand(spec) for p in (glob.glob(s) if any(c in s for c in "*?[") else [s])})
    missing = [p for p in paths if not Path(p).is_file()]
    if not paths or missing:
        raise UserError(f"no webdataset tars found for {spec}" + (f" (missing: {missing[0]})" if missing else ""))
    return paths


def read_webdataset(spec: str) -> list[InputRecord]:
    records = []
    for tar_path in expand_tar_paths(spec):
        try:
            with tarfile.open(tar_path) as tf:
                members = [m.name for m in tf.getmembers() if m.isfile()]
        except (tarfile.TarError, OSError) as exc:
            raise UserError(f"cannot read webdataset tar {tar_path}: {exc}") from None
        samples: dict[str, dict[str, str]] = {}
        for name in members:
            base = os.path.basename(name)
            key, _, ext = base.partition(".")
            samples.setdefault(os.path.join(os.path.dirname(name), key), {})[ext.lower()] = name
        for key, parts in samples.items():
            image_member = next((parts[e] for e in parts if "." + e in IMAGE_EXTS), None)
            text_members = {e: parts[e] for e in TEXT_EXTS if e in parts}
            image = ("tar", tar_path, image_member) if image_member else None
            records.append(InputRecord(key, image, extra=text_members | {"tar": tar_path}))
    return records


def read_tar_text(record: InputRecord, tf: tarfile.TarFile) -> None:
    """Fill prompt/answer/label of a tar record from its json/txt/cls members."""
    for ext, member in record.extra.items():
        if ext == "tar":
            continue
        raw = tf.extractfile(member).read().decode("utf-8", errors="replace")
        if ext == "json":
            try:
                meta = json.loads(raw)
            except json.JSONDecodeError:
                record.error = "malformed_row: json member is not valid JSON"
                continue
            if isinstance(meta, dict):
                _fill_text(record, meta)
        elif ext == "txt":
            record.prompt = record.prompt or raw.strip()
        elif ext == "cls":
            record.label = raw.strip()


def _fill_text(record: InputRecord, meta: dict) -> None:
    conv = meta.get("conversations")
    if isinstance(conv, str):
        try:
            conv = json.loads(conv)
        except json.JSONDecodeError:
            conv = None
    if conv is not None and _valid_conversations(conv):
        record.conversations = json.dumps(conv, ensure_ascii=False)
        record.prompt, record.answer = _first_turn(conv)
    for col in PROMPT_COLUMNS:
        if record.prompt is None and isinstance(meta.get(col), str):
            record.prompt = meta[col]
    if record.answer is None and isinstance(meta.get("answer"), str):
        record.answer = meta["answer"]
    if record.label is None and meta.get("label") is not None:
        record.label = str(meta["label"])


# --- manifests -------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[InputRecord]:
    records = []
    with path.open("rb") as f:
        for i, raw in enumerate(f):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8", errors="replace"))
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                records.append(InputRecord(f"line-{i + 1}", None, error=f"malformed_row: line {i + 1}: {exc}"))
                continue
            records.append(_manifest_record(row, i, image_ref=("file", row["image"]) if isinstance(row.get("image"), str) else None))
    return records


def read_parquet(path: Path) -> list[InputRecord]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise UserError(f"cannot read parquet manifest {path}: {exc}") from None
    names = pf.schema_arrow.names
    bytes_col = next((c for c in BYTES_COLUMNS if c in names), None)
    text_cols = [c for c in names if c != bytes_col]
    records, row_number = [], 0
    for group in range(pf.num_row_groups):
        for j, row in enumerate(pf.read_row_group(group, columns=text_cols).to_pylist()):
            if bytes_col:
                ref = ("parquet", str(path), group, j, bytes_col)
            else:
                ref = ("file", row["image"]) if isinstance(row.get("image"), str) else None
            records.append(_manifest_record(row, row_number, image_ref=ref))
            row_number += 1
    return records


def _manifest_record(row: dict, i: int, image_ref) -> InputRecord:
    record = InputRecord(str(row.get("id", f"row-{i}")), image_ref)
    _fill_text(record, row)
    return record


# --- fetching image bytes (runs in CPU tasks) ------------------------------------------


class InputError(Exception):
    """A per-row problem: becomes a failed row whose error starts with `reason`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def clean_text(value: str | None) -> str | None:
    """Text that can be stored as UTF-8: JSON escapes such as "\\ud800" decode to lone
    surrogates, which Arrow and JSON encoders refuse; they become U+FFFD instead of costing
    the whole unit."""
    if value is None:
        return None
    return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


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


def load_image_bytes(ref: tuple, image_root: Path | None, cache: dict | None = None) -> bytes:
    """Bytes of one image. `cache` keeps open tar/parquet handles across a unit's records."""
    kind = ref[0]
    if kind == "file":
        if image_root is None:
            raise InputError("no_image_root", "image paths need --image-root")
        path = resolve_inside(image_root, ref[1])
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise InputError("missing_file", f"{ref[1]} not found") from None
        except OSError as exc:
            raise InputError("unreadable_file", f"{ref[1]}: {exc.strerror or exc}") from None
    cache = {} if cache is None else cache
    if kind == "tar":
        return tar_handle(cache, ref[1]).extractfile(ref[2]).read()
    if kind == "parquet":
        import pyarrow.parquet as pq

        _, path, group, row, column = ref
        key = (path, group)
        if key not in cache:
            cache[key] = pq.ParquetFile(path).read_row_group(group, columns=[column]).column(0).to_pylist()
        value = cache[key][row]
        if not value:
            raise InputError("empty_file", "image bytes are empty")
        return value
    raise ValueError(f"unknown image reference {ref!r}")


def tar_handle(cache: dict, path: str) -> tarfile.TarFile:
    if path not in cache:
        cache[path] = tarfile.open(path)
    return cache[path]
