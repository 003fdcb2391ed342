"""The prepare task's reading (stages.inputs.files): image files confined to the root, only regular
files and never a blocking open, records of a slice with their text."""
from __future__ import annotations

import os

import pytest

from stages.inputs import files
from stages.inputs.records import InputError, clean_text
from stages.inputs.files import load_image_bytes, read_image_file, resolve_inside


def test_regular_files_are_read_everything_else_is_a_reason(tmp_path, monkeypatch):
    (tmp_path / "a.jpg").write_bytes(b"jpeg bytes")
    os.mkfifo(tmp_path / "fifo.jpg")
    (tmp_path / "dir.jpg").mkdir()
    assert read_image_file(tmp_path / "a.jpg", "a.jpg") == b"jpeg bytes"
    for name, reason in (("fifo.jpg", "not_a_file"), ("dir.jpg", "not_a_file"), ("nope.jpg", "missing_file")):
        with pytest.raises(InputError) as err:
            read_image_file(tmp_path / name, name)
        assert err.value.reason == reason
    monkeypatch.setattr(files, "MAX_FILE_BYTES", 4)
    with pytest.raises(InputError, match="too_large"):
        read_image_file(tmp_path / "a.jpg", "a.jpg")


def test_paths_never_leave_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret.jpg").write_bytes(b"s")
    os.symlink(tmp_path / "secret.jpg", root / "link.jpg")
    assert resolve_inside(root, "sub/x.jpg") == root / "sub" / "x.jpg"
    for bad in ("../secret.jpg", "sub/../../secret.jpg", str(tmp_path / "secret.jpg"), "~/secret.jpg", "link.jpg"):
        with pytest.raises(InputError) as err:
            resolve_inside(root, bad)
        assert err.value.reason == "path_outside_root", bad
    with pytest.raises(InputError, match="no_image_root"):
        load_image_bytes(("file", "a.jpg"), None)


def test_tar_members_are_read_in_place(tmp_path):
    data = b"0123456789abcdef"
    (tmp_path / "t.tar").write_bytes(data)
    cache = {}
    assert load_image_bytes(("tar", str(tmp_path / "t.tar"), 4, 6, "x.jpg"), None, cache) == b"456789"
    with pytest.raises(InputError, match="cut short"):
        load_image_bytes(("tar", str(tmp_path / "t.tar"), 10, 100, "y.jpg"), None, cache)
    files.close_handles(cache)


def test_text_that_cannot_be_stored_is_repaired():
    repaired = clean_text("ok \ud800 there")
    assert repaired.encode("utf-8") and repaired.startswith("ok \ufffd") and repaired.endswith(" there")
    assert clean_text("caf\u00e9") == "caf\u00e9" and clean_text(None) is None
