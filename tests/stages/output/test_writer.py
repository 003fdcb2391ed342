"""Unit writer: files, exact pixels, byte-identical tars, atomic commit, resume cleanup, run files."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from schemas.shard import FIELDS, SCHEMA_VERSION, sample_key
from stages.readers.output_state import committed_units, read_stats
from stages.output.cleanup import remove_leftovers
from stages.storage import LocalStore
from stages.imaging.compose import PairImages
from stages.imaging.codec import encode_image
from stages.output.runfiles import write_run_files
from stages.output.writer import write_unit
from tests.shard_fixtures import GRID, H, W, make_output, synthetic_pair, unit_rows


def _members(tar_path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_unit_files_rows_and_members(tmp_path):
    rows, images = unit_rows(3, 6, failed=(2,), skipped=(4,))
    stats = write_unit(tmp_path, 3, rows, images, image_format="png", fingerprint="fp1", extra_stats={"timings": {"encoder_s": 1.5}, "device": "cpu"})
    sdir = tmp_path / "shards"
    assert sorted(p.name for p in sdir.iterdir()) == ["000003.parquet", "000003.tar", "000003_stats.json"]
    assert stats == json.loads((sdir / "000003_stats.json").read_text())
    assert stats["counts"] == {"total": 6, "ok": 4, "failed": 1, "skipped": 1}
    assert stats["errors"] == {"decode": 1, "filter": 1}
    assert stats["timings"]["encoder_s"] == 1.5 and stats["device"] == "cpu" and stats["fingerprint"] == "fp1"
    assert stats["tar"]["md5sum"] == hashlib.md5((sdir / "000003.tar").read_bytes()).hexdigest()

    pf = pq.ParquetFile(sdir / "000003.parquet")
    assert pf.metadata.metadata[b"mergemix.schema_version"] == SCHEMA_VERSION.encode()
    table = pf.read()
    assert table.schema.names == list(FIELDS)
    prow = table.to_pylist()
    assert [r["key"] for r in prow] == [sample_key(3, i) for i in range(6)]
    assert [r["status"] for r in prow] == ["ok", "ok", "failed", "ok", "skipped", "ok"]
    assert prow[2]["error"].startswith("decode:") and prow[2]["winner_sha256"] is None

    members = _members(sdir / "000003.tar")
    ok_keys = [r["key"] for r in prow if r["status"] == "ok"]
    assert list(members) == [f"{k}.{p}" for k in ok_keys for p in ("winner.png", "loser.png", "mask.png", "json")]
    for row in prow:
        if row["status"] != "ok":
            assert not any(n.startswith(row["key"]) for n in members)
            continue
        k = row["key"]
        assert json.loads(members[f"{k}.json"]) == row  # the record is exactly the parquet row
        for part in ("winner", "loser", "mask"):
            assert hashlib.sha256(members[f"{k}.{part}.png"]).hexdigest() == row[f"{part}_sha256"]
        assert row["image_size"] == [H, W] and row["grid"] == list(GRID)
        assert row["kept_patches"] == int((images[k].mask == 255).sum())
        assert len(row["saliency"]) == GRID[0] * GRID[1]
    with tarfile.open(sdir / "000003.tar") as tar:
        for m in tar.getmembers():
            assert m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.isfile()
            assert not m.name.startswith("/") and ".." not in m.name and "/" not in m.name


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_lossless_formats_round_trip_exactly(tmp_path, fmt):
    rows, images = unit_rows(0, 3)
    write_unit(tmp_path, 0, rows, images, image_format=fmt, fingerprint="fp")
    members = _members(tmp_path / "shards" / "000000.tar")
    for key, pair in images.items():
        for part in ("winner", "loser"):
            got = np.asarray(Image.open(io.BytesIO(members[f"{key}.{part}.{fmt}"])).convert("RGB"))
            np.testing.assert_array_equal(got, getattr(pair, part))
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(members[f"{key}.mask.png"]))), pair.mask)


def test_jpeg_is_close_and_honours_quality(tmp_path):
    pair, _ = synthetic_pair(7)
    hi = np.asarray(Image.open(io.BytesIO(encode_image(pair.winner, "jpg", 95))).convert("RGB")).astype(int)
    lo_bytes = encode_image(pair.winner, "jpg", 30)
    lo = np.asarray(Image.open(io.BytesIO(lo_bytes))).astype(int)
    err_hi = np.abs(hi - pair.winner).mean()
    assert 0 < err_hi < 4
    assert np.abs(lo - pair.winner).mean() > err_hi
    assert len(lo_bytes) < len(encode_image(pair.winner, "jpg", 95))
    rows, images = unit_rows(0, 2)
    write_unit(tmp_path, 0, rows, images, fingerprint="fp")  # jpg is the default
    row = pq.read_table(tmp_path / "shards" / "000000.parquet").to_pylist()[0]
    assert row["image_format"] == "jpg" and row["jpeg_quality"] == 95
    assert "000000_000000.winner.jpg" in _members(tmp_path / "shards" / "000000.tar")


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp"])
def test_same_content_gives_byte_identical_tars_and_parquet(tmp_path, fmt):
    for run in ("a", "b"):
        rows, images = unit_rows(5, 5, failed=(1,))
        write_unit(tmp_path / run, 5, rows, images, image_format=fmt, fingerprint="fp")
    for name in ("000005.tar", "000005.parquet"):
        assert (tmp_path / "a/shards" / name).read_bytes() == (tmp_path / "b/shards" / name).read_bytes()
    rows, images = unit_rows(5, 5, failed=(1,), seed=1)  # different pixels -> different bytes
    write_unit(tmp_path / "c", 5, rows, images, image_format=fmt, fingerprint="fp")
    assert (tmp_path / "a/shards/000005.tar").read_bytes() != (tmp_path / "c/shards/000005.tar").read_bytes()


def test_streaming_in_chunks_changes_no_byte(tmp_path, monkeypatch):
    """The writer encodes and types WRITE_CHUNK samples at a time; chunk boundaries (falling on
    failed rows too) must not show in the files."""
    from stages.output import writer

    def write(run):
        rows, images = unit_rows(2, 11, failed=(2, 3), skipped=(9,))
        return write_unit(tmp_path / run, 2, rows, images, image_format="png", fingerprint="fp")

    one = write("one-chunk")
    monkeypatch.setattr(writer, "WRITE_CHUNK", 3)
    three = write("chunks-of-3")
    for name in ("000002.tar", "000002.parquet"):
        assert (tmp_path / "one-chunk/shards" / name).read_bytes() == (tmp_path / "chunks-of-3/shards" / name).read_bytes()
    assert one["counts"] == three["counts"] == {"total": 11, "ok": 8, "failed": 2, "skipped": 1}


def test_a_unit_without_stats_is_not_committed_and_resume_cleans_it(tmp_path):
    make_output(tmp_path, units=(0, 1), run_files=False)
    store, sdir = LocalStore(tmp_path), tmp_path / "shards"
    assert set(committed_units(store)) == {0, 1}
    (sdir / "000001_stats.json").unlink()  # crash after the renames, before the commit marker
    (sdir / ".000002.tar.0123456789ab.tmp").write_bytes(b"partial")  # crash while writing unit 2
    (sdir / "000003.parquet").write_bytes(b"orphan")
    assert set(committed_units(store)) == {0}
    assert read_stats(store, 1) is None and read_stats(store, 0)["unit"] == 0
    removed = remove_leftovers(store, range(4))
    assert sorted(removed) == ["shards/.000002.tar.0123456789ab.tmp", "shards/000001.parquet", "shards/000001.tar",
                               "shards/000003.parquet"]
    assert sorted(p.name for p in sdir.iterdir()) == ["000000.parquet", "000000.tar", "000000_stats.json"]
    (sdir / "000000_stats.json").write_text("{not json")  # a torn stats file never counts as committed
    assert committed_units(store) == {}


def test_a_failing_write_leaves_no_unit_behind(tmp_path):
    rows, images = unit_rows(0, 4)
    images[rows[3]["key"]] = PairImages(images[rows[3]["key"]].winner, images[rows[3]["key"]].loser, np.full(GRID, 7, np.uint8))
    with pytest.raises(ValueError, match="mask values"):
        write_unit(tmp_path, 0, rows, images, image_format="png", fingerprint="fp")
    rows, images = unit_rows(0, 4)
    rows[2]["lam"] = "not a number"  # fails while typing the table, after the images are encoded
    with pytest.raises(Exception):
        write_unit(tmp_path, 0, rows, images, image_format="png", fingerprint="fp")
    assert list((tmp_path / "shards").iterdir()) == []


def test_writer_rejects_inconsistent_input(tmp_path):
    rows, images = unit_rows(0, 3, failed=(1,))
    with pytest.raises(ValueError, match="ok row without images"):
        write_unit(tmp_path, 0, rows, {k: v for k, v in images.items() if k != rows[0]["key"]}, fingerprint="fp")
    with pytest.raises(ValueError, match="images given for a failed row"):
        write_unit(tmp_path, 0, rows, {**images, rows[1]["key"]: images[rows[0]["key"]]}, fingerprint="fp")
    with pytest.raises(ValueError, match="image format"):
        write_unit(tmp_path, 0, rows, images, image_format="gif", fingerprint="fp")
    rows, images = unit_rows(0, 3)
    rows[2]["key"] = rows[1]["key"]
    with pytest.raises(ValueError, match="duplicate key"):
        write_unit(tmp_path, 0, rows, images, fingerprint="fp")


def test_run_files_total_committed_units_and_index_in_wids_format(tmp_path):
    make_output(tmp_path, units=(0, 1, 2), n=5, failed=(0,), skipped=(), run_files=False)
    (tmp_path / "shards" / "000002_stats.json").unlink()
    write_run_files(tmp_path, {"config": {"seed": 0}, "fingerprint": "fp-test", "timings": {"total_s": 3.0}})
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"] == {"seed": 0} and run["timings"] == {"total_s": 3.0}
    assert run["totals"]["units"] == 2 and run["totals"]["ok"] == 8 and run["totals"]["failed"] == 2
    assert run["totals"]["errors"] == {"decode": 2}
    assert run["versions"]["pyarrow"] and run["versions"]["python"] and run["schema_version"] == SCHEMA_VERSION
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
    assert [e["url"] for e in index["shardlist"]] == ["shards/000000.tar", "shards/000001.tar"]
    for entry in index["shardlist"]:
        data = (tmp_path / entry["url"]).read_bytes()
        assert entry["filesize"] == len(data) and entry["md5sum"] == hashlib.md5(data).hexdigest()
        assert entry["nsamples"] == 4


def test_mixup_mask_is_the_blend_weight_and_selections_stay_binary(tmp_path):
    """The shard contract for masks (schemas.shard.mask_problem): a mixup row stores the winner's
    weight round(255 * lam) on every patch and kept_patches null; every other method 0/255."""
    from schemas.shard import mask_problem
    from stages.readers.validate import validate_output

    rows, images = unit_rows(0, 4)
    for row in rows:
        pair = images[row["key"]]
        lam = row["lam"]
        level = np.full(GRID, round(255 * lam), np.uint8)
        blend = np.round(lam * pair.winner + (1 - lam) * pair.loser).astype(np.uint8)
        images[row["key"]] = PairImages(pair.winner, blend, level)
        row.update(method="mixup", lam_hat=lam, margin=1 - lam, kept_patches=None)
    write_unit(tmp_path, 0, rows, images, image_format="png", fingerprint="fp")
    write_run_files(tmp_path, {"fingerprint": "fp"})
    written = pq.read_table(tmp_path / "shards" / "000000.parquet").to_pylist()
    assert [r["kept_patches"] for r in written] == [None] * 4
    assert validate_output(tmp_path) == []

    level = np.full(GRID, 128, np.uint8)
    assert mask_problem("mixup", 128 / 255, None, level) is None
    assert "round(255 * lam) = 51" in mask_problem("mixup", 0.2, None, level)
    assert "kept_patches must be null" in mask_problem("mixup", 128 / 255, 0, level)
    assert mask_problem("mergemix", 0.5, None, level) == "mask values must be 0 or 255"
    binary = np.zeros(GRID, np.uint8)
    binary[0] = 255
    assert mask_problem("cutmix", 0.5, GRID[1], binary) is None
    assert "keeps 6 patches, parquet kept_patches is 5" in mask_problem("cutmix", 0.5, 5, binary)
    rows, images = unit_rows(1, 2)
    images[rows[0]["key"]].mask[:] = 128  # a selection method with a blend mask is refused by the writer
    with pytest.raises(ValueError, match="mask values must be 0 or 255"):
        write_unit(tmp_path, 1, rows, images, image_format="png", fingerprint="fp")
    rows, images = unit_rows(2, 2)
    rows[0]["method"] = "mixup"  # and a mixup row whose mask does not match its lam
    with pytest.raises(ValueError, match="mixup mask must hold"):
        write_unit(tmp_path, 2, rows, images, image_format="png", fingerprint="fp")
