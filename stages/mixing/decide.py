"""The encoder actor's decisions for one unit: saliency, a lam per sample, the partner
derangement inside the unit, and the masks (stages.mixing.masks). The actor returns these, kilobytes,
instead of a unit of images: the write task composes each patch-selection loser from the
prepared pixels it already holds (stages.imaging.compose). Only losers that are not a selection of
two unit images (mixup, resizemix, blur) travel as pixels.

With the torch image path the actor also decodes and fits the unit's plain JPEGs itself
(stages.imaging.device) and returns the winners it saw; with `encode_quality` set it composes the
losers on the device and returns JPEG bytes of both, so the write task only packs them."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from schemas.shard import BLEND_METHODS
from stages.model.constants import CLIP_MEAN_RGB
from stages.units import PreparedUnit, UnitDecisions

# torch and the mixing stage are imported inside UnitDecider only: the CPU tasks that unpickle
# UnitDecisions then never load torch (seconds of CPU and a few hundred MB per Ray worker).
if TYPE_CHECKING:
    import torch

    from stages.model.encoder import MergingEncoder


class UnitDecider:
    """Holds the encoder of one actor and turns prepared units into decisions."""

    def __init__(self, encoder: MergingEncoder, *, method: str, lam: str, lam_mode: str, seed: int,
                 batch_size: int, describe: dict, resize: str = "pad", encode_quality: int | None = None):
        """`resize` fits the JPEGs a torch-path unit leaves to the actor; `encode_quality` makes the
        actor JPEG-encode winners and losers itself (torch image path only)."""
        from stages.mixing.ratios import parse_lam_spec

        self.encoder = encoder
        self.method = method
        self.lam_spec = parse_lam_spec(lam)
        self.lam_mode = lam_mode
        self.seed = seed
        self.batch_size = batch_size
        self.describe = describe  # model/pretrained and config fields stamped on every ok row
        self.resize = resize
        self.encode_quality = encode_quality

    def saliency(self, pixels: torch.Tensor):
        import torch

        grids, tokens, sources = [], [], []
        for start in range(0, len(pixels), self.batch_size):
            batch = pixels[start : start + self.batch_size]
            n = len(batch)
            if self.encoder.compiled and n < self.batch_size:
                # A compiled encoder keeps one batch shape (a new shape would compile again): fill
                # the last batch with copies of its first image; each image's result is its own.
                batch = torch.cat([batch, batch[:1].expand(self.batch_size - n, *batch.shape[1:])])
            sal = self.encoder.saliency_from_pixels(batch)
            grids.append(sal.grid[:n])
            tokens.append(sal.token_scores[:n])
            sources.append(sal.source[:n])
        return torch.cat(grids), torch.cat(tokens), torch.cat(sources)

    def _pixels(self, unit: PreparedUnit):
        """The unit's ok images on the encoder's device, in ok order. On the torch image path the
        JPEGs left encoded are decoded and fitted here, and a JPEG no decoder takes fails its row."""
        import torch

        enc = self.encoder
        if unit.jpegs is None:
            return torch.from_numpy(unit.pixels).to(enc.device), {}
        from stages.imaging.device import unit_images

        tower = enc.tower
        fill = tower.pad_rgb if tower is not None else CLIP_MEAN_RGB
        interpolation = tower.interpolation if tower is not None else "bicubic"
        images = unit_images(unit, enc.image_size, self.resize, fill, interpolation, enc.device)
        pixels = images.pixels
        if images.errors:
            ok = unit.ok_rows
            for i, error in images.errors.items():
                ok[i].update(status="failed", error=error, orig_size=None)
            keep = [i for i in range(len(ok)) if i not in images.errors]
            pixels = pixels[torch.tensor(keep, dtype=torch.long, device=pixels.device)]
        return pixels, dict(images.counts, failed=len(images.errors))

    def decide(self, unit: PreparedUnit) -> UnitDecisions:
        import torch

        with torch.no_grad():
            return self._decide(unit)

    def _decide(self, unit: PreparedUnit) -> UnitDecisions:
        import torch

        from stages.mixing.methods import NEEDS_SALIENCY
        from stages.mixing.masks import make_losers
        from stages.mixing.ratios import derangement, lam_hats, sample_lams

        start = time.perf_counter()
        pixels, images = self._pixels(unit)  # the unit is on the device once, for every step
        if unit.jpegs is not None:
            unit.timings["images_s"] = round(time.perf_counter() - start, 6)  # decode + fit (host time on CUDA)
        ok = unit.ok_rows
        if len(ok) == 1:  # nothing to mix with: record it instead of pairing an image with itself
            ok[0].update(status="skipped", error="no_partner: only one usable image in the unit")
            ok = []
        enc = self.encoder
        if not ok:
            return UnitDecisions(unit.unit_id, unit.rows, np.zeros((0, *enc.grid), np.uint8), np.zeros(0, np.int64),
                                 timings=unit.timings, images=images)
        keys = [r["key"] for r in ok]
        lam = sample_lams(self.lam_spec, self.seed, keys)
        partner = derangement(keys, self.seed)
        grid = tokens = source = None
        if self.method in NEEDS_SALIENCY:
            grid, tokens, source = self.saliency(pixels)
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
        if self.encode_quality is not None and unit.jpegs is not None:
            return self._encoded(unit, pixels, partner, result, masks, images, start)
        timings = dict(unit.timings, pairs_s=time.perf_counter() - start)
        losers = None if result.loser is None else result.loser.cpu().numpy()
        winners = None
        if unit.jpegs is not None:  # torch image path: the writer stores what the encoder saw
            from stages.imaging.device import to_host

            winners = to_host(pixels)
        return UnitDecisions(unit.unit_id, unit.rows, masks, partner, losers, timings, winners, images=images)

    def _encoded(self, unit, pixels, partner, result, masks, images, start) -> UnitDecisions:
        """Compose the losers on the device and JPEG-encode both images there (nvJPEG on CUDA), a
        chunk at a time; the write task then only packs the bytes."""
        import torch

        from stages.imaging.device import encode_jpegs
        from stages.mixing.masks import mix_pixels, upsample_mask

        enc = self.encoder
        partner_t = torch.from_numpy(partner).to(pixels.device)
        keep = torch.from_numpy(masks == 255).to(pixels.device)
        encoded = []
        t = time.perf_counter()
        for s in range(0, len(pixels), self.batch_size):
            winners = pixels[s : s + self.batch_size]
            if result.loser is not None:  # a blend, resized paste or blur: made by make_losers
                losers = result.loser[s : s + self.batch_size]
            else:
                losers = mix_pixels(winners, pixels[partner_t[s : s + self.batch_size]],
                                    upsample_mask(keep[s : s + self.batch_size], enc.patch))
            encoded += zip(encode_jpegs(winners, self.encode_quality), encode_jpegs(losers, self.encode_quality))
        timings = dict(unit.timings, device_encode_s=round(time.perf_counter() - t, 6),
                       pairs_s=time.perf_counter() - start)
        return UnitDecisions(unit.unit_id, unit.rows, masks, partner, None, timings, encoded=encoded, images=images)


class NegativeDecider:
    """The decisions of an image-side negative (stages.mixing.negatives), for an actor that holds no
    tower: each sample's parameters drawn from (seed, key), its loser made from its winner (`other`:
    from its partner, a derangement inside the unit as for every method), its pixel mask and lam.
    Torch-free and tower-free: a run of these methods loads no model and asks for no GPU."""

    def __init__(self, *, method: str, settings, lam_mode: str, seed: int, describe: dict):
        self.method, self.settings, self.lam_mode, self.seed = method, settings, lam_mode, seed
        self.describe = describe  # model/pretrained and config fields stamped on every ok row

    def decide(self, unit: PreparedUnit) -> UnitDecisions:
        import json

        from stages.mixing.negatives import draw, make, needs_partner, pixel_mask
        from stages.mixing.ratios import derangement, sample_rng

        start = time.perf_counter()
        ok, pixels = unit.ok_rows, unit.pixels
        if len(ok) == 1 and needs_partner(self.method):
            ok[0].update(status="skipped", error="no_partner: only one usable image in the unit")
            ok = []
        n, (h, w) = len(ok), pixels.shape[1:3]
        masks, losers = np.zeros((n, h, w), np.uint8), np.zeros((n, h, w, 3), np.uint8)
        keys = [r["key"] for r in ok]
        partner = derangement(keys, self.seed) if n > 1 else np.zeros(n, np.int64)
        for i, row in enumerate(ok):
            params = draw(self.method, sample_rng(self.seed, keys[i], self.method), h, w, self.settings)
            j = int(partner[i])
            negative = make(self.method, pixels[i], pixels[j], params)
            losers[i], masks[i] = negative.loser, pixel_mask(negative)
            # lam is the share of the winner the loser carries; lam_hat is lam in area and fixed mode alike
            row.update(self.describe, lam=negative.lam, lam_hat=negative.lam, margin=1.0 - negative.lam,
                       kept_patches=None, saliency=None, method_params=json.dumps(params, sort_keys=True),
                       **({"partner_key": keys[j], "partner_source_id": ok[j]["source_id"],
                           "partner_label": ok[j]["label"]} if needs_partner(self.method) else {}))
        timings = dict(unit.timings, pairs_s=time.perf_counter() - start)
        return UnitDecisions(unit.unit_id, unit.rows, masks, partner, losers, timings)
