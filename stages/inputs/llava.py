"""LLaVA instruction JSON: a list of {id, image, conversations}. The driver finds element
boundaries in a stream (a 1 GB file read in 8 MB chunks) and keeps byte ranges; a prepare task
parses its range. The digest is the file's bytes."""
from __future__ import annotations

import codecs
import hashlib
import json

from stages.errors import UserError
from stages.inputs.records import InputRecord, Listing, Slice, Units, first_turn, open_input, read_chunks, read_range, valid_conversations


def list_units(path: str, per_unit: int, storage_options: dict | None = None) -> Listing:
    """Element boundaries of the top-level JSON array, found by parsing one element at a time
    from a sliding buffer. Bytes are decoded with surrogateescape so character positions map
    back to exact byte offsets (slices are byte ranges)."""
    h = hashlib.sha256()
    units = Units("llava", per_unit, source=str(path))
    decoder = json.JSONDecoder()
    with open_input(path, storage_options) as f:
        chunks = read_chunks(f, h)
        utf8 = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        buf, pos, eof = "", 0, False
        mark_char, mark_byte = 0, 0  # buf[mark_char] is at byte mark_byte of the file

        def more() -> bool:
            nonlocal buf, pos, eof, mark_char
            if eof:
                return False
            byte_at(pos)  # move the mark up to pos, then drop what is parsed
            buf, mark_char, pos = buf[pos:], 0, 0
            data = next(chunks, None)
            if data is None:
                eof = True
                buf += utf8.decode(b"", final=True)
                return False
            buf += utf8.decode(data)
            return True

        def byte_at(i: int) -> int:
            """Byte offset of buf[i] (i >= the last one asked for): only the new stretch is encoded."""
            nonlocal mark_char, mark_byte
            mark_byte += len(buf[mark_char:i].encode("utf-8", "surrogateescape"))
            mark_char = i
            return mark_byte

        def peek() -> str:
            """Skip whitespace; the next character, or '' at the end of the file."""
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf):
                    return buf[pos]
                if not more():
                    return ""

        def invalid(at: int, msg: str) -> UserError:
            return UserError(f"{path} is not valid JSON near byte {byte_at(at)} ({msg}); "
                             "expected a LLaVA list of {id, image, conversations}")

        if peek() == "\ufeff":  # a byte-order mark
            pos += 1
        first = peek()
        if first != "[":
            kind = "an object" if first == "{" else "empty" if first == "" else "not a JSON list"
            raise UserError(f"{path} must hold a JSON list of {{id, image, conversations}} objects (it is {kind})")
        pos += 1
        closed = peek() == "]"
        while not closed:
            if peek() == "":
                raise invalid(pos, "the list is not closed: truncated?")
            while True:
                try:
                    _, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:  # a number could go on in the next chunk
                        break
                except json.JSONDecodeError as exc:
                    if eof:
                        raise invalid(exc.pos, exc.msg) from None
                more()
            units.add(byte_at(pos), byte_at(end))
            pos = end
            sep = peek()
            if sep not in (",", "]"):
                raise invalid(pos, "expected ',' or ']' after an element" if sep else "the list is not closed: truncated?")
            pos += 1
            closed = sep == "]"
        if peek() != "":
            raise invalid(pos, "extra data after the list")
    return Listing("llava", units.count, h.hexdigest()[:16], units.finish())


def read_unit(s: Slice, storage_options: dict | None = None) -> list[InputRecord]:
    text = read_range(s.source, s.start, s.stop, storage_options).decode("utf-8", errors="replace")
    rows = json.loads("[" + text + "]")  # the slice runs from its first element to its last
    return [_llava_record(s.first_index + i, row) for i, row in enumerate(rows)]


def _llava_record(i: int, row) -> InputRecord:
    if not isinstance(row, dict):
        return InputRecord(f"row-{i}", None, error=f"malformed_row: entry {i} is {type(row).__name__}, not an object")
    source_id = str(row.get("id", f"row-{i}"))
    conv = row.get("conversations")
    if conv is not None and not valid_conversations(conv):
        return InputRecord(source_id, None, error="malformed_row: conversations must be a list of {from, value}")
    prompt, answer = first_turn(conv or [])
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
