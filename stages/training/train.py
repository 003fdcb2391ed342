"""A slim trainer for MergeMix preference shards: SFT + mixed SimPO (docs/METHOD.md section 5).

One optimizer step = `grad_accum` micro-batches. Each micro-batch runs the model on the clean
images (with gradient: SFT and the winner side of SimPO) and on the mixed images (without
gradient unless `two_sided`), then `stages.training.losses.mergemix_loss`. AdamW, linear warm-up then
cosine decay, bf16 autocast on CUDA, gradient clipping. Every `log_every` steps the metrics
averaged since the last log (counts summed) go to stdout and `RUN_DIR/log.jsonl`.
`RUN_DIR/checkpoint.pt` holds the trainable weights, optimizer, schedule and data position
(epoch, batches used of it: `stages.training.loader.ShardBatches` makes that position mean the same
batches whatever `num_workers`), so `resume` continues exactly where the run stopped.
With `text_only_rows`, the text-only rows of the Parquet metadata train too (SFT only).
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from schemas.layout import SHARDS_DIR, shard_name, tar_name
from stages.errors import UserError
from stages.readers.output_state import committed_units, require_finished
from stages.storage import open_store
from stages.training.config import TrainConfig
from stages.training.loader import ShardBatches, ShardDataset, collate_pairs, collated, rank_world
from stages.training.losses import mergemix_loss
from stages.training.vlm import build_adapter

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
CONFIG = "train_config.json"
# Settings that must not change when a run is resumed (the model, or what a data position means).
FIXED_ON_RESUME = ("model", "model_path", "batch_size", "grad_accum", "seed", "two_sided", "text_only_rows")
# What a checkpoint's data position counts: batches of ShardBatches, the same for any number of
# workers. Older checkpoints counted DataLoader batches, whose order changed with the workers.
BATCH_ORDER = "shard-batches-1"


def training_shards(cfg: TrainConfig, echo=print):
    """What to read: the output itself (a folder or an object-store URL) when it is a finished
    generate run; a fixed, announced list of its committed units with allow_partial; tars or
    globs as given."""
    source = str(cfg.shards).rstrip("/")
    if source.endswith(".tar") or any(c in source for c in "*?["):
        return cfg.shards
    out = source[: -len(SHARDS_DIR) - 1] if source.endswith("/" + SHARDS_DIR) else source
    store = open_store(out, cfg.storage_options)
    if not store.is_dir(SHARDS_DIR):
        return cfg.shards  # not an output: the loader says what is wrong with it
    if cfg.partial_units is None:
        reasons = require_finished(store, out, cfg.allow_partial, "train on the units committed now")
        if not reasons:
            return cfg.shards
        committed = committed_units(store)
        cfg.partial_units = sorted(committed)
        if not cfg.partial_units:
            raise UserError(f"{out} has no committed units yet")
        names = [shard_name(u) for u in cfg.partial_units]
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        echo(f"training on {len(names)} committed units ({shown}) of an unfinished output: {'; '.join(reasons)}")
    else:
        committed = committed_units(store)  # listed once: on an object store each listing is a request
    missing = [u for u in cfg.partial_units if u not in committed]
    if missing:
        raise UserError(f"units {', '.join(map(shard_name, missing))} of this run's fixed set are no longer committed in {out}")
    return [f"{out}/{SHARDS_DIR}/{tar_name(u)}" for u in cfg.partial_units]


def saved_config(cfg: TrainConfig) -> dict:
    """The config as the run folder keeps it: without storage options (they may hold credentials)."""
    return {k: v for k, v in asdict(cfg).items() if k != "storage_options"}


def cosine_with_warmup(warmup: int, total: int):
    """LR multiplier for step s: linear up to 1 over `warmup` steps, then cosine down to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device here; use --device cpu or auto")
    return torch.device(name)


def turns_of(batch: dict) -> list:
    """The (question, answer) turns of every sample (loader: `turns`); a sample without any
    is a user error: train needs text targets."""
    for key, turns in zip(batch["key"], batch["turns"]):
        if not turns:
            raise UserError(f"sample {key} has no answer, conversation or label; train needs text targets "
                            "(generate from LLaVA JSON or a labelled manifest)")
    return batch["turns"]


class BatchStream:
    """Endless batches over epochs with a resumable position (epoch, batches used in it). The
    batches and their order do not depend on `num_workers` (see ShardBatches)."""

    def __init__(self, dataset: ShardDataset, cfg: TrainConfig, epoch: int = 0, offset: int = 0):
        self.dataset, self.cfg, self.epoch, self.offset = dataset, cfg, epoch, offset

    def __iter__(self):
        while True:
            self.dataset.set_epoch(self.epoch)
            batches = ShardBatches(self.dataset, self.cfg.batch_size, start=self.offset)
            loader = DataLoader(batches, batch_size=None, collate_fn=collated, num_workers=self.cfg.num_workers)
            empty = True
            for batch in loader:
                empty = False
                self.offset = batch["batch_index"] + 1
                yield batch
            if empty and self.offset == 0:
                what = "ok or text-only samples" if self.dataset.text_only else "ok samples"
                raise UserError(f"no {what} in {self.cfg.shards}; `mergemix-pipeline inspect` it to see why (e.g. all inputs failed)")
            self.epoch, self.offset = self.epoch + 1, 0


class MetricSums:
    """Metrics since the last log line: `counts/*` summed, the rest averaged over the
    micro-batches that reported them (a batch without pairs has no rewards)."""

    def __init__(self):
        self.sums, self.reports = defaultdict(float), defaultdict(int)

    def add(self, metrics: dict) -> None:
        for name, value in metrics.items():
            self.sums[name] += value
            self.reports[name] += 1

    def result(self) -> dict:
        return {k: int(v) if k.startswith("counts/") else v / self.reports[k] for k, v in self.sums.items()}


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records of steps after the checkpoint: the resumed run logs them again."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def trainable_state(model: torch.nn.Module) -> dict:
    return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def evaluate(model: torch.nn.Module, shards, *, batch_size: int = 16, max_batches: int | None = None, beta: float = 1.0) -> dict:
    """Loss and reward metrics of `model` on shards (no gradient), averaged over samples."""
    device = next(model.parameters()).device
    dataset = ShardDataset(shards, image_size=getattr(model, "image_size", None))
    was_training = model.training
    model.eval()
    sums, n = defaultdict(float), 0
    for i, batch in enumerate(DataLoader(dataset, batch_size=batch_size, collate_fn=collate_pairs)):
        if max_batches is not None and i >= max_batches:
            break
        turns = turns_of(batch)
        w_logits, w_labels = model(batch["winner"].to(device), turns)
        l_logits, l_labels = model(batch["loser"].to(device), turns)
        result = mergemix_loss(w_logits, w_labels, l_logits, l_labels, batch["margin"].to(device), beta=beta)
        for name, value in result.metrics.items():
            if not name.startswith("counts/"):
                sums[name] += value * len(turns)
        n += len(turns)
    model.train(was_training)
    if n == 0:
        raise UserError(f"no samples in {shards}")
    return {k: v / n for k, v in sums.items()}


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint, loaded weights-only: tensors and plain containers, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in several types
        raise UserError(f"{path} is not a loadable training checkpoint ({type(exc).__name__}); use a new --output") from None


def load_trained(run_dir, device: str = "cpu") -> torch.nn.Module:
    """The model of a run folder: built as its config says, with the checkpoint's weights."""
    run = Path(run_dir)
    if not (run / CHECKPOINT).exists():
        raise UserError(f"{run} has no {CHECKPOINT}; pass the --output folder of a train run")
    known = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in json.loads((run / CONFIG).read_text()).items() if k in known})
    torch.manual_seed(cfg.seed)
    model = build_adapter(cfg.model, cfg.model_path, dtype=cfg.model_dtype, max_length=cfg.max_length)
    model.load_state_dict(load_checkpoint(run / CHECKPOINT)["model"], strict=False)
    return model.to(device)


def train(cfg: TrainConfig, echo=print) -> dict:
    """Run (or resume) training; returns the first and last logged metrics and the final step."""
    cfg.check()
    if rank_world()[1] > 1:
        raise UserError("train runs in one process; start it without torchrun (WORLD_SIZE is set above 1)")
    out = Path(cfg.output)
    ckpt_path = out / CHECKPOINT
    state = None
    if ckpt_path.exists():
        if not cfg.resume:
            raise UserError(f"{out} already holds a run; pass --resume to continue it, or choose another --output")
        state = load_checkpoint(ckpt_path)
        saved = state["config"]
        defaults = {f.name: f.default for f in fields(TrainConfig)}  # settings older runs did not have
        changed = [k for k in FIXED_ON_RESUME if saved.get(k, defaults[k]) != getattr(cfg, k)]
        if changed:
            raise UserError(f"cannot resume {out} with different {', '.join(changed)}; use the saved values or a new --output")
        if state.get("batch_order") != BATCH_ORDER and saved.get("num_workers", 0) > 0:
            raise UserError(f"{out} was saved by an older version with --num-workers {saved['num_workers']}, whose batch "
                            "order cannot be found again; use a new --output")
        cfg.partial_units = saved.get("partial_units")  # a partial run goes on with the units it started with
    shards = training_shards(cfg, echo)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(json.dumps(saved_config(cfg), indent=2))

    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    model = build_adapter(cfg.model, cfg.model_path, dtype=cfg.model_dtype, gradient_checkpointing=cfg.gradient_checkpointing,
                          max_length=cfg.max_length).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(cfg.warmup, cfg.steps))
    step, epoch, offset = 0, 0, 0
    if state is not None:
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
        if unexpected or set(state["model"]) != {n for n, p in model.named_parameters() if p.requires_grad}:
            raise UserError(f"{ckpt_path} does not match the model's trainable weights; use a new --output")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, offset = state["step"], state["epoch"], state["offset"]
        torch.set_rng_state(state["rng"])
        _truncate_log(out / LOG, step)
        echo(f"resumed {out} at step {step}")
    elif cfg.resume:
        echo(f"no checkpoint in {out}; starting a new run")

    dataset = ShardDataset(shards, image_size=getattr(model, "image_size", None), shuffle_shards=True, seed=cfg.seed,
                           text_only=cfg.text_only_rows, storage_options=cfg.storage_options)
    stream = BatchStream(dataset, cfg, epoch, offset)
    batches = iter(stream)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def save() -> None:
        _atomic_save(
            {
                "model": trainable_state(model), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": step, "epoch": stream.epoch, "offset": stream.offset, "rng": torch.get_rng_state(), "config": saved_config(cfg),
                "batch_order": BATCH_ORDER,
            },
            ckpt_path,
        )

    sums, norms, first, last = MetricSums(), [], None, None
    started, samples = time.time(), 0
    model.train()
    with open(out / LOG, "a") as log:
        while step < cfg.steps:
            for _ in range(cfg.grad_accum):
                batch = next(batches)
                turns, has_image = turns_of(batch), batch["has_image"]
                margin = batch["margin"] if cfg.margin_from == "lam_hat" else 1.0 - batch["lam"]
                with autocast:
                    w_logits, w_labels = model(batch["winner"].to(device), turns, has_image)
                    if has_image.any():
                        with nullcontext() if cfg.two_sided else torch.no_grad():
                            l_logits, l_labels = model(batch["loser"].to(device), turns, has_image)
                    else:  # text-only batch: no pair to score, SFT only
                        l_logits, l_labels = w_logits.detach(), w_labels
                result = mergemix_loss(
                    w_logits, w_labels, l_logits, l_labels, margin.to(device), has_image=has_image,
                    beta=cfg.beta, sft_weight=cfg.sft_weight, pref_weight=cfg.pref_weight, two_sided=cfg.two_sided,
                )
                (result.loss / cfg.grad_accum).backward()
                sums.add(result.metrics)
                samples += len(turns)
            if cfg.max_grad_norm > 0:
                norms.append(float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps or step == 1:
                record = {"step": step, "epoch": stream.epoch, "lr": scheduler.get_last_lr()[0]}
                record.update(sums.result())
                if norms:
                    record["grad_norm"] = sum(norms) / len(norms)
                record["samples_per_s"] = samples / max(time.time() - started, 1e-9)
                log.write(json.dumps(record) + "\n")
                log.flush()
                echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
                first = first or record
                last = record
                sums, norms, started, samples = MetricSums(), [], time.time(), 0
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                save()
    if state is None or step > state["step"]:
        save()
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(out / "model")  # a folder the model's own library loads
    return {"step": step, "first": first, "last": last, "output": str(out)}
