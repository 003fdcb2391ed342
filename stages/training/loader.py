"""Read MergeMix preference shards in a trainer: a torch IterableDataset and a collate function.

    ds = ShardDataset("OUT", normalize="clip")
    dl = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, collate_fn=collate_pairs)

Shards are split across distributed ranks and DataLoader workers (consumer c of C reads
shards c, c + C, ...), so every committed sample is read exactly once per epoch when
there are at least as many shards as consumers. Call `set_epoch(e)` with
`shuffle_shards=True` to change the shard order each epoch.

`ShardBatches` gives batches in one fixed order instead, whatever the number of workers and
ranks, and can start at any batch of an epoch without decoding the ones before (resume).

Every sample carries `turns`: the (question, answer) exchanges to train on, every turn of a
LLaVA conversation. With `text_only=True` the text-only rows of the Parquet metadata (status
`skipped`, error `no_image`) come too, in input order, with `has_image` False and no images.
"""
from __future__ import annotations

import json
import os
import random
import warnings
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from stages.readers.conversation import sample_turns
from stages.errors import UserError
from stages.readers.shards import ShardRef, iter_tar_samples, read_parquet, read_sample, resolve_shards
from stages.model.constants import OPENAI_MEAN, OPENAI_STD

# open_clip / OpenAI CLIP and ImageNet channel statistics.
NORMALIZE = {
    "clip": (OPENAI_MEAN, OPENAI_STD),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


# Parquet columns a text-only sample is built from.
TEXT_COLUMNS = ["key", "source_id", "status", "error", "prompt", "answer", "conversations", "label"]


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed when initialised, else RANK / WORLD_SIZE."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _parquet_where(ref: ShardRef) -> str:
    return f"{ref.store.url.rstrip('/')}/{ref.parquet_name}"


class ShardDataset(IterableDataset):
    """Yields one dict per pair: key, source_id, winner, loser (float32 3 x H x W in [0, 1],
    or normalised), prompt, answer, conversations (parsed list or None), turns, lam, lam_hat,
    margin, label, partner_key, method, has_image (+ mask: float32 1 x gh x gw, the winner's
    share of each patch: 1 = from the winner, 0 = not; mixup: about lam on every patch). With `text_only`, text-only rows come too: has_image False, winner/loser/mask
    None, lam/lam_hat/margin 0.0 (collate_pairs fills zero images)."""

    def __init__(
        self,
        source,
        *,
        normalize: str | None = None,
        image_size=None,
        shuffle_shards: bool = False,
        seed: int = 0,
        include_mask: bool = False,
        text_only: bool = False,
        storage_options: dict | None = None,
    ):
        super().__init__()
        if normalize is not None and normalize not in NORMALIZE:
            raise UserError(f"normalize={normalize!r} is not one of {sorted(NORMALIZE)} (or None)")
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        if image_size is not None and (len(image_size) != 2 or min(image_size) <= 0):
            raise UserError(f"image_size={image_size!r} must be a positive int or (h, w)")
        self.shards: list[ShardRef] = resolve_shards(source, storage_options)
        self.normalize = normalize
        self.image_size = tuple(image_size) if image_size is not None else None
        self.shuffle_shards = shuffle_shards
        self.seed = seed
        self.include_mask = include_mask
        self.text_only = text_only
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_shards(self) -> list[ShardRef]:
        """All shards in this epoch's order (shuffled per epoch with `shuffle_shards`)."""
        order = list(self.shards)
        if self.shuffle_shards:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def shards_for_consumer(self, rank: int, world: int, worker: int, num_workers: int) -> list[ShardRef]:
        """The shards one (rank, worker) reads: a deterministic stride over the (shuffled) list."""
        consumers = world * num_workers
        return self.epoch_shards()[rank * num_workers + worker :: consumers]

    def _to_tensor(self, pixels: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)
        if self.image_size is not None and tuple(t.shape[1:]) != self.image_size:
            t = F.interpolate(t[None], size=self.image_size, mode="bilinear", antialias=True, align_corners=False)[0]
            t = t.clamp_(0.0, 1.0)
        if self.normalize is not None:
            mean, std = NORMALIZE[self.normalize]
            t = (t - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        return t

    def _sample(self, ref: ShardRef, key: str, parts: dict[str, bytes]) -> dict:
        where = f"{ref.where}: sample {key}"
        rec, winner, loser, mask = read_sample(parts, where, self.include_mask)
        sample = self._text_fields(rec, key, where)
        sample.update({
            "winner": self._to_tensor(winner),
            "loser": self._to_tensor(loser),
            "lam": float(rec["lam"]),
            "lam_hat": float(rec["lam_hat"]),
            "margin": float(rec["margin"]),
            "partner_key": rec.get("partner_key"),
            "method": rec.get("method"),
            "has_image": True,
        })
        if mask is not None:
            sample["mask"] = torch.from_numpy(mask.astype(np.float32) / 255.0)[None]  # mixup: its blend weight
        return sample

    def _text_fields(self, rec: dict, key: str, where: str) -> dict:
        try:
            conv = json.loads(rec["conversations"]) if rec.get("conversations") else None
        except ValueError:
            conv = False
        if conv is not None and not (isinstance(conv, list) and all(isinstance(t, dict) for t in conv)):
            raise UserError(f"{where}: conversations is not a JSON list of turns; the shard is damaged")
        prompt, answer, label = rec.get("prompt"), rec.get("answer"), rec.get("label")
        return {"key": key, "source_id": rec.get("source_id"), "prompt": prompt, "answer": answer,
                "conversations": conv, "turns": sample_turns(conv, prompt, answer, label), "label": label}

    def _text_only_sample(self, ref: ShardRef, row: dict) -> dict:
        sample = self._text_fields(row, row["key"], f"{_parquet_where(ref)}: row {row['key']}")
        sample.update({"winner": None, "loser": None, "lam": 0.0, "lam_hat": 0.0, "margin": 0.0,
                       "partner_key": None, "method": None, "has_image": False})
        if self.include_mask:
            sample["mask"] = None
        return sample

    def _text_only_rows(self, ref: ShardRef) -> list[dict]:
        """The shard's text-only rows (skipped for having no image), from its Parquet file."""
        if not ref.store.is_file(ref.parquet_name):
            raise UserError(f"{_parquet_where(ref)} is missing: text-only rows are read from the Parquet file next to each tar")
        rows = read_parquet(ref.store, ref.parquet_name, columns=TEXT_COLUMNS).to_pylist()
        return [r for r in rows if r["status"] == "skipped" and (r["error"] or "").startswith("no_image")]

    def entries(self, ref: ShardRef):
        """(key, load) for every sample of one shard in input order; `load()` decodes it, so a
        reader can pass over samples it does not need without decoding their images."""
        text_rows = self._text_only_rows(ref) if self.text_only else []
        for key, parts in iter_tar_samples(ref):
            while text_rows and text_rows[0]["key"] < key:  # keys sort in input order
                row = text_rows.pop(0)
                yield row["key"], partial(self._text_only_sample, ref, row)
            yield key, partial(self._sample, ref, key, parts)
        for row in text_rows:
            yield row["key"], partial(self._text_only_sample, ref, row)

    def __iter__(self):
        rank, world = rank_world()
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.shards_for_consumer(rank, world, worker, num_workers)
        if not mine and len(self.shards) < world * num_workers:
            warnings.warn(
                f"{len(self.shards)} shards for {world * num_workers} readers (ranks x workers): "
                f"rank {rank} worker {worker} gets none; use fewer workers or smaller units",
                stacklevel=2,
            )
        for ref in mine:
            for _, load in self.entries(ref):
                yield load()


class ShardBatches(IterableDataset):
    """Collated batches of a ShardDataset in one order that depends on neither DataLoader
    workers nor ranks: batch b of an epoch holds samples [b * batch_size, (b + 1) * batch_size)
    of the epoch's stream (shards in `epoch_shards()` order, samples in input order; the last
    batch may be smaller). Ranks take batches start, start + 1, ... in turn, and a rank's
    workers take its batches in turn, which is the order a DataLoader returns them in, so
    `DataLoader(ShardBatches(ds, 8), batch_size=None, num_workers=W, collate_fn=collated)`
    yields the same batches for every W. Each batch carries `batch_index` (b). Batches before
    `start` are passed over without decoding: resume at `start` = batches already used of this
    epoch. Every worker reads the epoch's tars through (it decodes only its own batches)."""

    def __init__(self, dataset: ShardDataset, batch_size: int, start: int = 0):
        super().__init__()
        if batch_size < 1 or start < 0:
            raise ValueError(f"batch_size {batch_size} must be positive and start {start} not negative")
        self.dataset, self.batch_size, self.start = dataset, batch_size, start

    def __iter__(self):
        rank, world = rank_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)

        def mine(b: int) -> bool:
            turn = b - self.start
            return turn >= 0 and turn % world == rank and (turn // world) % workers == worker

        current, samples = None, []
        position = 0
        for ref in self.dataset.epoch_shards():
            for _, load in self.dataset.entries(ref):
                b = position // self.batch_size
                position += 1
                if b != current:
                    if samples:
                        yield {**collate_pairs(samples), "batch_index": current}
                    current, samples = b, []
                if mine(b):
                    samples.append(load())
        if samples:
            yield {**collate_pairs(samples), "batch_index": current}


def collated(batch: dict) -> dict:
    """The DataLoader collate_fn for ShardBatches (`batch_size=None`): its batches come collated."""
    return batch


def collate_pairs(batch: list[dict]) -> dict:
    """Stack image tensors, make float tensors of lam/lam_hat/margin and a bool tensor of
    has_image, keep everything else as lists. Text-only samples (image None) get zero images
    shaped like the batch's others."""
    if not batch:
        raise ValueError("collate_pairs got an empty batch")
    out = {}
    for name in batch[0]:
        values = [b[name] for b in batch]
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        if name in ("winner", "loser", "mask"):
            like = tensors[0] if tensors else torch.zeros(1 if name == "mask" else 3, 1, 1)
            out[name] = torch.stack([like.new_zeros(like.shape) if v is None else v for v in values])
        elif tensors:
            out[name] = torch.stack(values)
        elif name in ("lam", "lam_hat", "margin"):
            out[name] = torch.tensor(values, dtype=torch.float32)
        elif name == "has_image":
            out[name] = torch.tensor(values, dtype=torch.bool)
        else:
            out[name] = values
    return out
