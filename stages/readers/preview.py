"""A contact sheet PNG of the first pairs of an output: winner, loser, mask overlay,
saliency heat map (when stored), and the key and ratios written beside them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from schemas.shard import IMAGE_NEGATIVES
from stages.imaging.compose import upsample
from stages.errors import UserError
from stages.readers.shards import iter_tar_samples, output_store, read_sample, resolve_shards

TILE_H = 160  # every image is scaled to this height
PAD = 6
TEXT_W = 250
BG = (24, 24, 24)
FG = (235, 235, 235)
PARTNER_TINT = np.array([230, 40, 40], np.float32)  # red: pixels taken from the partner


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _heat(values: np.ndarray) -> np.ndarray:
    """Saliency (any range) -> RGB uint8 with a blue-cyan-yellow-red ramp."""
    v = values.astype(np.float32)
    span = float(v.max() - v.min())
    v = (v - v.min()) / span if span > 0 else np.zeros_like(v)
    stops = np.array([[20, 30, 140], [0, 200, 220], [250, 230, 40], [220, 30, 20]], np.float32)
    pos = v * (len(stops) - 1)
    i = np.clip(pos.astype(int), 0, len(stops) - 2)
    t = (pos - i)[..., None]
    return (stops[i] * (1 - t) + stops[i + 1] * t).astype(np.uint8)


def mask_overlay(loser: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The loser with the partner's patches tinted red (mask 0) and outlined in white on the
    partner side (a tint alone is lost on red images); the winner's patches stay as they are.
    A blend mask (mixup: the winner's weight on every patch) tints by the partner's share."""
    weight = upsample(mask, *loser.shape[:2])
    m = weight == 255
    out = loser.astype(np.float32)
    out[~m] = 0.45 * out[~m] + 0.55 * PARTNER_TINT
    blend = (weight > 0) & ~m
    if blend.any():  # mixup: the tint follows the partner's share (1 - weight) of each patch
        share = 0.55 * (1.0 - weight[blend].astype(np.float32) / 255.0)[:, None]
        out[blend] = (1.0 - share) * loser[blend] + share * PARTNER_TINT
    edge = np.zeros_like(m)
    edge[1:] |= m[:-1]
    edge[:-1] |= m[1:]
    edge[:, 1:] |= m[:, :-1]
    edge[:, :-1] |= m[:, 1:]
    out[edge & ~m] = 255
    return out.astype(np.uint8)


def saliency_overlay(winner: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    heat = upsample(_heat(saliency), *winner.shape[:2])
    return (0.4 * winner.astype(np.float32) + 0.6 * heat).astype(np.uint8)


def _tile(pixels: np.ndarray) -> Image.Image:
    img = Image.fromarray(pixels)
    w = max(1, round(img.width * TILE_H / img.height))
    # Nearest when enlarging so small images show their real pixels; Lanczos when shrinking.
    resample = Image.Resampling.NEAREST if img.height < TILE_H else Image.Resampling.LANCZOS
    return img.resize((w, TILE_H), resample)


def _first_pairs(out_dir, n: int, storage_options: dict | None) -> list[dict]:
    pairs = []
    for ref in resolve_shards(out_dir, storage_options):
        for key, parts in iter_tar_samples(ref):
            rec, winner, loser, mask = read_sample(parts, f"{ref.where}: sample {key}")
            pairs.append({"rec": rec, "winner": winner, "loser": loser, "mask": mask})
            if len(pairs) == n:
                return pairs
    return pairs


def make_contact_sheet(out_dir, n: int, path: Path, storage_options: dict | None = None) -> Path:
    """Write a PNG with one row per pair (the first `n` ok pairs in shard order) and return its path."""
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    output_store(out_dir, storage_options)
    pairs = _first_pairs(out_dir, n, storage_options)
    if not pairs:
        raise UserError(f"{out_dir} has no ok pairs to show")
    show_sal = any(p["rec"].get("saliency") for p in pairs)
    titles = ["winner", "loser", "mask (red = not the winner's)"] + (["saliency"] if show_sal else [])

    rows = []
    for p in pairs:
        rec = p["rec"]
        # crop's mask is the box on the winner (what the loser shows of it); every other mask is on the loser.
        under = p["winner"] if rec.get("method") == "crop" else p["loser"]
        tiles = [p["winner"], p["loser"], mask_overlay(under, p["mask"])]
        if show_sal:
            sal = rec.get("saliency")
            gh, gw = p["mask"].shape
            tiles.append(saliency_overlay(p["winner"], np.asarray(sal, np.float32).reshape(gh, gw))
                         if sal and len(sal) == gh * gw else np.zeros_like(p["winner"]))
        rows.append((rec, [_tile(t) for t in tiles]))

    col_w = [max(r[1][c].width for r in rows) for c in range(len(titles))]
    head_h = 22
    width = PAD + sum(w + PAD for w in col_w) + TEXT_W
    height = head_h + len(rows) * (TILE_H + PAD) + PAD
    sheet = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(sheet)
    font, small = _font(14), _font(13)
    x = PAD
    for title, w in zip(titles, col_w):
        draw.text((x, 4), title, fill=FG, font=font)
        x += w + PAD
    for i, (rec, tiles) in enumerate(rows):
        y = head_h + i * (TILE_H + PAD)
        x = PAD
        for tile, w in zip(tiles, col_w):
            sheet.paste(tile, (x, y))
            x += w + PAD
        info = [
            rec.get("key", "?"),
            f"lam      {rec.get('lam', float('nan')):.3f}",
            f"lam_hat  {rec.get('lam_hat', float('nan')):.3f}",
            f"margin   {rec.get('margin', float('nan')):.3f}",
            f"{rec.get('method')} / {rec.get('lam_mode')}",
            _partner_or_params(rec),
        ]
        if rec.get("label") is not None:
            info.append(f"label    {rec.get('label')} / {rec.get('partner_label')}")
        for j, line in enumerate(info):
            draw.text((x, y + 2 + j * 18), line, fill=FG, font=font if j == 0 else small)
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise UserError(f"folder {path.parent} does not exist: create it or choose another -o path")
    sheet.save(path, format="PNG")
    return path


def _partner_or_params(rec: dict) -> str:
    """The partner's key; for an image-side negative without one, its drawn parameters (method_params)."""
    if rec.get("method") in IMAGE_NEGATIVES and rec.get("partner_key") is None:
        import json

        params = json.loads(rec.get("method_params") or "{}")
        text = " ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items()
                        if v not in (None, False))  # flags that did not fire say nothing
        return text if len(text) <= 34 else text[:33] + "…"
    return f"partner  {rec.get('partner_key')}"
