"""`export --to swift|hf|llava`: each export read back by what it targets, one row per ok pair,
images byte-equal to the tar members, margins equal to the Parquet; OUT never written; bad
requests are one line."""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from pipeline.cli import app  # noqa: E402
from stages.errors import UserError  # noqa: E402
from stages.export.exporter import export  # noqa: E402
from stages.export.hf import trl_messages  # noqa: E402
from stages.export.llava import llava_row  # noqa: E402
from stages.export.pairs import Pair, conversation  # noqa: E402
from stages.export.swift import swift_row  # noqa: E402
from stages.readers.shards import iter_tar_samples, resolve_shards  # noqa: E402
from stages.storage import open_store  # noqa: E402
from stages.output.runfiles import write_run_files  # noqa: E402
from stages.output.writer import write_unit
from tests.shard_fixtures import make_output, unit_rows  # noqa: E402

datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is in the test extra")


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """Three units of 6 inputs, 4 ok pairs each (one failed, one skipped per unit), JPEG."""
    return make_output(tmp_path_factory.mktemp("out") / "out", units=(0, 1, 2), image_format="jpg")


def ok_rows(out) -> list[dict]:
    rows = [r for p in sorted(glob.glob(f"{out}/shards/*.parquet")) for r in pq.read_table(p).to_pylist()]
    return [r for r in rows if r["status"] == "ok"]


def tar_members(out) -> dict[str, dict[str, bytes]]:
    return {key: parts for ref in resolve_shards(out) for key, parts in iter_tar_samples(ref)}


def snapshot(folder) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in Path(folder).rglob("*") if p.is_file()}


def run_cli(*args) -> object:
    return CliRunner().invoke(app, ["export", *map(str, args)])


def test_swift_rows_follow_ms_swifts_documented_schema(out, tmp_path):
    before = snapshot(out)
    result = run_cli(out, tmp_path / "swift", "--to", "swift", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "exported 12 pairs of 3 units" in result.stdout and snapshot(out) == before
    dest = tmp_path / "swift"
    lines = (dest / "train.jsonl").read_text().splitlines()
    rows, members = ok_rows(out), tar_members(out)
    assert len(lines) == len(rows) == 12
    for line, parquet in zip(lines, rows):
        row = json.loads(line)
        assert set(row) == {"messages", "images", "rejected_images", "margin", "lam_hat", "lam", "key"}
        assert row["key"] == parquet["key"] and (row["margin"], row["lam_hat"], row["lam"]) == (parquet["margin"], parquet["lam_hat"], parquet["lam"])
        # ms-swift's standard format: role/content messages, one <image> tag per image, paths to the images.
        assert all(set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant") for m in row["messages"])
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert row["messages"][0]["content"] == f"<image>{parquet['prompt']}" and row["messages"][1]["content"] == parquet["answer"]
        assert sum(m["content"].count("<image>") for m in row["messages"]) == len(row["images"]) == len(row["rejected_images"]) == 1
        assert (dest / row["images"][0]).read_bytes() == members[row["key"]]["winner.jpg"]
        assert (dest / row["rejected_images"][0]).read_bytes() == members[row["key"]]["loser.jpg"]
    readme = (dest / "README.md").read_text()
    mean = sum(r["margin"] for r in rows) / len(rows)
    assert "swift rlhf --rlhf_type simpo" in readme and f"--simpo_gamma {mean:.3f}" in readme and "per-pair" in readme


def test_llava_json_rows(out, tmp_path):
    result = run_cli(out, tmp_path / "llava", "--to", "llava", "--no-progress")
    assert result.exit_code == 0, result.output
    dest = tmp_path / "llava"
    data = json.loads((dest / "llava.json").read_text())
    rows, members = ok_rows(out), tar_members(out)
    assert isinstance(data, list) and len(data) == len(rows)
    for row, parquet in zip(data, rows):
        assert row["id"] == parquet["key"] and row["source_id"] == parquet["source_id"] and row["margin"] == parquet["margin"]
        assert row["conversations"] == [{"from": "human", "value": f"<image>\n{parquet['prompt']}"},
                                        {"from": "gpt", "value": parquet["answer"]}]
        assert (dest / row["image"]).read_bytes() == members[row["id"]]["winner.jpg"]
        assert (dest / row["rejected_image"]).read_bytes() == members[row["id"]]["loser.jpg"]


def test_hf_export_loads_with_datasets_and_feeds_trls_collator(out, tmp_path):
    result = run_cli(out, tmp_path / "hf", "--to", "hf", "--no-progress")
    assert result.exit_code == 0, result.output
    dest = tmp_path / "hf"
    rows, members = ok_rows(out), tar_members(out)
    on_disk = datasets.load_from_disk(str(dest))
    parquet = datasets.load_dataset("parquet", data_files=str(dest / "data" / "*.parquet"), split="train",
                                    cache_dir=str(tmp_path / "cache"))
    files = sorted(glob.glob(str(dest / "data" / "*.parquet")))
    assert [{k[:6] for k in pq.read_table(f, columns=["key"])["key"].to_pylist()} for f in files] == [{"000000"}, {"000001"}, {"000002"}]
    for ds in (on_disk, parquet):
        assert ds.num_rows == len(rows) and ds["key"] == [r["key"] for r in rows]
        assert ds["margin"] == [r["margin"] for r in rows] and ds["lam_hat"] == [r["lam_hat"] for r in rows]
        assert isinstance(ds.features["images"], datasets.List) and ds.features["images"].feature == datasets.Image()
        assert ds.features["mask"] == datasets.Image()
    raw = on_disk.cast_column("images", [datasets.Image(decode=False)]).cast_column("rejected_images", [datasets.Image(decode=False)])
    raw = raw.cast_column("mask", datasets.Image(decode=False))
    for row in raw:
        assert row["images"][0]["bytes"] == members[row["key"]]["winner.jpg"]
        assert row["rejected_images"][0]["bytes"] == members[row["key"]]["loser.jpg"]
        assert row["mask"]["bytes"] == members[row["key"]]["mask.png"]
    first, parquet_first = on_disk[0], rows[0]
    assert first["prompt"] == [{"role": "user", "content": [{"type": "image", "text": None},
                                                            {"type": "text", "text": parquet_first["prompt"]}]}]
    assert first["chosen"] == first["rejected"] == [{"role": "assistant", "content": [{"type": "text", "text": parquet_first["answer"]}]}]

    # TRL reads the columns as its conversational vision preference format.
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from stages.training.vlm import LLAVA15_CHAT_TEMPLATE
    from tests.tiny_llava import IMAGE_TOKENS, llama_tokenizer, tiny_llava

    _, processor = tiny_llava(llama_tokenizer(tmp_path / "tokenizer", legacy=False), LLAVA15_CHAT_TEMPLATE)
    batch = DataCollatorForVisionPreference(processor)([dict(on_disk[i]) for i in range(2)])
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert batch["pixel_values"].shape[0] == 4  # chosen and rejected of two pairs: TRL repeats `images`
    assert ((batch["input_ids"] == image_id).sum(1) == IMAGE_TOKENS).all()
    assert batch["completion_mask"].sum() > 0


def test_hf_parquet_files_follow_the_units(tmp_path):
    for unit, n in ((0, 2), (1, 5)):
        rows, images = unit_rows(unit, n)
        write_unit(tmp_path / "out", unit, rows, images, image_format="png", fingerprint="fp")
    write_run_files(tmp_path / "out", {"fingerprint": "fp", "units_planned": 2})
    export(tmp_path / "out", tmp_path / "hf", "hf", progress=False)
    files = sorted(glob.glob(str(tmp_path / "hf" / "data" / "*.parquet")))
    assert [pq.read_metadata(f).num_rows for f in files] == [2, 5]


def test_conversation_shapes_for_multi_turn_text_and_labels():
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Look.\n<image>"},
             {"from": "gpt", "value": "A cat."}, {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Black."}]
    record = {"key": "000000_000000", "conversations": json.dumps(turns), "margin": 0.25, "lam_hat": 0.75, "lam": 0.7,
              "image_format": "png", "source_id": "cat"}
    conv = conversation(record)
    assert conv.turns == [("system", "Be brief."), ("user", "Look."), ("assistant", "A cat."), ("user", "Colour?"),
                          ("assistant", "Black.")] and conv.image_turn == 1
    pair = Pair("000000_000000", record, b"w", b"l", b"m")
    assert swift_row(pair, "w.png", "l.png")["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>Look."},
        {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Black."}]
    assert llava_row(pair, "w.png", "l.png")["conversations"] == [
        {"from": "human", "value": "<image>\nLook."}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Black."}]
    prompt, answer = trl_messages(record)
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user"] and prompt[1]["content"][0] == {"type": "image", "text": None}
    assert answer == [{"role": "assistant", "content": [{"type": "text", "text": "Black."}]}]
    # Classification shards: the label answers a fixed question; no text at all is refused.
    label_only = conversation({"key": "k", "label": "tabby", "prompt": None, "answer": None})
    assert label_only.turns == [("user", "What is in the image?"), ("assistant", "tabby")] and label_only.image_turn == 0
    with pytest.raises(UserError, match="neither an answer nor a label"):
        conversation({"key": "k", "prompt": "What?", "answer": None, "label": None})
    with pytest.raises(UserError, match="role 'bot'"):
        conversation({"key": "k", "conversations": json.dumps([{"from": "bot", "value": "hi"}])})


def test_bad_requests_are_one_line_and_touch_nothing(out, tmp_path):
    before = snapshot(out)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    cases = {
        (out, out / "exported", "swift"): "inside the output",
        (out, tmp_path / "full", "hf"): "exists and is not an empty folder",
        (out, tmp_path / "x", "trl"): "--to 'trl' is not one of swift, hf, llava",
        (tmp_path / "missing", tmp_path / "y", "swift"): "does not exist",
        (out, "s3://bucket/dest", "swift"): "must be a local folder",
    }
    for (source, dest, to), message in cases.items():
        result = run_cli(source, dest, "--to", to, "--no-progress")
        assert result.exit_code == 2 and message in result.stderr, (message, result.output)
        assert len(result.stderr.strip().splitlines()) == 1
    assert snapshot(out) == before and (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".*partial"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(out, empty, "--to", "llava", "--no-progress").exit_code == 0 and (empty / "llava.json").is_file()


def test_an_export_that_fails_midway_leaves_no_dest(tmp_path):
    out = make_output(tmp_path / "out", units=(0, 1), image_format="png")
    tar = out / "shards" / "000001.tar"
    tar.write_bytes(tar.read_bytes()[:3000])  # unit 1 is damaged: the export stops there
    for to in ("swift", "hf", "llava"):
        with pytest.raises(UserError, match="truncated"):
            export(out, tmp_path / to, to, progress=False)
        assert not (tmp_path / to).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder, no datasets cache


def test_an_unfinished_output_needs_allow_partial(tmp_path):
    out = make_output(tmp_path / "out", units=(0, 1), run_files=False)
    refused = run_cli(out, tmp_path / "a", "--to", "swift", "--no-progress")
    assert refused.exit_code == 2 and "not a finished generate run" in refused.stderr and "--allow-partial" in refused.stderr
    done = run_cli(out, tmp_path / "b", "--to", "swift", "--no-progress", "--allow-partial")
    assert done.exit_code == 0 and "exporting the 2 units committed now" in done.stderr
    assert len((tmp_path / "b" / "train.jsonl").read_text().splitlines()) == 8


@pytest.mark.timeout(300)
def test_export_from_a_bucket(s3_server, s3_prefix, tmp_path):
    """OUT on a real S3 server, endpoint and keys given with --storage-options."""
    opts = s3_server.storage_options
    url = f"s3://{s3_prefix}/out"
    store = open_store(url, opts)
    for unit in (0, 1):
        rows, images = unit_rows(unit, 4)
        write_unit(store, unit, rows, images, image_format="webp", fingerprint="fp")
    write_run_files(store, {"fingerprint": "fp", "units_planned": 2})
    result = run_cli(url, tmp_path / "swift", "--to", "swift", "--no-progress", "--storage-options", json.dumps(opts))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "swift" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and rows[0]["images"][0].endswith(".winner.webp")
    members = {k: p for ref in resolve_shards(url, opts) for k, p in iter_tar_samples(ref)}
    assert all((tmp_path / "swift" / r["rejected_images"][0]).read_bytes() == members[r["key"]]["loser.webp"] for r in rows)
