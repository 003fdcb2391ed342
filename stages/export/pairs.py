"""The committed pairs of an output, one at a time, and their text in the shapes trainers use.

Every export reads the tars only (the K.json record is the pair's Parquet row), unit by unit,
so it holds one pair in memory whatever the size of the output, and never writes to OUT.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath

from tqdm import tqdm

from schemas.layout import SHARDS_DIR
from schemas.shard import part_ext
from stages.readers.conversation import DEFAULT_PROMPT, IMAGE_PLACEHOLDER as IMAGE_TAG
from stages.errors import UserError
from stages.readers.shards import ShardRef, iter_tar_samples, parse_record

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Pair:
    """One pair: its record (the Parquet row as JSON) and the exact bytes of its tar members."""

    key: str
    record: dict
    winner: bytes
    loser: bytes
    mask: bytes

    def member(self, part: str) -> str:
        """The member's name in the tar, e.g. '000000_000003.winner.jpg'."""
        return f"{self.key}.{part_ext(part, self.record['image_format'])}"

    def image_path(self, part: str) -> str:
        """Where an export keeps this image, relative to DEST: one folder per unit, so no
        folder holds more than two images per input of a unit."""
        return str(PurePosixPath("images", self.key.split("_")[0], self.member(part)))


class Pairs:
    """The pairs of the committed `units` (unit id -> stats) of the output in `store`, in
    unit and key order; `len()` is their number (the ok rows)."""

    def __init__(self, store, units: dict[int, dict], progress: bool = True):
        self.store, self.units, self.progress = store, units, progress

    def __len__(self) -> int:
        return sum(int(st["tar"]["nsamples"]) for st in self.units.values())

    def __iter__(self):
        bar = tqdm(total=len(self), unit="pair", desc="export", disable=not self.progress, dynamic_ncols=True)
        try:
            for stats in self.units.values():
                ref = ShardRef(self.store, f"{SHARDS_DIR}/{stats['tar']['file']}", stats["tar"].get("filesize"))
                for key, parts in iter_tar_samples(ref):
                    yield _pair(ref, key, parts)
                    bar.update()
        finally:
            bar.close()


def _pair(ref: ShardRef, key: str, parts: dict[str, bytes]) -> Pair:
    where = f"{ref.where}: sample {key}"
    if "json" not in parts:
        raise UserError(f"{where} has no .json record; the shard is damaged (run `validate`)")
    record = parse_record(parts["json"], where)
    fmt = record.get("image_format")
    names = [part_ext(p, fmt) for p in ("winner", "loser", "mask")] if fmt else []
    missing = [n for n in names if n not in parts] or ([] if fmt else ["image_format"])
    if missing:
        raise UserError(f"{where} lacks {missing}; the shard is damaged (run `validate`)")
    return Pair(key, record, *(parts[n] for n in names))


@dataclass(frozen=True)
class Conversation:
    """A pair's text as (role, text) turns, roles system / user / assistant, the image tag taken
    out; `image_turn` is the turn the image belongs to (where the tag was, else the first user
    turn). The last turn is the assistant's: the answer the preference is about."""

    turns: list[tuple[str, str]]
    image_turn: int


def conversation(record: dict) -> Conversation:
    """The conversation of a record: its LLaVA `conversations`, else prompt + answer, else the
    label as the answer to a fixed question (classification inputs)."""
    key = record.get("key")
    if record.get("conversations"):
        try:
            raw = json.loads(record["conversations"])
        except ValueError:
            raise UserError(f"pair {key}: conversations is not valid JSON; the shard is damaged") from None
        turns, tagged = [], None
        for turn in raw:
            role = ROLES.get(turn.get("from"))
            if role is None:
                raise UserError(f"pair {key}: conversation role {turn.get('from')!r} is not one of {', '.join(ROLES)}")
            text = turn.get("value") or ""
            if IMAGE_TAG in text:
                text = text.replace(IMAGE_TAG, "").strip()  # as LLaVA's own preprocessing does
                tagged = len(turns) if tagged is None else tagged
            turns.append((role, text))
    elif record.get("answer") is not None:
        turns, tagged = [("user", (record.get("prompt") or "").replace(IMAGE_TAG, "").strip()), ("assistant", record["answer"])], 0
    elif record.get("label") is not None:
        turns, tagged = [("user", record.get("prompt") or DEFAULT_PROMPT), ("assistant", str(record["label"]))], 0
    else:
        turns, tagged = [], None
    while turns and turns[-1][0] != "assistant":  # a trailing question has no answer to prefer
        turns.pop()
    if not turns:
        raise UserError(f"pair {key} has neither an answer nor a label: an export needs the text of both sides "
                        "(generate from LLaVA JSON or a labelled manifest)")
    first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), 0)
    return Conversation(turns, tagged if tagged is not None and tagged < len(turns) else first_user)
