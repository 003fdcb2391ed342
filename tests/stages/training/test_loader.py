"""Our torch loader, and real third-party readers, on real shards written by the writer."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from schemas.shard import SCHEMA_VERSION, empty_row
from stages.errors import UserError
from stages.readers.conversation import sample_turns
from stages.training.loader import NORMALIZE, ShardBatches, ShardDataset, collate_pairs, collated
from stages.output.writer import write_unit
from tests.shard_fixtures import GRID, H, W, make_output, unit_rows


@pytest.fixture(scope="module")
def out_png(tmp_path_factory):
    """Three committed units of 6 inputs (4 ok each) in lossless PNG."""
    return make_output(tmp_path_factory.mktemp("out_png"), units=(0, 1, 2), image_format="png")


def _parquet_rows(out) -> dict[str, dict]:
    rows = {}
    for path in sorted((out / "shards").glob("*.parquet")):
        rows.update({r["key"]: r for r in pq.read_table(path).to_pylist()})
    return rows


def _pixels(out) -> dict[str, object]:
    """The exact PairImages the writer was given, rebuilt from the same seeds."""
    pairs = {}
    for unit in (0, 1, 2):
        _, images = unit_rows(unit, 6, failed=(2,), skipped=(4,))
        pairs.update(images)
    return pairs


def test_loader_yields_every_ok_pair_with_exact_pixels_text_and_ratios(out_png):
    rows, pairs = _parquet_rows(out_png), _pixels(out_png)
    samples = list(ShardDataset(out_png, include_mask=True))
    ok = [k for k, r in rows.items() if r["status"] == "ok"]
    assert [s["key"] for s in samples] == ok and len(ok) == 12
    for s in samples:
        row, pair = rows[s["key"]], pairs[s["key"]]
        assert s["winner"].dtype == torch.float32 and s["winner"].shape == (3, H, W)
        assert torch.equal((s["winner"] * 255).round().to(torch.uint8), torch.from_numpy(pair.winner).permute(2, 0, 1))
        assert torch.equal((s["loser"] * 255).round().to(torch.uint8), torch.from_numpy(pair.loser).permute(2, 0, 1))
        assert torch.equal(s["mask"][0], torch.from_numpy(pair.mask == 255).float())
        assert (s["lam"], s["lam_hat"], s["margin"]) == (row["lam"], row["lam_hat"], row["margin"])
        assert s["prompt"] == row["prompt"] and s["answer"] == row["answer"] and s["label"] == row["label"]
        assert s["conversations"] == json.loads(row["conversations"]) and s["source_id"] == row["source_id"]


def test_clip_normalisation_resize_and_collate(out_png):
    plain = next(iter(ShardDataset(out_png)))
    clip = next(iter(ShardDataset(out_png, normalize="clip")))
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in NORMALIZE["clip"])
    torch.testing.assert_close(clip["winner"], (plain["winner"] - mean) / std)
    small = next(iter(ShardDataset(out_png, image_size=(16, 24))))
    assert small["winner"].shape == (3, 16, 24) and 0 <= small["winner"].min() and small["winner"].max() <= 1
    batch = collate_pairs(list(ShardDataset(out_png, include_mask=True))[:5])
    assert batch["winner"].shape == (5, 3, H, W) and batch["mask"].shape == (5, 1, *GRID)
    assert batch["lam"].dtype == torch.float32 and batch["lam"].shape == (5,)
    assert isinstance(batch["key"], list) and len(batch["prompt"]) == 5
    with pytest.raises(UserError, match="normalize"):
        ShardDataset(out_png, normalize="imagenet21k")


def test_dataloader_workers_read_each_sample_exactly_once(out_png):
    dl = torch.utils.data.DataLoader(ShardDataset(out_png), batch_size=3, num_workers=2, collate_fn=collate_pairs)
    keys = [k for batch in dl for k in batch["key"]]
    assert sorted(keys) == sorted(k for k, r in _parquet_rows(out_png).items() if r["status"] == "ok")


def test_ranks_split_shards_without_overlap(out_png, monkeypatch):
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append([s["key"] for s in ShardDataset(out_png)])
    assert {k[:6] for k in seen[0]} == {"000000", "000002"} and {k[:6] for k in seen[1]} == {"000001"}
    ds = ShardDataset(out_png)
    parts = [ds.shards_for_consumer(r, 2, w, 2) for r in range(2) for w in range(2)]
    assert sorted(ref.name.rsplit("/", 1)[-1] for p in parts for ref in p) == ["000000.tar", "000001.tar", "000002.tar"]


def test_shard_shuffle_is_seeded_and_changes_per_epoch(tmp_path):
    make_output(tmp_path, units=tuple(range(8)), n=2, failed=(), skipped=(), run_files=False)
    ds = ShardDataset(tmp_path, shuffle_shards=True, seed=3)
    orders = []
    for epoch in (0, 0, 1):
        ds.set_epoch(epoch)
        orders.append([r.name.rsplit("/", 1)[-1] for r in ds.shards_for_consumer(0, 1, 0, 1)])
    assert orders[0] == orders[1] and orders[0] != orders[2] and sorted(orders[2]) == [f"{u:06d}.tar" for u in range(8)]
    assert [r.name.rsplit("/", 1)[-1] for r in ShardDataset(tmp_path).shards_for_consumer(0, 1, 0, 1)] == [f"{u:06d}.tar" for u in range(8)]


def test_sources_dir_shards_dir_glob_and_list_and_only_committed_units(tmp_path):
    out = make_output(tmp_path / "out", units=(0, 1), run_files=False)
    (out / "shards" / "000001_stats.json").unlink()  # unit 1 is not committed
    assert [r.name.rsplit("/", 1)[-1] for r in ShardDataset(out).shards] == ["000000.tar"]
    assert [r.name.rsplit("/", 1)[-1] for r in ShardDataset(out / "shards").shards] == ["000000.tar"]
    assert len(ShardDataset(str(out / "shards" / "*.tar")).shards) == 2  # an explicit glob reads what it names
    assert len(ShardDataset([out / "shards" / "000000.tar", out / "shards" / "000001.tar"]).shards) == 2
    with pytest.raises(UserError, match="does not exist"):
        ShardDataset(tmp_path / "nope")
    with pytest.raises(UserError, match="no .tar files match"):
        ShardDataset(str(tmp_path / "nope" / "*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no committed shards"):
        ShardDataset(tmp_path / "empty")


def _tar_with(path, names):
    with tarfile.open(path, "w") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))


@pytest.mark.parametrize("name", ["../escape.json", "/abs/000000_000000.json", "a/../../x.json"])
def test_reader_refuses_unsafe_member_names(tmp_path, name):
    _tar_with(tmp_path / "bad.tar", [name])
    with pytest.raises(UserError, match="unsafe tar member"):
        list(ShardDataset(tmp_path / "bad.tar"))


def test_corrupt_and_truncated_shards_give_one_line_errors(tmp_path):
    out = make_output(tmp_path / "out", units=(0,), run_files=False)
    tar = out / "shards" / "000000.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(UserError, match="truncated") as exc:
        list(ShardDataset(out))
    assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match="corrupt") as exc:  # same tar via a glob: no stats to compare with
        list(ShardDataset(str(out / "shards" / "*.tar")))
    assert "\n" not in str(exc.value)
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar" * 100)
    with pytest.raises(UserError, match="corrupt"):
        list(ShardDataset(tmp_path / "junk.tar"))


# --- third-party readers -----------------------------------------------------------------


def _decode(value):
    """Readers hand images back as arrays, PIL images or raw bytes; make arrays of all three."""
    if isinstance(value, (bytes, bytearray)):
        value = Image.open(io.BytesIO(value))
    if isinstance(value, Image.Image):
        value = np.asarray(value.convert("RGB"))
    return np.asarray(value)


@pytest.fixture(scope="module")
def out_webp(tmp_path_factory):
    return make_output(tmp_path_factory.mktemp("out_webp"), units=(0, 1), image_format="webp")


def test_webdataset_reads_our_shards(out_png):
    import webdataset as wds

    tars = sorted(str(p) for p in (out_png / "shards").glob("*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("rgb8"))
    pairs, rows = _pixels(out_png), _parquet_rows(out_png)
    assert [s["__key__"] for s in samples] == [k for k, r in rows.items() if r["status"] == "ok"]
    for s in samples:
        np.testing.assert_array_equal(s["winner.png"], pairs[s["__key__"]].winner)
        np.testing.assert_array_equal(s["loser.png"], pairs[s["__key__"]].loser)
        assert s["json"] == rows[s["__key__"]]


def test_wids_reads_our_index_json(out_png, tmp_path):
    wids = pytest.importorskip("wids", reason="wids is in the test extra")
    ds = wids.ShardListDataset(str(out_png / "index.json"), cache_dir=str(tmp_path / "wids-cache"))
    rows, pairs = _parquet_rows(out_png), _pixels(out_png)
    ok = [k for k, r in rows.items() if r["status"] == "ok"]
    assert len(ds) == len(ok)
    for i in (0, 5, len(ds) - 1):  # random access by global index
        s = ds[i]
        assert s["__key__"] == ok[i]
        np.testing.assert_array_equal(_decode(s[".winner.png"]), pairs[ok[i]].winner)
        assert s[".json"]["lam"] == rows[ok[i]]["lam"]
    ds.close()


def test_pyarrow_dataset_over_the_parquet_files(out_png):
    files = sorted(str(p) for p in (out_png / "shards").glob("*.parquet"))
    dataset = pads.dataset(files, format="parquet")
    table = dataset.to_table()
    assert table.num_rows == 18
    assert table.schema.metadata[b"mergemix.schema_version"] == SCHEMA_VERSION.encode()
    ok = dataset.to_table(columns=["key", "lam_hat"], filter=pc.field("status") == "ok")
    assert ok.num_rows == 12
    failed = dataset.to_table(filter=pc.field("status") == "failed")
    assert failed["error"].to_pylist() == ["decode: cannot identify image file"] * 3


@pytest.mark.timeout(240)
def test_ray_data_read_webdataset(out_webp):
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:  # a read task needs a whole free CPU; 2 CPUs leave one for the driver side
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tars = sorted(str(p) for p in (out_webp / "shards").glob("*.tar"))
        got = ray.data.read_webdataset(tars).take_all()
    finally:
        if started:
            ray.shutdown()
    rows, pairs = _parquet_rows(out_webp), _pixels(out_webp)
    assert sorted(r["__key__"] for r in got) == sorted(k for k, r in rows.items() if r["status"] == "ok")
    for r in got:
        np.testing.assert_array_equal(_decode(r["winner.webp"]), pairs[r["__key__"]].winner)
        record = r["json"] if isinstance(r["json"], dict) else json.loads(r["json"])
        assert record["key"] == r["__key__"] and record["lam_hat"] == rows[r["__key__"]]["lam_hat"]


def test_huggingface_datasets_webdataset_loader(out_webp, tmp_path):
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is in the test extra")
    tars = sorted(str(p) for p in (out_webp / "shards").glob("*.tar"))
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train", cache_dir=str(tmp_path / "hf"))
    rows, pairs = _parquet_rows(out_webp), _pixels(out_webp)
    assert ds["__key__"] == [k for k, r in rows.items() if r["status"] == "ok"]
    first = ds[0]
    np.testing.assert_array_equal(_decode(first["winner.webp"]), pairs[first["__key__"]].winner)
    np.testing.assert_array_equal(_decode(first["loser.webp"]), pairs[first["__key__"]].loser)
    assert first["json"]["lam"] == rows[first["__key__"]]["lam"]
    assert first["json"]["prompt"] == rows[first["__key__"]]["prompt"]


def text_only_output(out):
    """Two units of 6 inputs: 0 and 5 text-only (skipped: no_image), 2 failed, 4 skipped by a
    filter (not text-only: it had an image), the rest ok."""
    for unit in (0, 1):
        rows, images = unit_rows(unit, 6, failed=(2,), skipped=(4,))
        for i in (0, 5):
            conv = [{"from": "human", "value": f"Tell me {i}."}, {"from": "gpt", "value": "First."},
                    {"from": "human", "value": "And then?"}, {"from": "gpt", "value": "Second."}]
            rows[i] = empty_row(key=rows[i]["key"], source_id=f"text/{unit}/{i}", unit=unit, index=i, status="skipped",
                                error="no_image: text-only sample", prompt=f"Tell me {i}.", answer="First.",
                                conversations=json.dumps(conv))
            images.pop(rows[i]["key"])
        write_unit(out, unit, rows, images, image_format="png", fingerprint="fp-test")
    return out


def test_text_only_rows_join_in_input_order_with_every_turn(tmp_path):
    out = text_only_output(tmp_path)
    plain = [s["key"] for s in ShardDataset(out)]
    assert plain == [f"00000{u}_00000{i}" for u in (0, 1) for i in (1, 3)]
    samples = list(ShardDataset(out, text_only=True, include_mask=True))
    assert [s["key"] for s in samples] == [f"00000{u}_00000{i}" for u in (0, 1) for i in (0, 1, 3, 5)]
    text = [s for s in samples if not s["has_image"]]
    assert [s["key"][-1] for s in text] == ["0", "5", "0", "5"]
    assert all(s["winner"] is None and s["loser"] is None and s["mask"] is None and s["margin"] == 0.0 for s in text)
    assert text[1]["turns"] == [("Tell me 5.", "First."), ("And then?", "Second.")]
    assert samples[1]["turns"] == [("What is in picture 1?", "Thing 1.")]  # "<image>\n" left to the adapter
    batch = collate_pairs(samples[:3])
    assert batch["has_image"].tolist() == [False, True, True]
    assert batch["winner"].shape == (3, 3, H, W) and batch["winner"][0].abs().sum() == 0
    assert batch["mask"].shape == (3, 1, *GRID)
    alone = collate_pairs(samples[:1])  # a batch of text only: placeholder images, never looked at
    assert alone["winner"].shape[:2] == (1, 3) and not alone["has_image"].any()


def test_sample_turns_follows_llava_conversations():
    conv = [{"from": "gpt", "value": "dropped, as LLaVA drops a leading answer"},
            {"from": "human", "value": "Look.\n<image>"}, {"from": "human", "value": "What is it?"},
            {"from": "gpt", "value": "A cat."}, {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Grey."},
            {"from": "human", "value": "unanswered"}]
    assert sample_turns(conv, None, None, None) == [("Look.\nWhat is it?", "A cat."), ("Colour?", "Grey.")]
    assert sample_turns(None, "Q", "A", "3") == [("Q", "A")]
    assert sample_turns(None, None, None, "3") == [("What is in the image?", "3")]
    assert sample_turns(None, "Q", None, None) == []


def _batches(ds, batch_size, workers, start=0):
    loader = torch.utils.data.DataLoader(ShardBatches(ds, batch_size, start=start), batch_size=None,
                                         num_workers=workers, collate_fn=collated)
    return [(b["batch_index"], b["key"]) for b in loader]


def test_batches_do_not_depend_on_workers_or_ranks(out_png, monkeypatch):
    ds = ShardDataset(out_png, shuffle_shards=True, seed=5)
    ds.set_epoch(1)
    stream = [k for ref in ds.epoch_shards() for k, _ in ds.entries(ref)]
    one = _batches(ds, 5, workers=0)
    assert [k for _, keys in one for k in keys] == stream and [i for i, _ in one] == [0, 1, 2]
    assert _batches(ds, 5, workers=2) == one  # 3 batches over 2 workers: uneven on purpose
    assert _batches(ds, 5, workers=2, start=1) == one[1:]
    monkeypatch.setenv("WORLD_SIZE", "2")
    ranks = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        ranks.append(_batches(ds, 2, workers=2))
    assert [b for b, _ in ranks[0]] == [0, 2, 4] and [b for b, _ in ranks[1]] == [1, 3, 5]
    assert sorted(ranks[0] + ranks[1]) == sorted(_batches_single(ds, 2, monkeypatch))


def _batches_single(ds, batch_size, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    return _batches(ds, batch_size, workers=0)


def test_batches_before_the_start_are_not_decoded(tmp_path):
    """A damaged image in batch 0 fails a read from batch 0 and not one that starts at batch 1."""
    out = make_output(tmp_path, units=(0,), run_files=False)
    tar_path = out / "shards" / "000000.tar"
    with tarfile.open(tar_path) as tar:
        member = tar.getmember("000000_000000.winner.png")
    with open(tar_path, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"\0" * member.size)
    ds = ShardDataset(out)
    assert [keys for _, keys in _batches(ds, 2, workers=0, start=1)] == [["000000_000003", "000000_000005"]]
    with pytest.raises(UserError, match="does not decode"):
        _batches(ds, 2, workers=0)
