"""The encoder actor's decisions for one unit: saliency, a lam per sample, the partner
derangement inside the unit, and the masks (stages.mix). The actor returns these, kilobytes,
instead of a unit of images: the write task composes each patch-selection loser from the
prepared pixels it already holds (stages.compose). Only losers that are not a selection of
two unit images (mixup, resizemix, blur) travel as pixels."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from schemas.shard import BLEND_METHODS
from stages.prepare import PreparedUnit

# torch and the mixing stage are imported inside UnitDecider only: the CPU tasks that unpickle
# UnitDecisions then never load torch (seconds of CPU and a few hundred MB per Ray worker).
if TYPE_CHECKING:
    import torch

    from stages.encoder import MergingEncoder


@dataclass
class UnitDecisions:
    """What the actor decided for one unit. Index i runs over the ok rows, in row order, and
    is also the image's index in the PreparedUnit's pixels."""

    unit_id: int
    rows: list[dict]  # every row; the ok ones carry the decisions
    masks: np.ndarray  # (n_ok, gh, gw) uint8, 255 = patch from the winner (mixup: its blend weight)
    partners: np.ndarray  # (n_ok,) index of each sample's partner x_j
    losers: np.ndarray | None = None  # (n_ok, H, W, 3), only for methods that are not a patch selection
    timings: dict = field(default_factory=dict)

    @property
    def ok_keys(self) -> list[str]:
        return [r["key"] for r in self.rows if r["status"] == "ok"]


class UnitDecider:
    """Holds the encoder of one actor and turns prepared units into decisions."""

    def __init__(self, encoder: MergingEncoder, *, method: str, lam: str, lam_mode: str, seed: int,
                 batch_size: int, describe: dict):
        from stages.ratios import parse_lam_spec

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

    def decide(self, unit: PreparedUnit) -> UnitDecisions:
        import torch

        with torch.no_grad():
            return self._decide(unit)

    def _decide(self, unit: PreparedUnit) -> UnitDecisions:
        import torch

        from stages.methods import NEEDS_SALIENCY
        from stages.mix import make_losers
        from stages.ratios import derangement, lam_hats, sample_lams

        start = time.perf_counter()
        ok = unit.ok_rows
        if len(ok) == 1:  # nothing to mix with: record it instead of pairing an image with itself
            ok[0].update(status="skipped", error="no_partner: only one usable image in the unit")
            ok = []
        enc = self.encoder
        if not ok:
            return UnitDecisions(unit.unit_id, unit.rows, np.zeros((0, *enc.grid), np.uint8), np.zeros(0, np.int64),
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
            saliency=None if grid is None else grid.flatten(1), token_scores=tokens, source=source,
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
        return UnitDecisions(unit.unit_id, unit.rows, masks, partner, losers, timings)
