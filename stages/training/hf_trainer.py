"""MergeMix on the Hugging Face `transformers.Trainer`: the mixed SimPO + SFT loss of
`stages.training.losses.mergemix_loss` over a llava-hf model, so distributed training (DDP, FSDP,
DeepSpeed), `report_to`, checkpointing and `accelerate launch` / `torchrun` come from the
library. `mergemix-pipeline train` stays the one-file path; both score a pair the same way.

    model = LlavaForConditionalGeneration.from_pretrained(path)
    trainer = MergeMixTrainer(model=model, processor=AutoProcessor.from_pretrained(path),
                              args=MergeMixTrainingArguments(output_dir="run", max_steps=1000, beta=1.0),
                              train_dataset=ShardDataset("OUT") or datasets.load_from_disk("EXPORT"))
    trainer.train()

or from the command line (every TrainingArguments flag works):

    accelerate launch -m stages.training.hf_trainer --model_path llava-hf/llava-1.5-7b-hf --data OUT \\
        --output_dir run --max_steps 1000 --per_device_train_batch_size 4 --bf16 --report_to wandb

The data: our shards (`stages.training.loader.ShardDataset`, read by each rank for its own shards) or
the `export --to hf` dataset (a map-style `datasets.Dataset`, split over ranks by the Trainer).
`PairCollator` turns either into winner and loser images plus the text; `compute_loss` renders
every turn of the text with the model's chat template (labels as `train` builds them) and runs the model twice (the loser without gradient
unless `two_sided`), through `stages.training.vlm.LlavaHF`, as `train` does.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import HfArgumentParser, Trainer, TrainingArguments

from stages.errors import UserError
from stages.readers.conversation import sample_turns
from stages.training.loader import ShardDataset
from stages.training.losses import mergemix_loss
from stages.training.vlm import LlavaHF


@dataclass
class MergeMixTrainingArguments(TrainingArguments):
    """TrainingArguments plus the loss settings (docs/METHOD.md section 5)."""

    beta: float = field(default=1.0, metadata={"help": "SimPO beta"})
    sft_weight: float = field(default=0.5, metadata={"help": "weight of the SFT loss on the winner"})
    pref_weight: float = field(default=0.5, metadata={"help": "weight of the mixed SimPO loss"})
    two_sided: bool = field(default=False, metadata={"help": "gradients through the loser too (default: no gradient)"})
    margin_from: str = field(default="lam_hat", metadata={"help": "SimPO margin: 1 - lam_hat (the stored margin) or 1 - lam"})
    freeze_vision: bool = field(default=True, metadata={"help": "freeze the vision tower, as LLaVA-1.5 stage 2"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "kept off: the collator reads the pair's columns"})

    def __post_init__(self):
        if self.ddp_find_unused_parameters is None:
            # With the tower frozen every trainable weight is used; unfrozen, LLaVA leaves its last
            # vision block unused (features come from the one before), which DDP must be told.
            self.ddp_find_unused_parameters = not self.freeze_vision
        super().__post_init__()
        if self.margin_from not in ("lam_hat", "lam"):
            raise UserError(f"--margin_from must be lam_hat or lam, got {self.margin_from!r}")
        self.remove_unused_columns = False  # the Trainer would drop images and text: they are not model.forward's


def _pixels(image) -> torch.Tensor:
    """A PIL image (the hf export) or a 3 x H x W float tensor in [0, 1] (our loader) -> the tensor."""
    if isinstance(image, torch.Tensor):
        return image.float()
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float().div_(255.0)


def _text(message: dict) -> str:
    return " ".join(part["text"] for part in message["content"] if part.get("type") == "text" and part.get("text"))


def pair_turns(row: dict) -> list[tuple[str, str]]:
    """The (question, answer) turns of a row, every turn, as `train` reads them: a loader
    sample's `turns`; an hf-export row's prompt + chosen messages, read as the LLaVA
    conversation they were made from."""
    if "chosen" in row:
        roles = {"user": "human", "assistant": "gpt"}
        conversation = [{"from": roles[m["role"]], "value": _text(m)} for m in list(row["prompt"]) + list(row["chosen"])
                        if m["role"] in roles]
        turns = sample_turns(conversation, None, None, None)
    else:
        turns = row.get("turns") or []
    if not turns:
        raise UserError(f"pair {row.get('key')} has no answer, conversation or label: MergeMix needs the answer text")
    return turns


class PairCollator:
    """Rows of `ShardDataset` or of the `export --to hf` dataset -> one batch: `winner` and `loser`
    (B x 3 x H x W floats in [0, 1]; zeros for a text-only row), `turns` (a list per row),
    `has_image`, `margin` and `lam` (tensors)."""

    def __call__(self, rows: list[dict]) -> dict:
        if not rows:
            raise ValueError("PairCollator got an empty batch")
        if "winner" in rows[0]:
            winners, losers = [r["winner"] for r in rows], [r["loser"] for r in rows]
        else:
            winners, losers = [r["images"][0] for r in rows], [r["rejected_images"][0] for r in rows]
        winners = [None if x is None else _pixels(x) for x in winners]
        losers = [None if x is None else _pixels(x) for x in losers]
        blank = torch.zeros_like(next((x for x in winners if x is not None), torch.zeros(3, 1, 1)))  # text-only rows
        return {
            "winner": torch.stack([blank if x is None else x for x in winners]),
            "loser": torch.stack([blank if x is None else x for x in losers]),
            "turns": [pair_turns(r) for r in rows],
            "has_image": torch.tensor([x is not None for x in winners]),
            "margin": torch.tensor([float(r["margin"]) for r in rows]),
            "lam": torch.tensor([float(r["lam"]) for r in rows]),
        }


class _EpochLoader(DataLoader):
    """A DataLoader whose set_epoch reaches ShardDataset (it reshuffles its shards per epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


class MergeMixTrainer(Trainer):
    """A `transformers.Trainer` whose loss is `mergemix_loss` over a llava-hf model.

    `model` is the `LlavaForConditionalGeneration` itself (so saving, FSDP wrapping, gradient
    checkpointing and PEFT work as for any Hugging Face model); `processor` its processor.
    Settings come from `MergeMixTrainingArguments` (plain TrainingArguments get the defaults)."""

    def __init__(self, model=None, args=None, *, processor, data_collator=None, **kwargs):
        args = args if args is not None else MergeMixTrainingArguments(output_dir="mergemix-run")
        args.remove_unused_columns = False
        self.loss_args = {name: getattr(args, name, default) for name, default in
                          (("beta", 1.0), ("sft_weight", 0.5), ("pref_weight", 0.5), ("two_sided", False))}
        self.margin_from = getattr(args, "margin_from", "lam_hat")
        # The adapter renders the text and runs the processor; the forward goes through the
        # Trainer's (possibly DDP / FSDP wrapped) model, so gradients are synchronised.
        self.adapter = LlavaHF(model, processor, freeze_vision=getattr(args, "freeze_vision", True))
        super().__init__(model=model, args=args, data_collator=data_collator or PairCollator(),
                         processing_class=processor, **kwargs)
        self.model_accepts_loss_kwargs = False  # compute_loss returns a per-batch mean ...
        self.loss_is_scaled_for_ga = False  # ... which the Trainer divides by the accumulation steps
        self._pair_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _prepare_inputs(self, inputs: dict) -> dict:
        return inputs  # images stay on the CPU, where the processor resizes them; compute_loss moves the rest

    def get_train_dataloader(self) -> DataLoader:
        if not isinstance(self.train_dataset, ShardDataset):
            return super().get_train_dataloader()
        # ShardDataset gives every rank and DataLoader worker its own shards. accelerate would
        # read all batches on rank 0 and dispatch them (or keep every n-th batch of each rank's
        # stream), so the loader is not handed to it. Ranks step in lockstep: use max_steps.
        return _EpochLoader(self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)

    def _forward(self, model, images: torch.Tensor, turns: list, has_image: torch.Tensor):
        batch = self.adapter.encode(images, turns, has_image)
        device = self.args.device
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        if batch["pixel_values"] is not None:
            inputs["pixel_values"] = batch["pixel_values"].to(device, self.adapter.vision_tower().dtype)
        return model(**inputs).logits, batch["labels"].to(device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        turns, has_image = inputs["turns"], inputs["has_image"]
        winner_logits, winner_labels = self._forward(model, inputs["winner"], turns, has_image)
        if has_image.any():
            with nullcontext() if self.loss_args["two_sided"] else torch.no_grad():
                loser_logits, loser_labels = self._forward(model, inputs["loser"], turns, has_image)
        else:  # text-only batch: no pair to score, SFT only (as `train`)
            loser_logits, loser_labels = winner_logits.detach(), winner_labels
        margin = inputs["margin"] if self.margin_from == "lam_hat" else 1.0 - inputs["lam"]
        result = mergemix_loss(winner_logits, winner_labels, loser_logits, loser_labels, margin.to(winner_logits.device),
                               has_image=has_image.to(winner_logits.device), **self.loss_args)
        mode = "train" if model.training else "eval"
        for name, value in result.metrics.items():
            if name != "loss":  # the Trainer logs its own running loss
                self._pair_metrics[mode][name].append(value)
        return (result.loss, {"metrics": result.metrics}) if return_outputs else result.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, self._prepare_inputs(inputs))
        return loss.detach(), None, None

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Add the means of sft, simpo and the rewards since the last log (this rank's)."""
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for name, values in self._pair_metrics[mode].items():
            logs[prefix + name] = sum(values) / len(values)
        self._pair_metrics[mode].clear()
        super().log(logs, *args, **kwargs)


@dataclass
class ScriptArguments:
    model_path: str = field(metadata={"help": "llava-hf model folder or hub id (model and processor)"})
    data: str = field(metadata={"help": "output of `generate` (folder or URL) or an `export --to hf` folder"})
    storage_options: str | None = field(default=None, metadata={"help": "JSON fsspec options when --data is a URL"})
    torch_dtype: str = field(default="float32", metadata={"help": "weights dtype: float32 | bfloat16"})


def load_data(data: str, storage_options: dict | None = None, seed: int = 0):
    """An `export --to hf` folder (save_to_disk) as a datasets.Dataset, else our shards as a ShardDataset."""
    from pathlib import Path

    if "://" not in data and (Path(data) / "state.json").is_file():
        import datasets

        return datasets.load_from_disk(data)
    return ShardDataset(data, shuffle_shards=True, seed=seed, storage_options=storage_options)


def main(argv: list[str] | None = None) -> Trainer:
    """`python -m stages.training.hf_trainer ...` (or under accelerate launch / torchrun): train and save."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    script, args = HfArgumentParser((ScriptArguments, MergeMixTrainingArguments)).parse_args_into_dataclasses(argv)
    options = json.loads(script.storage_options) if script.storage_options else None
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[script.torch_dtype]
    model = LlavaForConditionalGeneration.from_pretrained(script.model_path, dtype=dtype)
    processor = AutoProcessor.from_pretrained(script.model_path)
    trainer = MergeMixTrainer(model=model, args=args, processor=processor,
                              train_dataset=load_data(script.data, options, args.seed))
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()
    return trainer


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
