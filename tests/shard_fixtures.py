"""Build real shard outputs from synthetic pixels (no encoder needed), for the shard tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from schemas.shard import empty_row, sample_key
from stages.imaging.compose import PairImages
from stages.output.runfiles import write_run_files
from stages.output.writer import write_unit

H, W, PATCH = 32, 48, 8  # image size and patch size -> grid 4 x 6
GRID = (H // PATCH, W // PATCH)


def synthetic_pair(seed: int) -> tuple[PairImages, np.ndarray]:
    """A winner with structure, a partner, a mask keeping the most salient of a seeded number of
    patches, the mixed loser; and the saliency map."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    winner = np.stack([xx * 5 % 256, yy * 7 % 256, np.full_like(xx, rng.integers(0, 256))], -1).astype(np.uint8)
    winner = np.clip(winner.astype(int) + rng.integers(0, 30, winner.shape), 0, 255).astype(np.uint8)
    partner = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    saliency = rng.random(GRID).astype(np.float32)
    n = GRID[0] * GRID[1]
    kept = int(rng.integers(1, n))
    order = np.argsort(-saliency.reshape(-1), kind="stable")
    mask = np.zeros(n, np.uint8)
    mask[order[:kept]] = 255
    mask = mask.reshape(GRID)
    m = np.kron(mask // 255, np.ones((PATCH, PATCH), np.uint8))[..., None]
    loser = (winner * m + partner * (1 - m)).astype(np.uint8)
    return PairImages(winner, loser, mask), saliency


def unit_rows(unit_id: int, n: int, failed: tuple[int, ...] = (), skipped: tuple[int, ...] = (), seed: int = 0):
    """Rows and images for one unit of n inputs; positions in `failed`/`skipped` get no images."""
    rows, images = [], {}
    keys = [sample_key(unit_id, i) for i in range(n)]
    for i, key in enumerate(keys):
        common = dict(key=key, source_id=f"img/{unit_id}/{i}.jpg", unit=unit_id, index=i, seed=seed,
                      input_index=unit_id * 1000 + i, prompt=f"What is in picture {i}?", answer=f"Thing {i}.",
                      conversations=json.dumps([{"from": "human", "value": f"<image>\nWhat is in picture {i}?"},
                                                {"from": "gpt", "value": f"Thing {i}."}]),
                      label=f"class{i % 3}")
        if i in failed:
            rows.append(empty_row(status="failed", error="decode: cannot identify image file", **common))
            continue
        if i in skipped:
            rows.append(empty_row(status="skipped", error="filter: no image", **common))
            continue
        pair, saliency = synthetic_pair(seed * 100_000 + unit_id * 1000 + i)
        kept = int((pair.mask == 255).sum())
        lam_hat = kept / (GRID[0] * GRID[1])
        partner = keys[(i + 1) % n]
        rows.append(empty_row(
            status="ok", partner_key=partner, partner_source_id=f"img/{unit_id}/{(i + 1) % n}.jpg",
            lam=round(0.05 + 0.9 * ((i * 37) % 100) / 100, 4), lam_hat=lam_hat, margin=1 - lam_hat,
            method="mergemix", lam_mode="area", orig_size=[H * 2, W * 2], resize_mode="pad",
            model="mm-tiny-vit", pretrained="", merge_total=16, merge_schedule=[8, 8, 0, 0], attn_layer=2,
            prop_attn=False, partner_label=f"class{((i + 1) % n) % 3}", image_size=[H, W], grid=list(GRID),
            kept_patches=kept, saliency=saliency.reshape(-1).tolist(), **common))
        images[key] = pair
    return rows, images


def make_output(out: Path, units=(0, 1), n: int = 6, image_format: str = "png", failed=(2,), skipped=(4,),
                run_files: bool = True) -> Path:
    """A complete output directory: committed units plus run.json and index.json."""
    for u in units:
        rows, images = unit_rows(u, n, failed=failed, skipped=skipped)
        write_unit(out, u, rows, images, image_format=image_format, fingerprint="fp-test")
    if run_files:
        write_run_files(out, {"config": {"model": "mm-tiny-vit", "method": "mergemix", "image_format": image_format},
                              "fingerprint": "fp-test"})
    return out
