"""`export --to hf`: a Hugging Face `datasets` dataset, saved with `save_to_disk` and as Parquet.

Columns, one row per pair:
- `images` / `rejected_images`: `[winner]` / `[loser]`, `Image` features holding the shard's
  own bytes (no re-encoding);
- `prompt` / `chosen` / `rejected`: TRL's conversational preference format with structured
  content: `prompt` is every turn before the last answer, the image as a `{"type": "image"}`
  part opening its turn; `chosen` and `rejected` are the same last answer (MergeMix pairs
  differ in the image only);
- `margin` (= 1 - lam_hat), `lam_hat`, `lam`, `mask` (the patch mask PNG) and `key`; for the image-side
  negatives `method_params`, the JSON of the drawn parameters (null for the other methods).

Stock TRL trainers repeat `images` for both sides (see README): the loser needs a collator
that reads `rejected_images`, such as the one of `stages.training.hf_trainer`.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from stages.errors import UserError
from stages.export.files import MarginStats
from stages.export.pairs import Pairs, conversation

DATA_DIR = "data"  # the Parquet files, as `push_to_hub` lays them out


def features():
    import datasets

    part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    message = {"role": datasets.Value("string"), "content": [part]}
    return datasets.Features({
        "key": datasets.Value("string"),
        "images": [datasets.Image()],
        "rejected_images": [datasets.Image()],
        "prompt": [message],
        "chosen": [message],
        "rejected": [message],
        "margin": datasets.Value("float64"),
        "lam_hat": datasets.Value("float64"),
        "lam": datasets.Value("float64"),
        "method_params": datasets.Value("string"),
        "mask": datasets.Image(),
    })


def trl_messages(record: dict) -> tuple[list[dict], list[dict]]:
    """(prompt, answer) as TRL conversational messages with structured content."""
    conv = conversation(record)
    messages = []
    for i, (role, text) in enumerate(conv.turns):
        parts = [{"type": "text", "text": text}]
        if i == conv.image_turn:
            parts.insert(0, {"type": "image", "text": None})
        messages.append({"role": role, "content": parts})
    return messages[:-1], messages[-1:]


def hf_row(pair) -> dict:
    prompt, answer = trl_messages(pair.record)

    def image(part: str, data: bytes) -> dict:  # an Image feature given bytes stores them as they are
        return {"bytes": data, "path": pair.member(part)}

    return {
        "key": pair.key,
        "images": [image("winner", pair.winner)],
        "rejected_images": [image("loser", pair.loser)],
        "prompt": prompt,
        "chosen": answer,
        "rejected": answer,
        **{name: pair.record.get(name) for name in ("margin", "lam_hat", "lam", "method_params")},
        "mask": image("mask", pair.mask),
    }


@contextlib.contextmanager
def _quiet_progress(datasets):
    """Our bar counts the pairs; datasets' own bars would print two more for the same work."""
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def write(pairs: Pairs, dest: Path, source: str) -> dict:
    """save_to_disk into DEST, Parquet files under DEST/data/ (one per output unit that has pairs) and
    DEST/README.md; returns the first row (images as bytes)."""
    try:
        import datasets
    except ImportError:
        raise UserError("export --to hf needs Hugging Face datasets: pip install 'mergemix-pipeline[hf]'") from None
    margins, first = MarginStats(), []

    def rows():
        for pair in pairs:
            row = hf_row(pair)
            margins.add(row["margin"])
            first[:] = first or [row]
            yield row

    cache = Path(tempfile.mkdtemp(prefix=".mergemix-export-cache-", dir=dest.parent))
    try:
        with _quiet_progress(datasets):
            # from_generator streams the rows into an Arrow file of its cache: one pair in memory at a time.
            try:
                ds = datasets.Dataset.from_generator(rows, features=features(), cache_dir=str(cache), split="train")
            except datasets.exceptions.DatasetGenerationError as exc:
                if isinstance(exc.__cause__, UserError):  # a damaged shard: our one line, not datasets' wrapper
                    raise exc.__cause__ from None
                raise
            ds.save_to_disk(str(dest))
            counts = [st["tar"]["nsamples"] for st in pairs.units.values() if st["tar"]["nsamples"]]
            shards, start = len(counts), 0
            (dest / DATA_DIR).mkdir()
            for i, n in enumerate(counts):  # the rows are in unit order: unit i's rows are one contiguous range
                ds.select(range(start, start + n)).to_parquet(str(dest / DATA_DIR / f"train-{i:05d}-of-{shards:05d}.parquet"))
                start += n
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    (dest / "README.md").write_text(readme(source, len(ds), margins, shards))
    return first[0] if first else None


def readme(source: str, n: int, margins: MarginStats, shards: int) -> str:
    return f"""# MergeMix pairs as a Hugging Face dataset

{n} preference pairs exported from `{source}` by `mergemix-pipeline export --to hf`; margins:
{margins.line()}. The same rows twice: this folder is a `save_to_disk` dataset, and `{DATA_DIR}/`
holds them as {shards} Parquet file(s), laid out as `push_to_hub` uploads them.

```python
import datasets
ds = datasets.load_from_disk("this/folder")
ds = datasets.load_dataset("parquet", data_files="this/folder/{DATA_DIR}/*.parquet", split="train")  # same rows
```

| column | what |
|---|---|
| `images` | `[winner]`: the clean image (`Image`, the shard's bytes) |
| `rejected_images` | `[loser]`: the mixed image |
| `prompt` | TRL conversational messages before the answer; `{{"type": "image"}}` opens the image's turn |
| `chosen`, `rejected` | the answer, the same on both sides (the pair differs in the image only) |
| `margin`, `lam_hat`, `lam` | per-pair SimPO margin (= 1 - lam_hat) and mixing ratios |
| `method_params` | image-side negatives: the drawn parameters (JSON) that rebuild the loser; null otherwise |
| `mask` | the patch mask (255 = patch from the winner) |
| `key` | the pair's key in the shards |

TRL's vision preference collator repeats `images` for `chosen` and `rejected`, so stock TRL
would score both sides on the clean image. Train on the loser images with the transformers
Trainer of `stages.training.hf_trainer` (its collator reads `rejected_images` and `margin`), or with
`mergemix-pipeline train` on the shards.
"""
