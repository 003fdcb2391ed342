"""`inspect --plot`: the PNG holds the stated panels, and each panel shows the output's own numbers."""
from __future__ import annotations

import glob
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from stages.errors import UserError
from stages.readers.plot import collect, figure, plot_output
from stages.storage import open_store
from stages.output.writer import write_unit
from tests.shard_fixtures import make_output, unit_rows

pytest.importorskip("matplotlib", reason="matplotlib is in the test extra")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return make_output(tmp_path_factory.mktemp("out") / "out", units=(0, 1, 2), image_format="png")


def rows(out) -> list[dict]:
    return [r for p in sorted(glob.glob(f"{out}/shards/*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_every_panel_shows_the_outputs_numbers(out):
    fig = figure(collect(open_store(out)), "out")
    hist_lam, hist_hat, hist_margin, failures, kept, saliency, colorbar = fig.axes
    ok = [r for r in rows(out) if r["status"] == "ok"]
    for ax, name in ((hist_lam, "lam"), (hist_hat, "lam_hat"), (hist_margin, "margin")):
        values = np.array([r[name] for r in ok])
        expected, _ = np.histogram(values, bins=20, range=(0, 1))
        assert [p.get_height() for p in ax.patches] == expected.tolist()
        assert ax.get_title() == f"{name}: mean {values.mean():.3f}, std {values.std():.3f}"
    assert [t.get_text() for t in failures.get_yticklabels()] == ["skipped: filter", "failed: decode"]
    assert [p.get_width() for p in failures.patches] == [3, 3] and failures.get_title() == "not ok: 6 of 18 inputs"
    offsets = kept.collections[0].get_offsets()
    np.testing.assert_allclose(offsets, [[r["lam"], r["kept_patches"] / 24] for r in ok])
    maps = np.array([r["saliency"] for r in ok], np.float64)
    expected = (maps / maps.sum(1, keepdims=True) * 24).mean(0).reshape(4, 6)
    np.testing.assert_allclose(saliency.images[0].get_array(), expected, rtol=1e-6)
    assert saliency.get_title() == "mean saliency over 12 pairs (4x6 patches)" and colorbar.get_ylabel() == "x uniform attention"
    assert fig._suptitle.get_text() == "out: 12 pairs of 18 inputs (methods: mergemix 12)"


def test_cli_inspect_plot_writes_the_png(out, tmp_path):
    result = CliRunner().invoke(app, ["inspect", str(out), "--plot", str(tmp_path / "run.png")])
    assert result.exit_code == 0, result.output
    assert "inputs       18: ok 12" in result.stdout and f"wrote {tmp_path / 'run.png'}" in result.stdout
    png = np.asarray(Image.open(tmp_path / "run.png").convert("RGB"))
    assert png.shape == (950, 1600, 3) and png.std() > 20  # drawn, not blank


def test_panels_without_failures_kept_patches_or_saliency(tmp_path):
    """mixup selects no patches, and saliency is optional: those panels say so instead of drawing."""
    rows_, images = unit_rows(0, 4)
    for row in rows_:
        row.update(kept_patches=None, saliency=None, method="mixup")
        pair = images[row["key"]]
        pair.mask[:] = round(255 * row["lam"])
        row.update(lam_hat=row["lam"], margin=1 - row["lam"])
    write_unit(tmp_path, 0, rows_, images, image_format="png", fingerprint="fp")
    fig = figure(collect(open_store(tmp_path)), "mixup")
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "every input is ok" in texts and "no saliency stored" in texts
    assert "no pair selects patches\n(blends and image-side negatives\nhave pixel masks, not patches)" in texts


def test_bad_requests(out, tmp_path):
    with pytest.raises(UserError, match="give a .png"):
        plot_output(out, tmp_path / "plot.jpg")
    with pytest.raises(UserError, match="does not exist"):
        plot_output(out, tmp_path / "no" / "plot.png")
    (tmp_path / "empty" / "shards").mkdir(parents=True)
    with pytest.raises(UserError, match="no committed units"):
        plot_output(tmp_path / "empty", tmp_path / "plot.png")
    result = CliRunner().invoke(app, ["inspect", str(out), "--plot", str(tmp_path / "plot.jpg"),
                                      "--storage-options", json.dumps({})])
    assert result.exit_code == 2 and result.stderr.startswith("error: --plot") and "Traceback" not in result.output
