"""The dataset card OUT/README.md: what `datasets.load_dataset(OUT)` and the Hugging Face Hub read.

Without a card, `datasets` picks its builder from the most common file extension in OUT, and
an output holds as many `_stats.json` files as tars, so it would read the stats as JSON. The
card's `configs:` names the committed tars, so the `webdataset` builder reads the pairs, and
its `dataset_info` declares every column's type: the builder would otherwise infer the types
from the first five samples and fail on the first later value where those were all null
(a `label`, a `kept_patches`).

The Parquet metadata is not a second config. `datasets` picks one builder per folder, from
the first config's files (huggingface/datasets#7101), so a `metadata` config over Parquet next
to a webdataset default fails to load; the card shows the Parquet reader instead.

The card is rewritten by every run while it carries `schemas.layout.CARD_MARKER`; a README.md
without the marker is somebody else's and is left alone (the card is then skipped, with a notice).
"""
from __future__ import annotations

import pyarrow as pa
import yaml

from schemas.layout import CARD_FILE, CARD_MARKER, SHARDS_DIR
from schemas.shard import ARROW_SCHEMA, SCHEMA_VERSION, part_ext
from stages.readers.output_state import card_owner

_FLOATS = {pa.float32(): "float32", pa.float64(): "float64"}


def _spec(typ: pa.DataType) -> dict:
    """A `datasets` feature in the card's YAML form ({'dtype': 'int32'}, {'list': 'int32', 'length': 2}, ...)."""
    if pa.types.is_string(typ):
        return {"dtype": "string"}
    if pa.types.is_boolean(typ):
        return {"dtype": "bool"}
    if pa.types.is_integer(typ):
        return {"dtype": str(typ)}
    if pa.types.is_floating(typ):
        return {"dtype": _FLOATS[typ]}
    if pa.types.is_fixed_size_list(typ) or pa.types.is_list(typ):
        inner = _spec(typ.value_type)
        spec = {"list": inner["dtype"] if list(inner) == ["dtype"] else inner}
        if pa.types.is_fixed_size_list(typ):
            spec["length"] = typ.list_size
        return spec
    raise TypeError(f"no datasets feature for Arrow type {typ}")


def record_features() -> list[dict]:
    """The sample record (K.json) as a `datasets` struct, in the card's YAML form."""
    return [{"name": field.name, **_spec(field.type)} for field in ARROW_SCHEMA]


def pair_features(image_format: str) -> list[dict]:
    """The columns the webdataset builder gives for one of our samples, in tar member order."""
    images = [{"name": part_ext(part, image_format), "dtype": "image"} for part in ("winner", "loser", "mask")]
    return [*images, {"name": "json", "struct": record_features()},
            {"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}]


def card_text(units: dict[int, dict], run: dict) -> str:
    """The card for the committed `units` (unit id -> stats) of a run (run.json's content)."""
    tars = [f"{SHARDS_DIR}/{st['tar']['file']}" for st in units.values() if st["tar"]["nsamples"]]
    formats = {st.get("image_format") for st in units.values() if st["tar"]["nsamples"]}
    meta = {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": tars}]}],
        "tags": ["mergemix", "preference", "vision-language", "webdataset"],
    }
    fmt = next(iter(formats)) if len(formats) == 1 else None
    if fmt is not None:  # one run writes one format; if not, the builder infers the columns
        meta["dataset_info"] = [{"config_name": "default", "features": pair_features(fmt)}]
    fmt = fmt or "jpg"
    ok = sum(st["counts"]["ok"] for st in units.values())
    total = sum(st["counts"]["total"] for st in units.values())
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    setting = ", ".join(f"{k} {config[k]}" for k in ("method", "lam", "lam_mode", "model", "merge") if k in config)
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, width=1000).rstrip(),
        "---",
        f"{CARD_MARKER}: written by `mergemix-pipeline generate` and rewritten by every run of it. "
        "Delete this line to keep your own edits: generate then leaves this file alone. -->",
        "",
        "# MergeMix preference pairs",
        "",
        f"{ok} pairs from {total} inputs in {len(units)} shards ({setting or 'see run.json'}; "
        f"fingerprint `{run.get('fingerprint', '-')}`, shard schema {SCHEMA_VERSION}).",
        "Each pair is one image and its text twice: the **winner** is the clean image, the **loser** the",
        "attention-guided mix of it with a partner image; the text (prompt and answer) is the same on both",
        "sides. `margin = 1 - lam_hat` is the per-pair preference margin of the mixed SimPO loss.",
        "",
        "```python",
        "from datasets import load_dataset",
        'pairs = load_dataset("path/to/this/folder", split="train")   # webdataset builder over the committed tars',
        f'pairs[0]["{part_ext("winner", fmt)}"], pairs[0]["{part_ext("loser", fmt)}"]'
        f'   # PIL images; pairs[0]["{part_ext("mask", fmt)}"]: the patch mask (255 = from the winner)',
        'pairs[0]["json"]["prompt"], pairs[0]["json"]["answer"], pairs[0]["json"]["margin"]',
        "```",
        "",
        "| column | what |",
        "|---|---|",
        f"| `{part_ext('winner', fmt)}` | clean image (chosen) |",
        f"| `{part_ext('loser', fmt)}` | mixed image (rejected), same size |",
        f"| `{part_ext('mask', fmt)}` | patch-grid mask, 255 = patch taken from the winner |",
        "| `json` | the sample record: `prompt`, `answer`, `conversations` (LLaVA JSON), `lam`, `lam_hat`, "
        "`margin`, `method`, `kept_patches`, `grid`, `saliency`, ... (see `run.json` and the project's schemas/shard.py) |",
        "",
        "The Parquet files hold one row per input, failed and skipped inputs included (reasons in `error`):",
        "`load_dataset(\"parquet\", data_files=\"path/to/this/folder/shards/*.parquet\")`, or pyarrow. They are not",
        "a second config of this card because `datasets` uses one builder per folder.",
        "",
        "For ms-swift, TRL / transformers or LLaVA-codebase trainers, convert with",
        "`mergemix-pipeline export OUT DEST --to swift|hf|llava`.",
        "",
    ]
    return "\n".join(lines)


def write_card(store, units: dict[int, dict], run: dict) -> str | None:
    """Write OUT/README.md unless a README.md of somebody else's is there; returns a notice
    when the card was skipped, else None. No pair committed yet: no card (it would list no file)."""
    if not any(st["tar"]["nsamples"] for st in units.values()):
        return None
    if card_owner(store) == "foreign":
        return (f"{store.url.rstrip('/')}/{CARD_FILE} is not a card of ours: left as it is, no dataset card written "
                "(`datasets.load_dataset` on this folder will not find the pairs)")
    store.write_bytes(CARD_FILE, card_text(units, run).encode())
    return None
