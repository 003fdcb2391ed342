"""One work unit, from input records to preference pairs.

`prepare_unit` (CPU task): fetch bytes, decode, fit to the encoder geometry; every input
becomes a row, failures included. `PairMaker.make` (encoder actor): saliency, per-sample
lam, the partner derangement inside the unit and the masks. `UnitPairs.images` (CPU write
task): the pixels of each pair; for patch-selection methods the loser is composed there,
from the prepared pixels the task already holds, so the actor (one process per GPU) returns
kilobytes of decisions instead of a unit of images. The pixels the encoder saw are exactly
the stored winner, and the stored mask is exactly the loser's mask.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from schemas.shard import BLEND_METHODS, empty_row, sample_key
from stages.preprocess import CLIP_MEAN_RGB, load_pixels
from stages.read import InputError, InputRecord, clean_text, close_handles, load_image_bytes
from stages.writer import PairImages

# torch and the mixing stage are imported inside PairMaker only: the CPU tasks that prepare
# units and unpickle PreparedUnit/UnitPairs then never load torch (seconds of CPU and a few
# hundred MB per Ray worker process; see bench/README.md).
if TYPE_CHECKING:
    import torch

    from stages.encoder import MergingEncoder


@dataclass
class PreparedUnit:
    unit_id: int
    rows: list[dict]  # one per input, in input order
    pixels: np.ndarray  # (n_ok, H, W, 3) uint8, rows with status "ok" in order
    timings: dict = field(default_factory=dict)

    @property
    def ok_rows(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "ok"]


@dataclass
class UnitPairs:
    """The actor's decisions for one unit. Index i runs over the ok rows, in row order, and
    is also the image's index in the PreparedUnit's pixels."""

    unit_id: int
    rows: list[dict]
    masks: np.ndarray  # (n_ok, gh, gw) uint8, 255 = patch from the winner (mixup: its blend weight)
    partners: np.ndarray  # (n_ok,) index of each sample's partner x_j
    losers: np.ndarray | None = None  # (n_ok, H, W, 3), only for methods that are not a patch selection
    timings: dict = field(default_factory=dict)

    def images(self, winners: np.ndarray) -> Mapping[str, PairImages]:
        """Key -> the pair's pixels, given the unit's prepared pixels; a loser is composed
        when its pair is looked up, so a writer holds one at a time."""
        return _UnitImages(self, winners)


class _UnitImages(Mapping):
    def __init__(self, pairs: UnitPairs, winners: np.ndarray):
        keys = [r["key"] for r in pairs.rows if r["status"] == "ok"]
        if not len(keys) == len(pairs.masks) == len(pairs.partners) <= len(winners):
            raise ValueError(f"unit {pairs.unit_id}: {len(keys)} ok rows, {len(pairs.masks)} masks, "
                             f"{len(pairs.partners)} partners and {len(winners)} images do not match")
        self.pairs, self.winners, self.index = pairs, winners, {k: i for i, k in enumerate(keys)}

    def __getitem__(self, key: str) -> PairImages:
        i, pairs = self.index[key], self.pairs
        winner, mask = self.winners[i], pairs.masks[i]
        if pairs.losers is not None:
            return PairImages(winner, pairs.losers[i], mask)
        return PairImages(winner, compose_loser(winner, self.winners[int(pairs.partners[i])], mask), mask)

    def __contains__(self, key) -> bool:  # without composing the loser, as Mapping's default would
        return key in self.index

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


def compose_loser(winner: np.ndarray, partner: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The loser of a patch-selection method: the partner's pixels, with the winner's on the
    patches where `mask` (gh, gw) is non-zero. A pure selection of uint8 values, so it is
    bit-for-bit stages.mix.mix_pixels; numpy, so a CPU task needs no torch for it."""
    (h, w, c), (gh, gw) = winner.shape, mask.shape
    if partner.shape != winner.shape or h % gh or w % gw:
        raise ValueError(f"winner {winner.shape}, partner {partner.shape} and mask {mask.shape} do not fit")
    ph, pw = h // gh, w // gw
    loser = partner.copy()
    rows, cols = np.nonzero(mask)
    # (gh, ph, gw, pw*c) views: patch (r, c) is [r, :, c]; one fancy-indexed copy moves every kept patch.
    loser.reshape(gh, ph, gw, pw * c)[rows, :, cols] = winner.reshape(gh, ph, gw, pw * c)[rows, :, cols]
    return loser


def prepare_unit(unit_id: int, first_index: int, records: list[InputRecord], image_size: tuple[int, int],
                 resize: str, image_root: str | None, fill=CLIP_MEAN_RGB, interpolation: str = "bicubic") -> PreparedUnit:
    """Decode one unit's inputs. Bad input becomes a failed/skipped row, never an exception.
    `fill` (pad and transparency colour) and `interpolation` are the tower's (stages.tower)."""
    start = time.perf_counter()
    root = Path(image_root) if image_root else None
    rows, handles = [], {}
    # Filled in place: no list of arrays plus a stacked copy (half the task's peak memory).
    pixels, n_ok = np.empty((len(records), *image_size, 3), np.uint8), 0
    try:
        for i, rec in enumerate(records):
            row = empty_row(key=sample_key(unit_id, i), source_id=clean_text(rec.source_id), unit=unit_id, index=i,
                            input_index=first_index + i, resize_mode=resize)
            try:
                row.update(prompt=clean_text(rec.prompt), answer=clean_text(rec.answer),
                           conversations=clean_text(rec.conversations), label=clean_text(rec.label))
                if rec.error:
                    raise InputError(*rec.error.split(": ", 1))
                if rec.image is None:
                    row.update(status="skipped", error="no_image: text-only sample")
                else:
                    array, orig = load_pixels(load_image_bytes(rec.image, root, handles), image_size, resize, fill,
                                              interpolation)
                    pixels[n_ok] = array
                    n_ok += 1
                    row.update(status="ok", orig_size=list(orig))
            except InputError as exc:
                row.update(status="failed", error=clean_text(str(exc)))
            except Exception as exc:  # an unforeseen reader error costs this row, not the unit
                row.update(status="failed", error=clean_text(f"read_error: {type(exc).__name__}: {str(exc)[:200]}"))
            rows.append(row)
    finally:
        close_handles(handles)
    stacked = pixels if n_ok == len(records) else pixels[:n_ok].copy()  # a copy only when rows failed
    return PreparedUnit(unit_id, rows, stacked, {"prepare_s": time.perf_counter() - start})


class PairMaker:
    """Holds the encoders of one actor and turns prepared units into pairs."""

    def __init__(self, encoder: MergingEncoder, *, method: str, lam: str, lam_mode: str, seed: int,
                 batch_size: int, describe: dict):
        from stages.mix import parse_lam_spec

        self.encoder = encoder
        self.method = method
        self.lam_spec = parse_lam_spec(lam)
        self.lam_mode = lam_mode
        self.seed = seed
        self.batch_size = batch_size
        self.describe = describe  # model/pretrained and config fields stamped on every ok row

    def saliency(self, pixels: torch.Tensor):
        import torch

        grids, tokens, sources = [], [], []
        for start in range(0, len(pixels), self.batch_size):
            sal = self.encoder.saliency_from_pixels(pixels[start : start + self.batch_size])
            grids.append(sal.grid)
            tokens.append(sal.token_scores)
            sources.append(sal.source)
        return torch.cat(grids), torch.cat(tokens), torch.cat(sources)

    def make(self, unit: PreparedUnit) -> UnitPairs:
        import torch

        with torch.no_grad():
            return self._make(unit)

    def _make(self, unit: PreparedUnit) -> UnitPairs:
        import torch

        from stages.mix import NEEDS_SALIENCY, derangement, lam_hats, make_losers, sample_lams

        start = time.perf_counter()
        ok = unit.ok_rows
        if len(ok) == 1:  # nothing to mix with: record it instead of pairing an image with itself
            ok[0].update(status="skipped", error="no_partner: only one usable image in the unit")
            ok = []
        enc = self.encoder
        if not ok:
            return UnitPairs(unit.unit_id, unit.rows, np.zeros((0, *enc.grid), np.uint8), np.zeros(0, np.int64),
                             timings=unit.timings)
        keys = [r["key"] for r in ok]
        lam = sample_lams(self.lam_spec, self.seed, keys)
        partner = derangement(keys, self.seed)
        pixels = torch.from_numpy(unit.pixels).to(enc.device)
        grid = tokens = source = None
        if self.method in NEEDS_SALIENCY:
            grid, tokens, source = self.saliency(pixels)  # the unit is on the device once, for both steps
        result = make_losers(
            self.method, pixels, torch.from_numpy(partner).to(enc.device), torch.from_numpy(lam).to(enc.device),
            grid=enc.grid, patch=enc.patch, keys=keys, seed=self.seed,
            saliency=None if grid is None else grid.flatten(1), token_scores=tokens, source=source, compose=False,
        )
        kept = result.kept.double().cpu().numpy()
        lam = result.lam.double().cpu().numpy()  # where a box decides the ratio (cutmix, resizemix), the one it made
        lam_hat = lam_hats(self.lam_mode, lam, kept, tokens_kept=enc.tokens_kept, num_patches=enc.num_patches,
                           seed=self.seed, keys=keys)
        masks = result.mask.cpu().numpy()
        flat_saliency = grid.flatten(1).float().cpu().numpy() if grid is not None else None
        for i, row in enumerate(ok):
            j = int(partner[i])
            row.update(
                self.describe,
                partner_key=keys[j], partner_source_id=ok[j]["source_id"], partner_label=ok[j]["label"],
                lam=float(lam[i]), lam_hat=float(lam_hat[i]), margin=float(1.0 - lam_hat[i]),
                kept_patches=None if self.method in BLEND_METHODS else int((masks[i] == 255).sum()),
                saliency=flat_saliency[i].tolist() if flat_saliency is not None else None,
            )
        timings = dict(unit.timings, pairs_s=time.perf_counter() - start)
        losers = None if result.loser is None else result.loser.cpu().numpy()
        return UnitPairs(unit.unit_id, unit.rows, masks, partner, losers, timings)
