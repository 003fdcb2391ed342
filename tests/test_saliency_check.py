"""Saliency you can trust, through the command line: `sample-data scenes` writes scenes whose masks
match what was drawn; `saliency-check` ranks the trained scene tower's blocks as their AUC against
the object masks does and flags random weights; `generate --attn-layer auto` records the block it
chose, and a resume keeps it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from stages.model.factory import load_encoder
from stages.samples.scenes import read_mask
from stages.samples.scoring import auc, object_patches
from tests.conftest import local_ray

TOWER = Path(__file__).parent / "data" / "scene-tower"
CONFIG, WEIGHTS = str(TOWER / "scene-vit.json"), str(TOWER / "scene-vit.pt")
pytestmark = pytest.mark.timeout(600)


def cli(*args) -> str:
    proc = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert proc.exit_code == 0, proc.output[-3000:]
    return proc.output


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes") / "held-out"
    cli("sample-data", "scenes", root, "--n", "64", "--seed", "3")
    return root


def test_scenes_through_the_cli_in_both_layouts(scenes, tmp_path):
    meta = json.loads((scenes / "scenes.json").read_text())
    assert len(meta) == 64 and len(json.loads((scenes / "llava.json").read_text())) == 64
    for m in meta[:8]:  # the mask is the drawn shape: its pixels carry the shape's colour, the rest do not
        img = np.asarray(Image.open(scenes / m["image"]).convert("RGB")).astype(int)
        mask = read_mask(scenes / m["mask"])
        inside, outside = img[mask].mean(0), img[~mask].mean(0)
        assert np.abs(inside - outside).max() > 40 and 0 < mask.mean() < 0.5
    said = cli("sample-data", "scenes", tmp_path / "folder", "--n", "12", "--layout", "folder")
    assert "--folder-labels" in said
    classes = [p.name for p in (tmp_path / "folder" / "images").iterdir() if p.is_dir()]
    assert classes and all("_" in c for c in classes)


def block_aucs(scenes: Path) -> dict[int, float]:
    """Mean AUC of each block's saliency (un-merged) against the object patches."""
    meta = json.loads((scenes / "scenes.json").read_text())
    pixels = np.stack([np.asarray(Image.open(scenes / m["image"]).convert("RGB")) for m in meta])
    truth = [object_patches(read_mask(scenes / m["mask"]), 14).ravel() for m in meta]
    found = {}
    for layer in range(4):
        grid = load_encoder(CONFIG, WEIGHTS, merge=0, attn_layer=layer).saliency_from_pixels(pixels).grid.flatten(1)
        found[layer] = float(np.mean([auc(g.numpy(), t) for g, t in zip(grid, truth)]))
    return found


def test_saliency_check_ranks_blocks_as_their_auc_does_and_flags_random_weights(scenes, tmp_path):
    out = tmp_path / "check.json"
    said = cli("saliency-check", "--input", scenes / "llava.json", "--model", CONFIG, "--pretrained", WEIGHTS,
               "--merge", "0", "--n", "64", "--json", out)
    result = json.loads(out.read_text())
    assert set(result) >= {"layers", "recommended", "no_better_than_random"} and not result["no_better_than_random"]
    assert [b["layer"] for b in result["layers"]] == [0, 1, 2, 3]
    aucs = block_aucs(scenes)
    gaps = {b["layer"]: b["score"] - b["random"] for b in result["layers"]}
    assert max(aucs.values()) - aucs[result["recommended"]] <= 0.03, (aucs, gaps)
    assert min(gaps, key=gaps.get) == min(aucs, key=aucs.get), (aucs, gaps)  # the worst block ranked last
    assert f"recommended block: {result['recommended']}" in said
    random = tmp_path / "random.json"
    said = cli("saliency-check", "--input", scenes / "llava.json", "--model", CONFIG, "--pretrained", "none",
               "--merge", "0", "--n", "32", "--json", random)
    assert json.loads(random.read_text())["no_better_than_random"] and "no better than random" in said


def test_saliency_check_bad_input_is_one_line(scenes, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps([{"id": "t", "conversations": [{"from": "human", "value": "hi"}]}]))
    for args, words in ((["--input", empty, "--model", CONFIG, "--pretrained", WEIGHTS], "no image"),
                        (["--input", scenes / "llava.json", "--model", "ViT-B-16-SigLIP", "--pretrained", "none"],
                         "cannot give MergeMix saliency")):
        proc = CliRunner().invoke(app, ["saliency-check", *map(str, args)])
        assert proc.exit_code == 2 and words in proc.output, proc.output
        assert "Traceback" not in proc.output and len(proc.output.strip().splitlines()) <= 2


@pytest.fixture(scope="module")
def ray_cluster():
    yield from local_ray()


def test_attn_layer_auto_records_its_choice_and_a_resume_keeps_it(ray_cluster, scenes, tmp_path):
    out = tmp_path / "out"
    args = ["generate", "--input", scenes / "llava.json", "--output", out, "--model", CONFIG, "--pretrained", WEIGHTS,
            "--merge", "16", "--attn-layer", "auto", "--samples-per-shard", "16", "--image-format", "png",
            "--no-progress", "--resize", "squash"]
    said = cli(*args)
    run = json.loads((out / "run.json").read_text())
    chosen = run["config"]["attn_layer"]
    assert run["attn_layer_auto"] is True and isinstance(chosen, int) and f"attn-layer auto: block {chosen}" in said
    rows = pq.read_table(out / "shards" / "000000.parquet").to_pylist()
    assert {r["attn_layer"] for r in rows if r["status"] == "ok"} == {chosen}
    (out / "shards" / "000002_stats.json").unlink()  # uncommit a unit; the resume must not choose again
    (out / "run.json").unlink()
    said = cli(*args)
    assert f"attn-layer auto: block {chosen}, as the committed units" in said and "1 written" in said
    assert {r["attn_layer"] for r in pq.read_table(out / "shards" / "000002.parquet").to_pylist()} == {chosen}
