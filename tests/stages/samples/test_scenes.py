"""Synthetic scenes with ground truth (stages.samples.scenes) and the patch-level scoring
against their masks (stages.samples.scoring)."""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
from PIL import Image

from stages.inputs.kinds import list_input
from stages.inputs.kinds import read_slice
from stages.samples.scenes import CLASSES, COLOURS, NOISE, conversations, read_mask, scene, write_scenes
from stages.samples.scoring import auc, kept_share, object_patches

SCENES = [scene(3, i) for i in range(60)]


def colour_distance(image: np.ndarray, colour) -> np.ndarray:
    """Largest per-channel difference of every pixel from `colour`."""
    return np.abs(image.astype(np.int16) - np.array(colour, np.int16)).max(axis=-1)


@pytest.mark.parametrize("i", range(len(SCENES)))
def test_mask_is_exactly_the_pixels_of_the_object_colour(i):
    """Everything but the object is grey, and the object is its colour plus at most NOISE, so
    the object can be found by colour alone: that must give the mask, pixel for pixel."""
    s = SCENES[i]
    found = colour_distance(s.image, COLOURS[s.colour]) <= 3 * NOISE
    assert (found == s.mask).all(), f"{(found != s.mask).sum()} pixels differ"
    assert colour_distance(s.image, COLOURS[s.colour])[s.mask].max() <= NOISE


def test_clutter_free_render_draws_the_object_on_the_mask_only():
    for i, s in enumerate(SCENES[:20]):
        clean = scene(3, i, clutter=False)
        assert (clean.mask == s.mask).all() and clean.label == s.label
        assert (clean.image[s.mask] == COLOURS[s.colour]).all()
        assert (clean.image[~s.mask] == 0).all()


def test_mask_has_the_shape_s_geometry():
    """Area and extent of each shape within its bbox: a square fills it, a circle covers
    pi/4 of it, a triangle half (the rasteriser's edges allow a few percent)."""
    fill = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}
    for s in SCENES:
        x0, y0, x1, y1 = s.bbox
        ys, xs = np.nonzero(s.mask)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
        assert x1 - x0 == y1 - y0  # all three shapes span a square box
        share = s.mask.sum() / ((x1 - x0) * (y1 - y0))
        assert share == pytest.approx(fill[s.shape], rel=0.08), (s.shape, share)
        if s.shape == "square":
            assert share == 1.0
        if s.shape == "triangle":  # apex on top: the top row is narrow, the bottom row full
            assert s.mask[y0, x0:x1].sum() <= 3 and s.mask[y1 - 1, x0:x1].all()


def test_every_class_appears_and_the_background_is_grey_clutter_with_noise():
    labels = {scene(4, i).label for i in range(200)}
    assert labels == set(CLASSES) and len(CLASSES) == 12
    for s in SCENES[:20]:
        background = s.image[~s.mask].astype(np.int16)
        spread = background.max(axis=1) - background.min(axis=1)
        assert spread.max() <= 2 * NOISE  # achromatic up to the per-channel noise
        assert background.std() > 10  # not flat: texture and marks
        patches = s.image.reshape(8, 14, 8, 14, 3).transpose(0, 2, 1, 3, 4).reshape(64, -1)
        assert len(np.unique(patches, axis=0)) == 64  # no two patches alike, even inside the object


def test_conversations_ask_about_colour_shape_and_position():
    s = SCENES[0]
    turns = conversations(s)
    assert [t["from"] for t in turns] == ["human", "gpt"] * 3
    assert turns[0]["value"].startswith("<image>\n") and "<image>" not in "".join(t["value"] for t in turns[1:])
    assert s.colour in turns[1]["value"] and s.shape in turns[3]["value"] and s.position in turns[5]["value"]


def test_position_is_the_3x3_cell_of_the_bbox_centre():
    seen = set()
    for i in range(300):
        s = scene(5, i)
        cx, cy = (s.bbox[0] + s.bbox[2]) / 2, (s.bbox[1] + s.bbox[3]) / 2
        row, col = ("top", "middle", "bottom")[int(cy * 3 // 112)], ("left", "centre", "right")[int(cx * 3 // 112)]
        want = "centre" if (row, col) == ("middle", "centre") else f"{row} {col}"
        assert s.position == want
        seen.add(s.position)
    assert len(seen) == 9


def digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_from_the_seed_and_independent_of_n(tmp_path):
    write_scenes(tmp_path / "a", 6, seed=9)
    write_scenes(tmp_path / "b", 6, seed=9)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    write_scenes(tmp_path / "c", 3, seed=9)
    assert {k: v for k, v in digest(tmp_path / "a").items() if k.startswith("images")} \
        .items() >= {k: v for k, v in digest(tmp_path / "c").items() if k.startswith("images")}.items()
    other = scene(10, 0)
    assert not np.array_equal(other.image, scene(9, 0).image)
    assert scene(9, 4, size=84).image.shape == (84, 84, 3)


def test_llava_layout_reads_through_the_pipeline_listing(tmp_path):
    path = write_scenes(tmp_path, 10, seed=2)
    assert path == tmp_path / "llava.json"
    meta = json.loads((tmp_path / "scenes.json").read_text())
    lst = list_input(str(path), 4)
    records = [r for s in lst.slices for r in read_slice(s)]
    assert lst.kind == "llava" and lst.count == 10
    assert [r.source_id for r in records] == [m["id"] for m in meta]
    for record, m in zip(records, meta):
        assert record.image == ("file", m["image"]) and record.error is None
        assert f"It is {m['colour']}." == record.answer
        s = scene(2, m["index"])
        assert (np.asarray(Image.open(tmp_path / m["image"])) == s.image).all()  # lossless
        assert (read_mask(tmp_path / m["mask"]) == s.mask).all()
        assert m["label"] == s.label and m["bbox"] == list(s.bbox) and m["position"] == s.position


def test_folder_layout_gives_class_subfolders_as_labels(tmp_path):
    path = write_scenes(tmp_path, 12, seed=2, layout="folder")
    assert path == tmp_path / "images"
    meta = {m["image"]: m for m in json.loads((tmp_path / "scenes.json").read_text())}
    lst = list_input(str(path), 5, folder_labels=True)
    records = [r for s in lst.slices for r in read_slice(s)]
    assert lst.kind == "folder" and lst.count == 12  # the masks lie outside the image folder
    for record in records:
        m = meta[f"images/{record.source_id}"]
        assert record.label == m["label"].replace(" ", "_")
        assert (np.asarray(Image.open(path / record.source_id)) == scene(2, m["index"]).image).all()
    with pytest.raises(ValueError, match="layout"):
        write_scenes(tmp_path, 1, seed=2, layout="coco")


# --- scoring ---------------------------------------------------------------------------------


def test_object_patches_take_patches_at_least_half_covered():
    mask = np.zeros((4, 6), bool)
    mask[0:2, 0:1] = True  # half of patch (0, 0): object
    mask[2, 2] = True  # a quarter of patch (1, 1): background
    mask[:, 4:] = True  # patch (0, 2) and (1, 2) whole
    assert object_patches(mask, 2).tolist() == [[True, False, True], [False, False, True]]
    with pytest.raises(ValueError):
        object_patches(mask, 4)


def test_auc_and_kept_share():
    labels = np.array([1, 1, 0, 0, 0], bool)
    assert auc(np.array([5, 4, 3, 2, 1]), labels) == 1.0
    assert auc(np.array([1, 2, 3, 4, 5]), labels) == 0.0
    assert auc(np.ones(5), labels) == 0.5
    assert auc(np.array([3, 1, 2, 0, 0]), labels) == pytest.approx(5 / 6)  # 3 beats all three, 1 beats two
    assert auc(np.array([3, 0, 2, 0, 1]), labels) == pytest.approx(3.5 / 6)  # 3 beats all three; 0 ties with a 0: half a pair
    assert auc(np.ones(3), np.zeros(3, bool)) is None
    assert kept_share(np.array([1, 0, 1, 0, 0], bool), labels) == 0.5
    assert kept_share(np.ones(5, bool), np.zeros(5, bool)) is None
