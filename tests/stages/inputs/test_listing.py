"""The driver's streaming listing (stages.inputs) and the prepare task's reading of a slice
(stages.inputs): every input kind gives the records a plain whole-file reader gives, in
order, split into units; the listing's memory does not grow with the input."""
from __future__ import annotations

import io
import json
import os
import tarfile
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.inputs import records as shared
from stages.errors import UserError
from stages.inputs.kinds import list_input
from stages.inputs.kinds import read_slice


def records(path, per_unit, **kw):
    lst = list_input(str(path), per_unit, **kw)
    out = [r for s in lst.slices for r in read_slice(s)]
    assert lst.count == len(out) and [s.count for s in lst.slices][:-1] == [per_unit] * (len(lst.slices) - 1)
    assert [s.first_index for s in lst.slices] == list(range(0, lst.count, per_unit))
    return lst, out


def llava_rows(n):
    return [{"id": f"r{i}", "image": f"img/{i}.jpg", "conversations": [
        {"from": "human", "value": f"<image>\nQuestion {i} \u00e9\u4e2d?"}, {"from": "gpt", "value": f"Answer {i}."}]}
        for i in range(n)]


@pytest.mark.parametrize("per_unit", [1, 3, 7, 50])
def test_llava_json_slices_give_every_row_in_order(tmp_path, per_unit):
    rows = llava_rows(23) + [7, {"id": "bad", "conversations": "nope"}, {"id": "text-only", "conversations": []}]
    path = tmp_path / "data.json"
    path.write_text(" \n[\n" + ",\n  ".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n")
    lst, recs = records(path, per_unit)
    assert lst.kind == "llava" and lst.count == len(rows)
    assert [r.source_id for r in recs] == [f"r{i}" for i in range(23)] + ["row-23", "bad", "text-only"]
    assert recs[5].prompt == "Question 5 \u00e9\u4e2d?" and recs[5].answer == "Answer 5." and recs[5].image == ("file", "img/5.jpg")
    assert recs[23].error.startswith("malformed_row") and recs[24].error.startswith("malformed_row")
    assert recs[25].image is None and recs[25].error is None


def test_llava_json_small_chunks_and_digest(tmp_path, monkeypatch):
    """Elements cut by chunk boundaries (multi-byte characters too) are found exactly; the
    digest follows the file's content."""
    path = tmp_path / "data.json"
    path.write_text(json.dumps(llava_rows(40), ensure_ascii=False))
    whole = list_input(str(path), 4)
    monkeypatch.setattr(shared, "CHUNK", 7)
    lst, recs = records(path, 4)
    assert lst.slices == whole.slices and lst.digest == whole.digest
    assert [r.source_id for r in recs] == [f"r{i}" for i in range(40)]
    path.write_text(json.dumps(llava_rows(40)[:-1] + [{"id": "changed"}], ensure_ascii=False))
    assert list_input(str(path), 4).digest != whole.digest


@pytest.mark.parametrize("text,why", [("{}", "an object"), ("", "empty"), ("[{\"id\": 1}, {", "not valid JSON"),
                                      ("[1, 2", "not valid JSON"), ("[{\"id\": 1} {\"id\": 2}]", "not valid JSON")])
def test_llava_json_that_is_not_a_list_is_one_clear_error(tmp_path, text, why):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(UserError, match=why):
        list_input(str(path), 5)


def test_jsonl_blank_and_malformed_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [json.dumps({"id": "a", "image": "a.jpg", "question": "q?", "answer": "x"}), "", "not json",
             json.dumps([1, 2]), json.dumps({"image": "b.jpg"}), "   ", json.dumps({"id": "c", "image": "c.jpg"})]
    path.write_text("\n".join(lines) + "\n")
    lst, recs = records(path, 2)
    assert [r.source_id for r in recs] == ["a", "line-3", "line-4", "row-4", "c"]
    assert recs[0].prompt == "q?" and recs[0].answer == "x"
    assert recs[1].error.startswith("malformed_row: line 3") and recs[2].error.startswith("malformed_row: line 4")


def test_parquet_slices_cross_row_groups(tmp_path):
    path = tmp_path / "m.parquet"
    table = pa.table({"id": [f"p{i}" for i in range(25)], "image_bytes": [bytes([i]) * 5 for i in range(25)],
                      "question": [f"q{i}" for i in range(25)]})
    pq.write_table(table, path, row_group_size=6)
    lst, recs = records(path, 4)
    assert [r.source_id for r in recs] == [f"p{i}" for i in range(25)]
    from stages.inputs.files import load_image_bytes

    cache = {}
    assert [load_image_bytes(r.image, None, cache) for r in recs] == [bytes([i]) * 5 for i in range(25)]
    digest = lst.digest
    pq.write_table(table.set_column(2, "question", pa.array([f"q{i}" for i in range(24)] + ["changed"])), path,
                   row_group_size=6)
    assert list_input(str(path), 4).digest != digest


def test_folder_and_labels(tmp_path):
    for rel in ("cat/b.jpg", "cat/a.png", "dog/z.webp", "top.jpg", "notes.txt", "dog/deep/x.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    lst, recs = records(tmp_path, 2, folder_labels=True)
    assert [r.source_id for r in recs] == ["cat/a.png", "cat/b.jpg", "dog/deep/x.jpg", "dog/z.webp", "top.jpg"]
    assert [r.label for r in recs] == ["cat", "cat", "dog", "dog", None]


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_webdataset_members_are_read_in_place_and_text_is_in_the_digest(tmp_path):
    _tar(tmp_path / "a.tar", [("s1.jpg", b"J1"), ("s1.json", json.dumps({"prompt": "p1", "answer": "a1"}).encode()),
                              ("s2.png", b"P2"), ("s2.txt", b" prompt two "), ("s2.cls", b"7"),
                              ("../evil.jpg", b"E"), ("s3.json", b"{broken")])
    _tar(tmp_path / "b.tar", [("dir/s4.webp", b"W4")])
    lst, recs = records(str(tmp_path / "*.tar"), 2)
    assert [r.source_id for r in recs] == ["s1", "s2", "../evil", "s3", "dir/s4"]
    assert (recs[0].prompt, recs[0].answer) == ("p1", "a1") and (recs[1].prompt, recs[1].label) == ("prompt two", "7")
    assert recs[3].error.startswith("malformed_row") and recs[3].image is None
    from stages.inputs.files import load_image_bytes

    assert [load_image_bytes(r.image, None) for r in recs if r.image] == [b"J1", b"P2", b"E", b"W4"]
    digest = lst.digest
    _tar(tmp_path / "a.tar", [("s1.jpg", b"J1"), ("s1.json", json.dumps({"prompt": "p1", "answer": "CHANGED"}).encode()),
                              ("s2.png", b"P2"), ("s2.txt", b" prompt two "), ("s2.cls", b"7"),
                              ("../evil.jpg", b"E"), ("s3.json", b"{broken")])
    assert list_input(str(tmp_path / "*.tar"), 2).digest != digest  # the text members count
    _tar(tmp_path / "a.tar", [("s1.jpg", b"J1-bigger")])
    assert list_input(str(tmp_path / "*.tar"), 2).digest != digest  # and so do the members' sizes


def test_a_slice_of_a_changed_input_is_refused(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"id": i}) + "\n" for i in range(6)))
    lst = list_input(str(path), 3)
    path.write_text("".join(json.dumps({"id": i}) + "\n\n" for i in range(6)))
    with pytest.raises(ValueError, match="input changed"):
        read_slice(lst.slices[1])


def test_listing_memory_is_bounded_by_the_chunk_not_the_input(tmp_path, monkeypatch):
    """A JSON input many units long: the listing holds one chunk and one slice per unit."""
    monkeypatch.setattr(shared, "CHUNK", 256 << 10)
    path = tmp_path / "big.json"
    turn = "a fairly long answer about the picture " * 30
    with open(path, "w") as f:
        f.write("[")
        for i in range(12_000):
            f.write(("," if i else "") + json.dumps({"id": str(i), "image": f"{i}.jpg", "conversations": [
                {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": turn}]}))
        f.write("]")
    size = os.path.getsize(path)
    assert size > 12 << 20
    tracemalloc.start()
    try:
        lst = list_input(str(path), 100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert lst.count == 12_000 and len(lst.slices) == 120
    assert peak < size / 8, f"listing peaked at {peak / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB input"
    assert [r.source_id for r in read_slice(lst.slices[57])] == [str(i) for i in range(5700, 5800)]
