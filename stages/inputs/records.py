"""What every input kind shares: a unit's `Slice` (what the driver keeps) and the `Listing` of an
input, the `InputRecord`s a prepare task reads from a slice, the per-row `InputError`, opening and
reading input files (local or fsspec URLs, transient errors retried), and the LLaVA conversation
fields that JSON, JSONL, Parquet and webdataset records share."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

from stages.storage import input_fs, read_with_retries


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TEXT_EXTS = ("json", "txt", "cls")  # webdataset text members
CHUNK = 8 << 20  # bytes read at a time while listing
PROMPT_COLUMNS = ("prompt", "question", "caption", "text")


@dataclass(frozen=True)
class Slice:
    """Where one unit's records are. `first_index`: input_index of its first record."""

    kind: str
    source: str = ""  # the input file (llava, jsonl, parquet)
    start: int = 0  # byte offset (llava, jsonl) or row (parquet)
    stop: int = 0
    first_index: int = 0
    count: int = 0
    first_line: int = 0  # jsonl: file line number (0-based) at `start`
    items: tuple = ()  # folder: relative paths; webdataset: TarSample per record
    folder_labels: bool = False


@dataclass
class Listing:
    kind: str
    count: int
    digest: str
    slices: list[Slice] = field(default_factory=list)


@dataclass
class InputRecord:
    """One input sample. `image` says where the image is: ("file", path relative to the image
    root), ("tar", tar path, data offset, size, member name), ("parquet", file, row, column)
    or None (text-only)."""

    source_id: str
    image: tuple | None
    prompt: str | None = None
    answer: str | None = None
    conversations: str | None = None  # JSON text of the LLaVA conversation list
    label: str | None = None
    error: str | None = None  # set when the row itself is malformed
    extra: dict = field(default_factory=dict)


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


class Units:
    """Collects records into slices of `per_unit`: call `add(start, end)` per record with its
    position (byte offset, row, ...) and `items` where the slice carries them."""

    def __init__(self, kind: str, per_unit: int, **common):
        self.kind, self.per_unit, self.common = kind, per_unit, common
        self.slices: list[Slice] = []
        self.count = 0
        self._start = self._end = 0
        self._items: list = []
        self._first_line = 0

    def add(self, start: int = 0, end: int = 0, item=None, line: int = 0) -> None:
        if self.count % self.per_unit == 0:
            self._start, self._items, self._first_line = start, [], line
        self._end = end
        if item is not None:
            self._items.append(item)
        self.count += 1
        if self.count % self.per_unit == 0:
            self._close()

    def _close(self) -> None:
        n = self.count - len(self.slices) * self.per_unit
        self.slices.append(Slice(self.kind, start=self._start, stop=self._end, first_index=self.count - n, count=n,
                                 first_line=self._first_line, items=tuple(self._items), **self.common))

    def finish(self) -> list[Slice]:
        if self.count % self.per_unit:
            self._close()
        return self.slices


def open_input(path: str, storage_options: dict | None):
    """An input file, local or under an fsspec URL (an object store's transient errors retried)."""
    fs, p = input_fs(path, storage_options)
    return read_with_retries(fs.open, p, "rb")


def read_chunks(f: BinaryIO, h) -> Iterator[bytes]:
    while data := f.read(CHUNK):
        h.update(data)
        yield data


def read_range(path: str, start: int, stop: int, storage_options: dict | None) -> bytes:
    with open_input(path, storage_options) as f:  # on an object store: one range request
        f.seek(start)
        return f.read(stop - start)


def valid_conversations(conv) -> bool:
    return isinstance(conv, list) and all(isinstance(t, dict) and isinstance(t.get("value", ""), str) for t in conv)


def first_turn(conv: list) -> tuple[str | None, str | None]:
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


def manifest_record(row: dict, i: int, image_ref) -> InputRecord:
    record = InputRecord(str(row.get("id", f"row-{i}")), image_ref)
    fill_text(record, row)
    return record


def fill_text(record: InputRecord, meta: dict) -> None:
    conv = meta.get("conversations")
    if isinstance(conv, str):
        try:
            conv = json.loads(conv)
        except json.JSONDecodeError:
            conv = None
    if conv is not None and valid_conversations(conv):
        record.conversations = json.dumps(conv, ensure_ascii=False)
        record.prompt, record.answer = first_turn(conv)
    for col in PROMPT_COLUMNS:
        if record.prompt is None and isinstance(meta.get(col), str):
            record.prompt = meta[col]
    if record.answer is None and isinstance(meta.get("answer"), str):
        record.answer = meta["answer"]
    if record.label is None and meta.get("label") is not None:
        record.label = str(meta["label"])
