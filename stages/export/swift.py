"""`export --to swift`: JSONL for ms-swift's multimodal RLHF (`swift rlhf`).

One row per pair, in ms-swift's standard format: `messages` (the conversation, roles system /
user / assistant), `images: [winner]` and `rejected_images: [loser]`: the rejected side is the
same messages with the loser image (ms-swift >= 3.8 reads `rejected_images` without a
`rejected_response`). `<image>` opens the content of the turn the image belongs to, with no
newline after it: ms-swift's LLaVA-1.5 template replaces the tag with `<image>\\n` itself, which
gives exactly the `<image>\\n{question}` that LLaVA-1.5 was trained on. Image paths are relative
to DEST (run from DEST or set ROOT_IMAGE_DIR=DEST).
"""
from __future__ import annotations

import json
from pathlib import Path

from stages.export.files import MarginStats, ratios, save_images
from stages.export.pairs import IMAGE_TAG, Pairs, conversation

JSONL = "train.jsonl"


def swift_row(pair, winner: str, loser: str) -> dict:
    conv = conversation(pair.record)
    messages = [{"role": role, "content": IMAGE_TAG + text if i == conv.image_turn else text}
                for i, (role, text) in enumerate(conv.turns)]
    return {"messages": messages, "images": [winner], "rejected_images": [loser], **ratios(pair), "key": pair.key}


def write(pairs: Pairs, dest: Path, source: str) -> dict:
    """Write DEST/train.jsonl, DEST/images/ and DEST/README.md; returns the first row."""
    first, margins = None, MarginStats()
    with open(dest / JSONL, "w", encoding="utf-8") as f:
        for pair in pairs:
            row = swift_row(pair, *save_images(dest, pair))
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            margins.add(row["margin"])
            first = first or row
    (dest / "README.md").write_text(readme(source, len(pairs), margins))
    return first


def readme(source: str, n: int, margins: MarginStats) -> str:
    gamma = f"{margins.mean:.3f}"
    return f"""# MergeMix pairs for ms-swift

{n} preference pairs exported from `{source}` by `mergemix-pipeline export --to swift`.
`{JSONL}`: one row per pair, `messages` + `images` (the clean winner) + `rejected_images` (the
mixed loser); the text is the same on both sides. Images are under `images/`, byte for byte the
images of the shards, with paths relative to this folder. Per-pair `margin` (= 1 - lam_hat),
`lam_hat`, `lam` and the shard `key` ride along.

SimPO + SFT on it with ms-swift (its `simpo` with `cpo_alpha` adds the NLL loss of the chosen
side, the SFT term of MergeMix; `--freeze_vit true` as in LLaVA-1.5 stage 2):

```bash
cd {{this folder}}      # or: export ROOT_IMAGE_DIR={{this folder}}
swift rlhf --rlhf_type simpo --model llava-hf/llava-1.5-7b-hf \\
    --dataset {JSONL} --tuner_type full --freeze_vit true --torch_dtype bfloat16 \\
    --beta 1 --simpo_gamma {gamma} --cpo_alpha 1 \\
    --learning_rate 2e-5 --num_train_epochs 1 --per_device_train_batch_size 4 \\
    --gradient_accumulation_steps 4 --output_dir output
```

What is lost. ms-swift's SimPO has one global margin `--simpo_gamma` for every pair; MergeMix
gives each pair its own, `margin = 1 - lam_hat` (a less-mixed loser is harder to tell apart, so
its margin is smaller). The command uses the mean margin of this export as the global gamma
({margins.line()}). ms-swift reads a `margin` column (its reward-model trainer uses it); its
SimPO ignores it. `cpo_alpha 1` weighs SFT and SimPO 1:1, MergeMix's
`(L_sft + L_pref) / 2` up to a factor of 2 on the learning rate. For the per-pair margin,
train with `mergemix-pipeline train` or the transformers Trainer of `stages.training.hf_trainer`.
"""
