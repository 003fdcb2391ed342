"""The shard contract: one Arrow schema from which the Parquet rows, the per-sample JSON
records and the JSON Schema are all derived.

Output layout (per output directory OUT):

    OUT/shards/NNNNNN.tar          webdataset tar, ok samples only; per key K:
                                   K.winner.<ext>  clean image, the exact pixels the encoder saw
                                   K.loser.<ext>   mixed image, same geometry
                                   K.mask.png      patch-grid mask (gh x gw, L mode), 255 = from the winner
                                                   (mixup: the winner's blend weight; image-side negatives:
                                                   a pixel mask at image_size; see below)
                                   K.json          the sample record: the Parquet row as JSON
    OUT/shards/NNNNNN.parquet      one row per INPUT of the unit (ok, failed, skipped), in input order
    OUT/shards/NNNNNN_stats.json   counts, sizes, hashes, timings, fingerprint; written last (commit marker)
    OUT/index.json                 wids-shard-index-v1 over the committed tars
    OUT/run.json                   effective config, fingerprint, package versions, totals, timings

The mask. Every method but mixup selects: each patch of the loser comes whole from the
winner (255) or from the partner or blurred winner (0), and kept_patches counts the 255s.
mixup blends every pixel, loser = round(lam * winner + (1 - lam) * partner): no patch comes
whole from either image, so its mask holds the winner's weight round(255 * lam) on every
patch and kept_patches is null (lam_hat in area mode is lam). The image-side negatives
(IMAGE_NEGATIVES, METHOD.md 4b) store a pixel mask at image_size and kept_patches null: crop
marks its box on the winner (the part of the winner the loser shows, zoomed), rotate the loser's
pixels that come from the winner, blank and other none (all 0); noise, pixelate and image-blur,
whose every loser pixel carries part of the winner, follow mixup's rule (round(255 * lam)
everywhere). For crop and rotate lam is exactly the mask's share of 255s. `mask_problem` states
the rule; the writer and `validate` both apply it.

<ext> is jpg, png or webp (lossless). Keys are `NNNNNN_IIIIII` (unit, position in unit):
zero-padded, no dots, unique in the output; the input's own id is kept in `source_id`.

Fields (Parquet column == JSON record key; "(h, w)" pairs are 2-element lists):

| field              | type            | meaning |
|--------------------|-----------------|---------|
| key                | string          | sample key `NNNNNN_IIIIII`; tar members are `<key>.<part>` |
| source_id          | string          | the input's own id (LLaVA `id`, file path, ...) |
| status             | string          | `ok`, `failed` (input could not be used) or `skipped` (filtered on purpose) |
| error              | string          | for failed/skipped rows: `<reason>: <detail>`; `inspect` groups by `<reason>` |
| partner_key        | string          | key of the image mixed into the loser |
| partner_source_id  | string          | source_id of that partner |
| lam                | float64         | sampled mixing ratio (cutmix, resizemix: the area kept, which their box decides) |
| lam_hat            | float64         | ratio recorded with the pair (see lam_mode) |
| margin             | float64         | preference margin gamma = 1 - lam_hat |
| method             | string          | mixing method (mergemix, mergemix-official, mergemix-r, topk, random, mixup, ...) |
| lam_mode           | string          | how lam_hat was derived: area, paper, fixed |
| kept_patches       | int32           | patches of the grid taken from the winner (255 in the mask); null for mixup and the image-side negatives |
| grid               | list<int32>[2]  | patch grid (h, w) of the mask |
| image_size         | list<int32>[2]  | stored image size (h, w), winner and loser alike |
| orig_size          | list<int32>[2]  | input image size (h, w) before resizing, after EXIF orientation |
| resize_mode        | string          | how the input was fitted to image_size: pad, center-crop, squash |
| model              | string          | open_clip model name or model-config path used for saliency |
| pretrained         | string          | pretrained tag or checkpoint path ("" or null for random weights) |
| activation         | string          | MLP activation of the tower that gave the saliency: QuickGELU or GELU (1.1) |
| norm_mean          | list<float64>[3]| per-channel mean the tower normalised RGB in [0, 1] with (1.1) |
| norm_std           | list<float64>[3]| per-channel std of the same normalisation (1.1) |
| interpolation      | string          | resampling of the resize to image_size: bicubic or bilinear, the tower's (1.1) |
| merge_total        | int32           | tokens removed by merging (R) |
| merge_schedule     | list<int32>     | tokens removed per block |
| attn_layer         | int32           | block whose CLS attention gave the saliency |
| prop_attn          | bool            | proportional attention on |
| seed               | int64           | run seed (per-sample draws are seeded by run seed and key) |
| prompt             | string          | the question / instruction (first human turn) |
| answer             | string          | the ground-truth answer (first assistant turn) |
| conversations      | string          | JSON text of the LLaVA `conversations` list, when the input had one |
| label              | string          | class label, for classification inputs |
| partner_label      | string          | class label of the partner |
| saliency           | list<float32>   | recovered saliency on the patch grid, row-major (gh*gw), when stored |
| method_params      | string          | image-side negatives: JSON object of the sample's drawn parameters (crop box, noise t / space / seed, pixelate k, blur radius, rotate angle, fill); `stages.mixing.negatives.make` rebuilds the loser from the winner with it (1.2) |
| input_index        | int64           | position of the input in the whole input stream |
| unit               | int32           | work unit = shard id |
| index              | int32           | position of the input inside its unit |
| winner_sha256      | string          | sha256 hex of the encoded `K.winner.<ext>` member bytes |
| loser_sha256       | string          | sha256 hex of the encoded `K.loser.<ext>` member bytes |
| mask_sha256        | string          | sha256 hex of the encoded `K.mask.png` member bytes |
| image_format       | string          | jpg, png or webp: extension of winner and loser |
| jpeg_quality       | int32           | JPEG quality when image_format is jpg |
| fingerprint        | string          | config fingerprint of the run that wrote the row |
| schema_version     | string          | this contract's version; also in the Parquet file metadata |

Every field is present in every row and record; only key, status, unit, index and
schema_version are never null. Fields marked (1.1) or (1.2) were added in that schema version:
Parquet files of older minors lack their columns, and readers accept that (a minor version only adds nullable fields). `json_schema()` derives the record's JSON Schema from
ARROW_SCHEMA; schemas/sample.schema.json is its saved copy for non-Python readers (a test
keeps it current). Nothing is pickled: Parquet, PNG/JPEG/WebP and JSON only.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pyarrow as pa

from schemas.layout import shard_name  # noqa: F401  (part of the contract's API)

SCHEMA_VERSION = "1.2"
# Readers accept any version with the same major number (minor bumps only add nullable fields).
SCHEMA_MAJOR = SCHEMA_VERSION.split(".")[0]
PARQUET_VERSION_KEY = b"mergemix.schema_version"

STATUSES = ("ok", "failed", "skipped")
IMAGE_FORMATS = ("jpg", "png", "webp")
KEY_RE = re.compile(r"^[0-9]{6}_[0-9]{6}$")

# Methods whose loser blends every pixel: the mask holds the winner's weight, not a selection.
BLEND_METHODS = frozenset({"mixup"})
# The image-side negatives of other published methods (METHOD.md 4b): no encoder, a pixel mask.
IMAGE_NEGATIVES = ("crop", "noise", "pixelate", "image-blur", "rotate", "blank", "other")
# Of those, the ones whose every loser pixel carries part of the winner: a uniform mask level, as mixup.
LEVEL_NEGATIVES = frozenset({"noise", "pixelate", "image-blur"})

_PAIR = pa.list_(pa.int32(), 2)
_RGB = pa.list_(pa.float64(), 3)


def _f(name: str, typ: pa.DataType, doc: str, nullable: bool = True, since: str | None = None) -> pa.Field:
    """A field; `since` marks a field added by a later minor version (files of older minors lack it)."""
    return pa.field(name, typ, nullable=nullable, metadata={"doc": doc} | ({"since": since} if since else {}))


ARROW_SCHEMA: pa.Schema = pa.schema(
    [
        _f("key", pa.string(), "sample key NNNNNN_IIIIII (unit, position); tar members are <key>.<part>", False),
        _f("source_id", pa.string(), "the input's own id"),
        _f("status", pa.string(), "ok | failed | skipped", False),
        _f("error", pa.string(), "for failed/skipped rows: '<reason>: <detail>'"),
        _f("partner_key", pa.string(), "key of the image mixed into the loser"),
        _f("partner_source_id", pa.string(), "source_id of the partner"),
        _f("lam", pa.float64(), "sampled mixing ratio (cutmix, resizemix: the area kept, which their box decides)"),
        _f("lam_hat", pa.float64(), "ratio recorded with the pair (see lam_mode)"),
        _f("margin", pa.float64(), "preference margin gamma = 1 - lam_hat"),
        _f("method", pa.string(), "mixing method"),
        _f("lam_mode", pa.string(), "how lam_hat was derived: area | paper | fixed"),
        _f("kept_patches", pa.int32(), "grid patches taken from the winner (255 in the mask); null for mixup"),
        _f("grid", _PAIR, "patch grid (h, w) of the mask"),
        _f("image_size", _PAIR, "stored image size (h, w) of winner and loser"),
        _f("orig_size", _PAIR, "input image size (h, w) before resizing, after EXIF orientation"),
        _f("resize_mode", pa.string(), "how the input was fitted to image_size: pad | center-crop | squash"),
        _f("model", pa.string(), "open_clip model name or model-config path used for saliency"),
        _f("pretrained", pa.string(), "pretrained tag or checkpoint path; empty/null for random weights"),
        _f("activation", pa.string(), "MLP activation of the saliency tower: QuickGELU | GELU", since="1.1"),
        _f("norm_mean", _RGB, "per-channel mean the tower normalised RGB in [0, 1] with", since="1.1"),
        _f("norm_std", _RGB, "per-channel std the tower normalised RGB in [0, 1] with", since="1.1"),
        _f("interpolation", pa.string(), "resampling of the resize to image_size: bicubic | bilinear", since="1.1"),
        _f("merge_total", pa.int32(), "tokens removed by merging (R)"),
        _f("merge_schedule", pa.list_(pa.int32()), "tokens removed per block"),
        _f("attn_layer", pa.int32(), "block whose CLS attention gave the saliency"),
        _f("prop_attn", pa.bool_(), "proportional attention on"),
        _f("seed", pa.int64(), "run seed"),
        _f("prompt", pa.string(), "question / instruction (first human turn)"),
        _f("answer", pa.string(), "ground-truth answer (first assistant turn)"),
        _f("conversations", pa.string(), "JSON text of the LLaVA conversations list"),
        _f("label", pa.string(), "class label (classification inputs)"),
        _f("partner_label", pa.string(), "class label of the partner"),
        _f("saliency", pa.list_(pa.float32()), "recovered saliency on the patch grid, row-major, gh*gw values"),
        _f("method_params", pa.string(), "image-side negatives: JSON of the sample's drawn parameters, enough to rebuild "
           "the loser from the winner", since="1.2"),
        _f("input_index", pa.int64(), "position of the input in the whole input stream"),
        _f("unit", pa.int32(), "work unit = shard id", False),
        _f("index", pa.int32(), "position of the input inside its unit", False),
        _f("winner_sha256", pa.string(), "sha256 hex of the encoded winner member"),
        _f("loser_sha256", pa.string(), "sha256 hex of the encoded loser member"),
        _f("mask_sha256", pa.string(), "sha256 hex of the encoded mask member"),
        _f("image_format", pa.string(), "jpg | png | webp"),
        _f("jpeg_quality", pa.int32(), "JPEG quality when image_format is jpg"),
        _f("fingerprint", pa.string(), "config fingerprint of the run that wrote the row"),
        _f("schema_version", pa.string(), "version of this contract", False),
    ],
    metadata={PARQUET_VERSION_KEY: SCHEMA_VERSION.encode()},
)

FIELDS: tuple[str, ...] = tuple(ARROW_SCHEMA.names)


def sample_key(unit_id: int, index: int) -> str:
    """The key of input `index` of unit `unit_id`: zero-padded and dot-free, so webdataset,
    wids and HF `datasets` all split `<key>.<part>` the same way."""
    if not (0 <= unit_id < 1_000_000 and 0 <= index < 1_000_000):
        raise ValueError(f"unit {unit_id} / index {index} out of range for 6-digit keys")
    return f"{unit_id:06d}_{index:06d}"


PARTS = ("winner", "loser", "mask", "json")  # the members of a sample, in tar order


def part_ext(part: str, image_format: str) -> str:
    """What follows the key in a part's member name: 'winner.jpg', 'loser.png', 'mask.png', 'json'.
    Winner and loser take the image format; the mask is always PNG."""
    ext = {"winner": image_format, "loser": image_format, "mask": "png", "json": "json"}[part]
    return ext if part == "json" else f"{part}.{ext}"


def member_name(key: str, part: str, image_format: str) -> str:
    """Tar member name of one part of a sample."""
    return f"{key}.{part_ext(part, image_format)}"


def empty_row(**fields) -> dict:
    """A row with every field present (None unless given) and schema_version filled.
    Unknown names raise, so a typo cannot silently drop a value."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise KeyError(f"unknown shard fields: {sorted(unknown)}")
    row = dict.fromkeys(FIELDS)
    row["schema_version"] = SCHEMA_VERSION
    row.update(fields)
    return row


def table_from_rows(rows: list[dict]) -> pa.Table:
    """Rows -> Arrow table under ARROW_SCHEMA (the only place rows are typed)."""
    for row in rows:
        missing = set(FIELDS) - set(row)
        extra = set(row) - set(FIELDS)
        if missing or extra:
            raise KeyError(f"row {row.get('key')!r}: missing fields {sorted(missing)}, unknown {sorted(extra)}")
    return pa.Table.from_pylist(rows, schema=ARROW_SCHEMA)


def _json_type(typ: pa.DataType) -> dict:
    if pa.types.is_string(typ):
        return {"type": "string"}
    if pa.types.is_boolean(typ):
        return {"type": "boolean"}
    if pa.types.is_integer(typ):
        return {"type": "integer"}
    if pa.types.is_floating(typ):
        return {"type": "number"}
    if pa.types.is_fixed_size_list(typ):
        n = typ.list_size
        return {"type": "array", "items": _json_type(typ.value_type), "minItems": n, "maxItems": n}
    if pa.types.is_list(typ):
        return {"type": "array", "items": _json_type(typ.value_type)}
    raise TypeError(f"no JSON mapping for Arrow type {typ}")


def json_schema() -> dict:
    """JSON Schema (draft 2020-12) of the per-sample record, derived from ARROW_SCHEMA."""
    props = {}
    for field in ARROW_SCHEMA:
        spec = _json_type(field.type)
        if field.nullable:
            spec["type"] = [spec["type"], "null"]
        spec["description"] = field.metadata[b"doc"].decode()
        props[field.name] = spec
    props["status"]["enum"] = list(STATUSES)
    props["key"]["pattern"] = KEY_RE.pattern
    props["image_format"]["enum"] = [*IMAGE_FORMATS, None]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"mergemix-pipeline sample record v{SCHEMA_VERSION}",
        "type": "object",
        "properties": props,
        "required": list(FIELDS),
        "additionalProperties": False,
    }


def check_schema_version(version: str | None, where: str) -> None:
    """Raise ValueError (one line, with the fix) unless `version` is readable by this code."""
    if version is None:
        raise ValueError(f"{where} has no mergemix schema version: not written by mergemix-pipeline, or damaged")
    if version.split(".")[0] != SCHEMA_MAJOR:
        raise ValueError(
            f"{where} has schema version {version}, this mergemix-pipeline reads {SCHEMA_MAJOR}.x: "
            "use a matching mergemix-pipeline version or regenerate the shards"
        )


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def check_arrow_schema(schema: pa.Schema, where: str) -> None:
    """Raise ValueError unless a Parquet file's schema carries a readable version and our
    columns (those its own minor version already had)."""
    raw = (schema.metadata or {}).get(PARQUET_VERSION_KEY)
    version = raw.decode() if raw else None
    check_schema_version(version, where)
    newer = {f.name for f in ARROW_SCHEMA if f.metadata.get(b"since") and _version(f.metadata[b"since"].decode()) > _version(version)}
    missing = [f.name for f in ARROW_SCHEMA if f.name not in schema.names and f.name not in newer]
    if missing:
        raise ValueError(f"{where} lacks columns {missing}: damaged or not a mergemix shard")
    wrong = [f.name for f in ARROW_SCHEMA if f.name in schema.names and not schema.field(f.name).type.equals(f.type)]
    if wrong:
        raise ValueError(f"{where} has wrong column types for {wrong}: damaged or not a mergemix shard")


def mask_problem(method: str | None, lam: float | None, kept_patches: int | None, mask: np.ndarray,
                 image_size: tuple[int, int] | None = None) -> str | None:
    """What is wrong with a stored mask (uint8) for its row, or None. Patch methods: a gh x gw grid;
    selections hold 0 or 255 only, and kept_patches (when given) counts the 255s; blends (mixup):
    round(255 * lam) on every patch, and kept_patches null. Image-side negatives: a pixel mask at
    `image_size` (when given), kept_patches null; level negatives as mixup; crop and rotate 0 or
    255 with lam their share of 255s; blank and other all 0."""
    if method in IMAGE_NEGATIVES:
        if image_size is not None and tuple(mask.shape) != tuple(image_size):
            return f"{method} mask is {mask.shape[0]}x{mask.shape[1]}, the image {image_size[0]}x{image_size[1]}"
        if kept_patches is not None:
            return f"{method} selects no patch, kept_patches must be null, got {kept_patches}"
    if method in BLEND_METHODS or method in LEVEL_NEGATIVES:
        level = None if lam is None else round(255 * lam)  # half to even, as the mixing rounds
        if level is None or not (mask == level).all():
            return f"{method} mask must hold round(255 * lam) = {level} everywhere"
        if kept_patches is not None:
            return f"{method} blends every patch, kept_patches must be null, got {kept_patches}"
        return None
    if not np.isin(mask, (0, 255)).all():
        return "mask values must be 0 or 255"
    if method in IMAGE_NEGATIVES:
        share = float(np.count_nonzero(mask)) / mask.size
        if lam is None or share != lam:
            return f"{method} mask shows {share!r} of the winner, lam is {lam!r}"
        return None
    if kept_patches is not None and int((mask == 255).sum()) != kept_patches:
        return f"mask keeps {int((mask == 255).sum())} patches, parquet kept_patches is {kept_patches}"
    return None


def validate_row(row: dict) -> list[str]:
    """Problems with one row's values (beyond types, which Arrow enforces)."""
    problems = []
    key = row.get("key")
    if not isinstance(key, str) or not KEY_RE.match(key):
        problems.append(f"bad key {key!r}")
    status = row.get("status")
    if status not in STATUSES:
        problems.append(f"{key}: bad status {status!r}")
    if row.get("schema_version") is None:
        problems.append(f"{key}: no schema_version")
    if status == "ok":
        for name in ("lam", "lam_hat"):
            v = row.get(name)
            if v is None or not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0):
                problems.append(f"{key}: {name}={v!r} not in [0, 1]")
        for name in ("winner_sha256", "loser_sha256", "mask_sha256", "image_format", "grid", "image_size"):
            if row.get(name) is None:
                problems.append(f"{key}: ok row without {name}")
        if row.get("image_format") not in (None, *IMAGE_FORMATS):
            problems.append(f"{key}: bad image_format {row.get('image_format')!r}")
    elif status in ("failed", "skipped") and not row.get("error"):
        problems.append(f"{key}: {status} row without error")
    return problems


def error_reason(error: str | None) -> str:
    """The reason part of an error string '<reason>: <detail>' (the whole string if no colon)."""
    if not error:
        return "unknown"
    return error.split(":", 1)[0].strip() or "unknown"
