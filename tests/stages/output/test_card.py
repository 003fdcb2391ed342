"""The dataset card OUT/README.md: `datasets.load_dataset(OUT)` reads the pairs with no network,
the card is ours only while it carries our marker, and it is written through the store (object
stores too)."""
from __future__ import annotations

import glob
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from schemas.layout import CARD_FILE, CARD_MARKER, is_root_tmp_file  # noqa: E402
from schemas.shard import ARROW_SCHEMA  # noqa: E402
from stages.readers.output_state import card_tars  # noqa: E402
from stages.output.card import record_features
from stages.readers.output_state import card_owner, leftovers  # noqa: E402
from stages.output.cleanup import remove_output
from stages.readers.shards import iter_tar_samples, resolve_shards  # noqa: E402
from stages.storage import open_store  # noqa: E402
from stages.readers.validate import validate_output  # noqa: E402
from stages.output.runfiles import write_run_files  # noqa: E402
from stages.output.writer import write_unit
from tests.shard_fixtures import make_output, unit_rows  # noqa: E402

datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is in the test extra")


def parquet_rows(out) -> dict[str, dict]:
    return {r["key"]: r for path in sorted(glob.glob(f"{out}/shards/*.parquet")) for r in pq.read_table(path).to_pylist()}


def members(out) -> dict[str, dict[str, bytes]]:
    return {key: parts for ref in resolve_shards(out) for key, parts in iter_tar_samples(ref)}


def test_load_dataset_on_the_output_gives_the_pairs(tmp_path):
    out = make_output(tmp_path / "out", units=(0, 1), image_format="png")
    assert card_owner(open_store(out)) == "ours" and CARD_MARKER in (out / CARD_FILE).read_text()
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    rows, tars = parquet_rows(out), members(out)
    assert ds["__key__"] == [k for k, r in rows.items() if r["status"] == "ok"]  # ok rows only, in order
    assert ds.column_names == ["winner.png", "loser.png", "mask.png", "json", "__key__", "__url__"]
    raw = ds.cast_column("winner.png", datasets.Image(decode=False)).cast_column("loser.png", datasets.Image(decode=False))
    for row in raw:
        key = row["__key__"]
        assert row["winner.png"]["bytes"] == tars[key]["winner.png"] and row["loser.png"]["bytes"] == tars[key]["loser.png"]
        assert row["json"]["margin"] == rows[key]["margin"] and row["json"]["prompt"] == rows[key]["prompt"]
        assert row["json"]["grid"] == rows[key]["grid"] and row["json"]["saliency"] == pytest.approx(rows[key]["saliency"])
    # What the card says about the metadata: one row per input through the Parquet builder.
    meta = datasets.load_dataset("parquet", data_files=f"{out}/shards/*.parquet", split="train", cache_dir=str(tmp_path / "hf"))
    assert meta.num_rows == len(rows) == 12 and sorted(meta.unique("status")) == ["failed", "ok", "skipped"]


def test_declared_columns_survive_values_that_start_null(tmp_path):
    """Without the card's features, the webdataset builder infers types from the first five
    samples and fails on a later label or kept_patches where those were all null."""
    rows, images = unit_rows(0, 9, failed=(), skipped=())
    for row in rows[:6]:
        row["label"] = None
    write_unit(tmp_path, 0, rows, images, image_format="jpg", fingerprint="fp")
    write_run_files(tmp_path, {"fingerprint": "fp"})
    ds = datasets.load_dataset(str(tmp_path), split="train", cache_dir=str(tmp_path / "hf"))
    assert [r["label"] for r in ds["json"]] == [None] * 6 + ["class0", "class1", "class2"]
    assert ds.features["winner.jpg"] == datasets.Image()


def test_record_features_are_what_datasets_makes_of_the_arrow_schema():
    assert record_features() == datasets.Features.from_arrow_schema(ARROW_SCHEMA)._to_yaml_list()


def test_a_readme_of_somebody_else_is_left_alone(tmp_path):
    out = make_output(tmp_path / "out", units=(0,), run_files=False)
    (out / CARD_FILE).write_text("# my experiment notes\n")
    notice = write_run_files(out, {"fingerprint": "fp-test"})
    assert "not a card of ours" in notice and (out / CARD_FILE).read_text() == "# my experiment notes\n"
    assert validate_output(out) == []  # not ours, so not checked
    remove_output(open_store(out))
    assert (out / CARD_FILE).read_text() == "# my experiment notes\n" and not (out / "run.json").exists()


def test_our_card_is_removed_by_overwrite_and_its_temporary_name_is_ours(tmp_path):
    out = make_output(tmp_path / "out", units=(0, 1))
    store = open_store(out)
    assert card_tars(store.read_bytes(CARD_FILE)) == ["shards/000000.tar", "shards/000001.tar"]
    assert is_root_tmp_file(".README.md.0123456789ab.tmp") and not is_root_tmp_file(".NOTES.md.0123456789ab.tmp")
    (out / ".README.md.0123456789ab.tmp").write_text("half")
    assert ".README.md.0123456789ab.tmp" in leftovers(store)
    remove_output(store)
    assert card_owner(store) == "absent" and not (out / ".README.md.0123456789ab.tmp").exists()


def test_validate_checks_the_cards_shard_list(tmp_path):
    out = make_output(tmp_path / "out", units=(0, 1))
    assert validate_output(out) == []
    card = (out / CARD_FILE).read_text()
    (out / CARD_FILE).write_text(card.replace("- shards/000001.tar\n", "- shards/000007.tar\n"))
    problems = validate_output(out)
    assert "README.md: committed shards/000001.tar is not listed" in problems
    assert "README.md: lists shards/000007.tar, which is not a committed unit with pairs" in problems


def test_the_card_is_written_through_an_object_store(tmp_path):
    """memory:// is a real fsspec file system: the card goes through FsspecStore like every other file."""
    store = open_store(f"memory://card-test-{os.getpid()}/out")
    rows, images = unit_rows(0, 4)
    write_unit(store, 0, rows, images, image_format="png", fingerprint="fp")
    assert write_run_files(store, {"fingerprint": "fp"}) is None
    assert card_owner(store) == "ours" and card_tars(store.read_bytes(CARD_FILE)) == ["shards/000000.tar"]
    store.write_bytes(CARD_FILE, b"theirs")
    assert "not a card of ours" in write_run_files(store, {"fingerprint": "fp"})
    assert store.read_bytes(CARD_FILE) == b"theirs"


def test_no_card_without_pairs(tmp_path):
    rows, images = unit_rows(0, 3, failed=(0, 1, 2))
    write_unit(tmp_path, 0, rows, images, fingerprint="fp")
    assert write_run_files(tmp_path, {"fingerprint": "fp"}) is None and not (tmp_path / CARD_FILE).exists()
