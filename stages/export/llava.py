"""`export --to llava`: LLaVA-format JSON for LLaVA-codebase trainers (the reference MergeMix
trainer is one): a JSON list of `{id, image, rejected_image, conversations, margin, ...}`.

`image` is the clean winner and `rejected_image` the mixed loser, both relative to DEST (the
trainer's `--image_folder`). The conversation keeps LLaVA's `from` / `value` turns with the
`<image>\\n` prefix where LLaVA's own preprocessing puts it. LLaVA's conversation format has no
system turn: system turns are left out (README says so).
"""
from __future__ import annotations

import json
from pathlib import Path

from stages.export.files import MarginStats, ratios, save_images
from stages.export.pairs import IMAGE_TAG, Pairs, conversation

JSON_FILE = "llava.json"
FROM = {"user": "human", "assistant": "gpt"}


def llava_row(pair, winner: str, loser: str) -> dict:
    conv = conversation(pair.record)
    turns = [{"from": FROM[role], "value": f"{IMAGE_TAG}\n{text}" if i == conv.image_turn else text}
             for i, (role, text) in enumerate(conv.turns) if role in FROM]
    return {"id": pair.key, "image": winner, "rejected_image": loser, "conversations": turns, **ratios(pair),
            "source_id": pair.record.get("source_id")}


def write(pairs: Pairs, dest: Path, source: str) -> dict:
    """Write DEST/llava.json (streamed: one row at a time), DEST/images/ and DEST/README.md; returns the first row."""
    first, margins = None, MarginStats()
    with open(dest / JSON_FILE, "w", encoding="utf-8") as f:
        f.write("[")
        for pair in pairs:
            row = llava_row(pair, *save_images(dest, pair))
            f.write(("\n" if first is None else ",\n") + json.dumps(row, ensure_ascii=False))
            margins.add(row["margin"])
            first = first or row
        f.write("\n]\n")
    (dest / "README.md").write_text(readme(source, len(pairs), margins))
    return first


def readme(source: str, n: int, margins: MarginStats) -> str:
    return f"""# MergeMix pairs for LLaVA-codebase trainers

{n} preference pairs exported from `{source}` by `mergemix-pipeline export --to llava`.
`{JSON_FILE}` is LLaVA's instruction format (a JSON list of `{{id, image, conversations}}`) with
three more keys per row: `rejected_image` (the mixed loser; `image` is the clean winner),
`margin` (= 1 - lam_hat, the pair's SimPO margin), `lam_hat` and `lam`; `source_id` is the
input's own id, `id` the shard key. Images are under `images/`, byte for byte the images of the
shards; margins: {margins.line()}.

```bash
python llava/train/train_mem.py ... --data_path {{this folder}}/{JSON_FILE} --image_folder {{this folder}}
```

A stock LLaVA trainer reads `image` and `conversations` only (plain SFT on the winners); a
preference trainer such as the reference MergeMix trainer also reads `rejected_image` and
`margin`. System turns, which LLaVA's format has no place for, are left out.
"""
