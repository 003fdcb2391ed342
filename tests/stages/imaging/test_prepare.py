"""The prepare task's unit (stages.imaging.prepare): one row per input, in order, ok rows carrying the
exact pixels the encoder will see; a bad input costs its row, never the unit."""
from __future__ import annotations


import numpy as np
from PIL import Image

from stages.imaging.decode import load_pixels
from stages.imaging.prepare import prepare_unit
from stages.inputs.records import InputRecord
from tests.conftest import make_image


def test_rows_in_order_with_statuses_and_exact_pixels(tmp_path):
    for i in range(2):
        Image.fromarray(make_image(i, (40, 30))).save(tmp_path / f"{i}.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    records = [
        InputRecord("a", ("file", "0.png"), prompt="q?", answer="x"),
        InputRecord("b", None, prompt="text only"),
        InputRecord("c", ("file", "bad.jpg")),
        InputRecord("d", None, error="malformed_row: entry 3 is int, not an object"),
        InputRecord("e", ("file", "1.png")),
    ]
    unit = prepare_unit(7, 100, records, (32, 32), "pad", str(tmp_path), fill=(1, 2, 3))
    assert [r["key"] for r in unit.rows] == [f"000007_{i:06d}" for i in range(5)]
    assert [r["input_index"] for r in unit.rows] == [100, 101, 102, 103, 104]
    assert [r["status"] for r in unit.rows] == ["ok", "skipped", "failed", "failed", "ok"]
    assert unit.rows[1]["error"].startswith("no_image") and unit.rows[2]["error"].startswith("not_an_image")
    assert unit.rows[3]["error"].startswith("malformed_row") and unit.rows[0]["prompt"] == "q?"
    assert unit.pixels.shape == (2, 32, 32, 3) and [r["key"] for r in unit.ok_rows] == ["000007_000000", "000007_000004"]
    expected, _ = load_pixels((tmp_path / "1.png").read_bytes(), (32, 32), "pad", fill=(1, 2, 3))
    assert np.array_equal(unit.pixels[1], expected) and unit.rows[4]["orig_size"] == [30, 40]
