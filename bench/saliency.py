"""Does the saliency find the object, and does the loser keep it? Held-out scenes with exact
object masks (stages.samples.scenes) run through the real pipeline (`generate` on local Ray)
with the trained scene tower checked in under tests/data/scene-tower/.

Measured from the output alone (the Parquet rows' `saliency`, `lam`, `kept_patches` and the
tar's `K.mask.png`), against each scene's object patches (a patch is object when at least
half of its pixels are):
- saliency AUC: per image, the probability that an object patch has a higher recovered
  saliency than a background patch (ties half); the mean over images;
- object share kept: per image, the share of its object patches the loser takes from the
  winner (mask 255); the mean over images, beside the share of all patches kept;
for every attention block, R (0, half the patches and the most the schedule allows before that
block; --merges adds others) and proportional attention on/off, for the methods whose mask
follows the encoder (mergemix, mergemix-official, mergemix-r; topk per block); every method
with a patch mask at the default block (-2) with R = L/2; lam fixed at 0.3, then lam ~ U(0, 1)
for the share by lam bin. (mixup blends every pixel: it has no patch mask.)

    python bench/saliency.py                    # 256 scenes, 58 runs: 14 minutes on a busy 2-core machine
    python bench/saliency.py --scenes 1024 --out bench/results/saliency_1024.json
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from common import ROOT, SCRATCH, print_table, save  # also puts the repository first on sys.path

from stages.samples.scenes import read_mask, write_scenes  # noqa: E402
from stages.samples.scoring import auc, kept_share, object_patches  # noqa: E402
from stages.tome.schedule import largest_merge  # noqa: E402

TOWER = ROOT / "tests" / "data" / "scene-tower"
TRAINING_SETS = (100, 101)  # the scene sets the tower was trained and evaluated on (its README)
# Methods whose mask selects patches (mixup blends every pixel: no patch mask).
SALIENCY_METHODS = ("mergemix", "mergemix-official", "mergemix-r")  # masks that follow the encoder's settings
FIXED_METHODS = ("topk", "blur", "random", "cutmix", "resizemix")  # run once (topk: once per block)
LAM = "fixed:0.3"
LAM_BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def encoder_settings(depth: int, patches: int, merges: str) -> list[tuple[int, int, bool]]:
    """(block, R, prop_attn) for every block and every R of `merges` ("0,0.5,max": shares of the
    L patches, or the largest R the schedule allows before the block) that the block allows;
    prop_attn on and off where R > 0 (it changes nothing without merging)."""
    settings = []
    for block in range(depth):
        top = largest_merge(block, patches + 1)
        wanted = {top if m == "max" else int(float(m) * patches) for m in merges.split(",")}
        for r in sorted(r for r in wanted if r <= top):
            settings += [(block, r, prop) for prop in ((False, True) if r else (False,))]
    return settings


class Truth:
    """The object patches of every held-out scene, by source id."""

    def __init__(self, root: Path, patch: int):
        self.patches = {m["id"]: object_patches(read_mask(root / m["mask"]), patch)
                        for m in json.loads((root / "scenes.json").read_text())}


def read_output(out: Path) -> list[dict]:
    """The ok rows of a generate output with their mask grids (bool, True = from the winner)."""
    masks = {}
    for tar_path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".mask.png"):
                    data = tar.extractfile(member).read()
                    masks[member.name[: -len(".mask.png")]] = np.asarray(Image.open(io.BytesIO(data))) > 127
    rows = []
    for path in sorted((out / "shards").glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            if row["status"] == "ok":
                row["mask"] = masks[row["key"]]
                rows.append(row)
    return rows


def score(rows: list[dict], truth: Truth) -> dict:
    """Mean saliency AUC, object share kept and all-patch share kept over the rows."""
    aucs, shares, kept, lams = [], [], [], []
    for row in rows:
        objects = truth.patches[row["source_id"]]
        if row["saliency"] is not None:
            a = auc(np.asarray(row["saliency"]).reshape(objects.shape), objects)
            if a is not None:
                aucs.append(a)
        shares.append(kept_share(row["mask"], objects))
        kept.append(row["kept_patches"] / objects.size)
        lams.append(row["lam"])
    result = {"images": len(rows), "object_share": _mean(shares), "kept_share": _mean(kept)}
    if aucs:
        result |= {"auc": _mean(aucs), "auc_images": len(aucs)}
    shares, kept, lams = np.array(shares, float), np.array(kept), np.array(lams)
    bins = []
    for low, high in zip(LAM_BINS, LAM_BINS[1:]):
        inside = (lams >= low) & ((lams < high) | (high == LAM_BINS[-1]))
        if inside.any():
            bins.append({"lam": [low, high], "images": int(inside.sum()), "object_share": float(shares[inside].mean()),
                         "kept_share": float(kept[inside].mean())})
    result["lam_bins"] = bins
    return result


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=256, help="held-out scenes")
    ap.add_argument("--seed", type=int, default=0, help="held-out scene set (not one the tower was trained on)")
    ap.add_argument("--merges", default="0,0.5,max",
                    help="R per block: shares of the patches, or max (e.g. 0,0.25,0.5,max)")
    ap.add_argument("--tower", default=str(TOWER), help="folder with scene-vit.json and scene-vit.pt")
    ap.add_argument("--samples-per-shard", type=int, default=128)
    ap.add_argument("--work", default=str(SCRATCH / "saliency"), help="scratch folder for the scenes and outputs")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/saliency.json)")
    args = ap.parse_args()
    if args.seed in TRAINING_SETS:
        sys.exit(f"--seed {args.seed} is a scene set the tower was trained or evaluated on; pick another")

    import ray

    from pipeline.config import GenerateConfig
    from pipeline.run import generate
    from stages.model.tower import resolve_tower

    model, weights = Path(args.tower) / "scene-vit.json", Path(args.tower) / "scene-vit.pt"
    tower = resolve_tower(str(model), str(weights))
    depth, patch, patches = tower.layers, tower.patch_size[0], tower.num_patches
    work = Path(args.work)
    scenes = write_scenes(work / f"scenes-{args.seed}-{args.scenes}", args.scenes, args.seed, size=tower.image_size[0])
    truth = Truth(scenes.parent, patch)
    # Workers import this tree's packages, whatever is installed.
    paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}})
    runs = []
    started = time.time()

    def run(method: str, block: int, merge: int, prop: bool, lam: str = LAM) -> dict:
        out = work / "out" / f"{method}-b{block}-r{merge}-p{int(prop)}-{lam.replace(':', '')}"
        cfg = GenerateConfig.build({
            "input": str(scenes), "output": str(out), "model": str(model), "pretrained": str(weights),
            "merge": merge, "attn_layer": block, "prop_attn": prop, "method": method, "lam": lam,
            "image_format": "png", "resize": "squash", "samples_per_shard": args.samples_per_shard,
            "device": "cpu", "seed": 0, "overwrite": True, "progress": False})
        t0 = time.time()
        result = generate(cfg)
        if not result.ok or result.counts.get("ok") != args.scenes:
            raise RuntimeError(f"{out}: {result.counts}, failed units {result.failed_units}")
        entry = {"method": method, "attn_layer": block, "merge": cfg.effective_merge, "prop_attn": prop, "lam": lam,
                 **score(read_output(out), truth), "seconds": round(time.time() - t0, 1)}
        runs.append(entry)
        print(f"  {method:18s} block {block} R {merge:2d} prop {int(prop)} {lam:10s} "
              f"AUC {_fmt(entry.get('auc'))}  object kept {_fmt(entry['object_share'])}  "
              f"({entry['seconds']} s)", flush=True)
        return entry

    default_block, half = depth - 2, patches // 2  # the pipeline's default block (-2); R = L/2, the paper's 50%
    settings = encoder_settings(depth, patches, args.merges)
    for block, merge, prop in settings:
        for method in SALIENCY_METHODS:
            run(method, block, merge, prop)
    for block in range(depth):
        run("topk", block, 0, False)
    for method in FIXED_METHODS[1:]:
        run(method, default_block, half, False)
    for method in SALIENCY_METHODS + FIXED_METHODS:  # lam ~ U(0, 1), for the bins
        run(method, default_block, half, False, "beta:1.0")
    negatives = {m: negative_shown(work, scenes, model, weights, m, args) for m in ("crop", "rotate")}
    ray.shutdown()

    figures = summarise(runs, depth, patches, default_block, half)
    figures["object_shown_by_image_negatives"] = negatives
    figures["saliency_check"] = label_free(scenes.parent, model, weights, runs, depth, patches, half)
    report(runs, figures, settings)
    save("saliency", {
        "settings": {"scenes": args.scenes, "seed": args.seed, "merges": args.merges, "model": _shown(model), "pretrained": _shown(weights), "patches": patches, "depth": depth,
                     "object_patch": "at least half of the patch's pixels are object",
                     "lam": LAM, "image_format": "png", "resize": "squash", "seconds": round(time.time() - started, 1)},
        "figures": figures, "runs": runs}, args.out)


def negative_shown(work: Path, scenes: Path, model: Path, weights: Path, method: str, args) -> dict:
    """The share of each scene's object its crop or rotate loser still shows (crop: the object inside
    the box; rotate: the object pixels the rotated frame keeps), and lam, averaged over the scenes."""
    import json

    from PIL import Image

    from pipeline.config import GenerateConfig
    from pipeline.run import generate

    out = work / "out" / f"{method}-negative"
    generate(GenerateConfig.build({
        "input": str(scenes), "output": str(out), "model": str(model), "pretrained": str(weights), "method": method,
        "image_format": "png", "resize": "squash", "samples_per_shard": args.samples_per_shard, "device": "cpu",
        "seed": 0, "overwrite": True, "progress": False}))
    masks = {m["id"]: read_mask(scenes.parent / m["mask"]) for m in json.loads((scenes.parent / "scenes.json").read_text())}
    shown, lams = [], []
    for row in read_output(out):
        obj, params = masks[row["source_id"]], json.loads(row["method_params"])
        if method == "crop":
            t, l, h, w = params["top"], params["left"], params["height"], params["width"]
            kept = obj[t:t + h, l:l + w].sum()
        else:  # the object mask turned as the winner was; what leaves the canvas is lost
            turned = np.asarray(Image.fromarray(obj.astype(np.uint8) * 255).rotate(params["angle"], resample=Image.BILINEAR))
            kept = (turned > 127).sum()
        shown.append(kept / max(1, obj.sum()))
        lams.append(row["lam"])
    return {"object_shown": float(np.mean(shown)), "lam": float(np.mean(lams)), "scenes": len(shown)}


def label_free(root: Path, model: Path, weights: Path, runs: list[dict], depth: int, patches: int, half: int) -> dict:
    """saliency-check (stages.model.saliency_check) on the held-out scenes, un-merged and with R = L/2,
    against the AUC per block at the same R; and on random weights of the same tower, which it must flag."""
    import json

    from PIL import Image

    from stages.model.factory import load_encoder
    from stages.model.saliency_check import check_tower

    names = [m["image"] for m in json.loads((root / "scenes.json").read_text())]
    pixels = np.stack([np.asarray(Image.open(root / name).convert("RGB")) for name in names])
    found = {}
    for merge in (0, half):
        result = check_tower(load_encoder(str(model), str(weights), merge=0), pixels, merge=merge)
        auc = {b.layer: find(runs, method="mergemix", attn_layer=b.layer, merge=b.merge, prop_attn=False)["auc"]
               for b in result.layers}
        by_check = sorted(auc, key=lambda b: -next(x.gap for x in result.layers if x.layer == b))
        best = max(auc.values())
        found[f"R={merge}"] = {
            "blocks": [{"layer": b.layer, "merge": b.merge, "score": b.score, "random": b.random, "auc": auc[b.layer]}
                       for b in result.layers],
            "recommended": result.recommended, "auc_of_recommended": auc[result.recommended], "best_auc": best,
            "recommended_within_0.03_auc_of_best": best - auc[result.recommended] <= 0.03,
            "ranks_the_worst_block_last": by_check[-1] == min(auc, key=auc.get),
        }
    random_tower = check_tower(load_encoder(str(model), "none", merge=0), pixels, merge=0)
    found["random_weights"] = {"no_better_than_random": random_tower.no_better_than_random,
                               "best_gap": max(b.gap for b in random_tower.layers)}
    return found


def find(runs: list[dict], lam: str = LAM, **keys) -> dict:
    return next(r for r in runs if r["lam"] == lam and all(r[k] == v for k, v in keys.items()))


def summarise(runs: list[dict], depth: int, patches: int, default_block: int, half: int) -> dict:
    """The figures the goals are stated in."""
    auc_by_block = {b: find(runs, method="mergemix", attn_layer=b, merge=0)["auc"] for b in range(depth)}
    best = max(auc_by_block, key=auc_by_block.get)
    cost = {}
    for b in range(1, depth):  # block 0 cannot merge
        if half <= largest_merge(b, patches + 1):
            for prop in (False, True):
                merged = find(runs, method="mergemix", attn_layer=b, merge=half, prop_attn=prop)["auc"]
                cost[f"block {b}, prop_attn {'on' if prop else 'off'}"] = auc_by_block[b] - merged
    shares = {m: find(runs, method=m, attn_layer=default_block, merge=half, prop_attn=False)["object_share"]
              for m in SALIENCY_METHODS}
    shares["topk"] = find(runs, method="topk", attn_layer=default_block)["object_share"]
    shares |= {m: find(runs, method=m)["object_share"] for m in FIXED_METHODS[1:]}
    ratio = shares["mergemix"] / shares["random"]
    best_r = half if 0 < best and half <= largest_merge(best, patches + 1) else 0
    ratio_best = find(runs, method="mergemix", attn_layer=best, merge=best_r, prop_attn=False)["object_share"] / shares["random"]
    return {
        "auc_by_block_unmerged": auc_by_block,
        "best_block": best,
        "auc_default_block": {"block": default_block, "unmerged": auc_by_block[default_block],
                              "merged_half": find(runs, method="mergemix", attn_layer=default_block, merge=half,
                                                  prop_attn=False)["auc"]},
        "auc_cost_of_merging_half": cost,
        "object_share_at_lam_0.3": shares,
        "object_share_settings": f"block {default_block}, R {half}, prop_attn off (topk: block {default_block}, un-merged)",
        "mergemix_over_random_at_lam_0.3": ratio,
        f"mergemix_over_random_at_lam_0.3_best_block_R{best_r}": ratio_best,
        "goals": {
            "saliency AUC >= 0.75 at the best block": auc_by_block[best] >= 0.75,
            "saliency AUC >= 0.75 at the default block (-2)": auc_by_block[default_block] >= 0.75,
            "mergemix keeps >= 2x random's object patches at lam 0.3": ratio >= 2,
            "merging half the tokens costs <= 0.02 AUC at the default block": cost[f"block {default_block}, prop_attn off"] <= 0.02,
        },
    }


def report(runs: list[dict], figures: dict, settings) -> None:
    rows = []
    for block, merge, prop in settings:
        entry = {m: find(runs, method=m, attn_layer=block, merge=merge, prop_attn=prop) for m in SALIENCY_METHODS}
        rows.append([block, merge, "on" if prop else "off", entry["mergemix"]["auc"],
                     *(entry[m]["object_share"] for m in SALIENCY_METHODS)])
    print_table(f"Saliency AUC and object share kept at lam {LAM.split(':')[1]}, by block, R, prop_attn",
                ["block", "R", "prop", "AUC", *SALIENCY_METHODS], rows)
    rows = [[r["method"], r["attn_layer"], r["merge"], r["object_share"], r["kept_share"]]
            for r in runs if r["lam"] == LAM and r["method"] in FIXED_METHODS]
    print_table(f"Object share kept at lam {LAM.split(':')[1]} (random, cutmix, resizemix use no saliency; "
                "cutmix, resizemix: their boxes set the area)",
                ["method", "block", "R", "object", "all patches"], rows)
    rows = [[r["method"], *(_bin(r, low) for low in LAM_BINS[:-1])] for r in runs if r["lam"] != LAM]
    print_table("Object share kept by lam bin (lam ~ U(0, 1); object / all patches)",
                ["method", *(f"[{a:.1f},{b:.1f})" for a, b in zip(LAM_BINS, LAM_BINS[1:]))], rows)
    print("\n" + json.dumps(figures, indent=1))


def _bin(run: dict, low: float) -> str:
    b = next((b for b in run["lam_bins"] if b["lam"][0] == low), None)
    return "-" if b is None else f"{b['object_share']:.2f} / {b['kept_share']:.2f}"


def _shown(path: Path) -> str:
    """A path relative to the repository where it lies inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _fmt(value) -> str:
    return "  -  " if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
