"""Contact sheet: layout, real pixels in the tiles, saliency column, CLI errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.errors import UserError
from stages.readers.preview import PAD, TEXT_W, TILE_H, make_contact_sheet, mask_overlay
from stages.output.writer import write_unit
from tests.shard_fixtures import H, PATCH, W, make_output, unit_rows

CLI = str(Path(sys.executable).with_name("mergemix-pipeline"))
TILE_W = W * TILE_H // H  # tiles keep the aspect ratio
HEAD_H = 22


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return make_output(tmp_path_factory.mktemp("out"), units=(0, 1), image_format="png")


def _tile_at(sheet: np.ndarray, row: int, col: int) -> np.ndarray:
    y, x = HEAD_H + row * (TILE_H + PAD), PAD + col * (TILE_W + PAD)
    return sheet[y : y + TILE_H, x : x + TILE_W]


def test_sheet_has_one_row_per_pair_with_the_real_pixels(out, tmp_path):
    path = make_contact_sheet(out, 5, tmp_path / "sheet.png")
    sheet = np.asarray(Image.open(path).convert("RGB"))
    assert sheet.shape == (HEAD_H + 5 * (TILE_H + PAD) + PAD, PAD + 4 * (TILE_W + PAD) + TEXT_W, 3)
    _, images = unit_rows(0, 6, failed=(2,), skipped=(4,))
    shown = ["000000_000000", "000000_000001", "000000_000003", "000000_000005", None]  # ok pairs, in order
    scale = TILE_H // H  # nearest-neighbour enlargement: every source pixel is a scale x scale block
    for r, key in enumerate(shown[:4]):
        pair = images[key]
        np.testing.assert_array_equal(_tile_at(sheet, r, 0)[::scale, ::scale], pair.winner)
        np.testing.assert_array_equal(_tile_at(sheet, r, 1)[::scale, ::scale], pair.loser)
        np.testing.assert_array_equal(_tile_at(sheet, r, 2)[::scale, ::scale], mask_overlay(pair.loser, pair.mask))
        assert _tile_at(sheet, r, 3).std() > 0  # the saliency heat map is drawn
    text = sheet[HEAD_H : HEAD_H + TILE_H, -TEXT_W:]
    assert (text > 200).any()  # the key and ratios are written in the text panel


def test_mask_overlay_tints_only_partner_patches():
    _, images = unit_rows(0, 2)
    pair = next(iter(images.values()))
    over = mask_overlay(pair.loser, pair.mask)
    from_winner = np.kron(pair.mask == 255, np.ones((PATCH, PATCH), bool))
    np.testing.assert_array_equal(over[from_winner], pair.loser[from_winner])
    assert not np.array_equal(over[~from_winner], pair.loser[~from_winner])


def test_no_saliency_column_when_none_is_stored(tmp_path):
    rows, images = unit_rows(0, 3)
    for row in rows:
        row["saliency"] = None
    write_unit(tmp_path, 0, rows, images, image_format="png", fingerprint="fp")
    sheet = Image.open(make_contact_sheet(tmp_path, 2, tmp_path / "s.png"))
    assert sheet.size == (PAD + 3 * (TILE_W + PAD) + TEXT_W, HEAD_H + 2 * (TILE_H + PAD) + PAD)


def test_bad_requests_raise_user_errors(out, tmp_path):
    with pytest.raises(UserError, match="at least 1"):
        make_contact_sheet(out, 0, tmp_path / "x.png")
    with pytest.raises(UserError, match="does not exist"):
        make_contact_sheet(tmp_path / "missing", 4, tmp_path / "x.png")
    with pytest.raises(UserError, match="folder"):
        make_contact_sheet(out, 2, tmp_path / "no" / "such" / "x.png")
    rows, _ = unit_rows(0, 2, failed=(0, 1))
    write_unit(tmp_path / "allfailed", 0, rows, {}, fingerprint="fp")
    with pytest.raises(UserError, match="no ok pairs"):
        make_contact_sheet(tmp_path / "allfailed", 2, tmp_path / "x.png")


def test_cli_preview(out, tmp_path):
    r = subprocess.run([CLI, "preview", str(out), "--n", "16", "-o", str(tmp_path / "p.png")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "p.png").size[1] == HEAD_H + 8 * (TILE_H + PAD) + PAD  # only 8 ok pairs exist
    r = subprocess.run([CLI, "preview", str(tmp_path / "nope"), "-o", str(tmp_path / "q.png")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert not (tmp_path / "q.png").exists()
