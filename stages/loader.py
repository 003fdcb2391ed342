"""Read MergeMix preference shards in a trainer: a torch IterableDataset and a collate function.

    ds = ShardDataset("OUT", normalize="clip")
    dl = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, collate_fn=collate_pairs)

Shards are split across distributed ranks and DataLoader workers (consumer c of C reads
shards c, c + C, ...), so every committed sample is read exactly once per epoch when
there are at least as many shards as consumers. Call `set_epoch(e)` with
`shuffle_shards=True` to change the shard order each epoch.
"""
from __future__ import annotations

import json
import os
import random
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from stages.errors import UserError
from stages.tower import OPENAI_MEAN, OPENAI_STD
from stages.shardread import ShardRef, iter_tar_samples, read_sample, resolve_shards

# open_clip / OpenAI CLIP and ImageNet channel statistics.
NORMALIZE = {
    "clip": (OPENAI_MEAN, OPENAI_STD),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardDataset(IterableDataset):
    """Yields one dict per pair: key, source_id, winner, loser (float32 3 x H x W in [0, 1],
    or normalised), prompt, answer, conversations (parsed list or None), lam, lam_hat,
    margin, label, partner_key, method (+ mask: float32 1 x gh x gw, the winner's share of each
    patch: 1 = from the winner, 0 = not; mixup: about lam on every patch)."""

    def __init__(
        self,
        source,
        *,
        normalize: str | None = None,
        image_size=None,
        shuffle_shards: bool = False,
        seed: int = 0,
        include_mask: bool = False,
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
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shards_for_consumer(self, rank: int, world: int, worker: int, num_workers: int) -> list[ShardRef]:
        """The shards one (rank, worker) reads: a deterministic stride over the (shuffled) list."""
        order = list(self.shards)
        if self.shuffle_shards:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        consumers = world * num_workers
        return order[rank * num_workers + worker :: consumers]

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
        rec, winner, loser, mask = read_sample(parts, f"{ref.where}: sample {key}", self.include_mask)
        conv = rec.get("conversations")
        sample = {
            "key": key,
            "source_id": rec.get("source_id"),
            "winner": self._to_tensor(winner),
            "loser": self._to_tensor(loser),
            "prompt": rec.get("prompt"),
            "answer": rec.get("answer"),
            "conversations": json.loads(conv) if conv else None,
            "lam": float(rec["lam"]),
            "lam_hat": float(rec["lam_hat"]),
            "margin": float(rec["margin"]),
            "label": rec.get("label"),
            "partner_key": rec.get("partner_key"),
            "method": rec.get("method"),
        }
        if mask is not None:
            sample["mask"] = torch.from_numpy(mask.astype(np.float32) / 255.0)[None]  # mixup: its blend weight
        return sample

    def __iter__(self):
        rank, world = _rank_world()
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
            for key, parts in iter_tar_samples(ref):
                yield self._sample(ref, key, parts)


def collate_pairs(batch: list[dict]) -> dict:
    """Stack image tensors, make float tensors of lam/lam_hat/margin, keep everything else as lists."""
    if not batch:
        raise ValueError("collate_pairs got an empty batch")
    out = {}
    for name in batch[0]:
        values = [b[name] for b in batch]
        if isinstance(values[0], torch.Tensor):
            out[name] = torch.stack(values)
        elif name in ("lam", "lam_hat", "margin"):
            out[name] = torch.tensor(values, dtype=torch.float32)
        else:
            out[name] = values
    return out
