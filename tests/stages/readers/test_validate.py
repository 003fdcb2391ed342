"""validate and inspect, as functions and through the real `mergemix-pipeline` console script."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.shard import ARROW_SCHEMA
from stages.errors import UserError
from stages.readers.inspect import inspect_output
from stages.readers.validate import validate_output
from tests.shard_fixtures import make_output

CLI = str(Path(sys.executable).with_name("mergemix-pipeline"))


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture
def out(tmp_path):
    return make_output(tmp_path / "out", units=(0, 1), image_format="png")


def _rewrite_tar(path: Path, edit) -> None:
    """Rewrite a tar with edit(list of (name, bytes)) -> list of (name, bytes)."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in edit(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_fresh_output_is_valid(out):
    assert validate_output(out) == []


def test_truncated_tar(out):
    tar = out / "shards" / "000001.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    problems = validate_output(out)
    assert "shards/000001.tar: 5000 bytes, stats say 61440 (truncated or replaced)" in problems
    assert any(p.startswith("shards/000001.tar: unreadable after") and "corrupt" in p for p in problems)
    assert not any("shards/000000" in p for p in problems)  # the healthy unit is not blamed


def test_missing_stats_file(out):
    (out / "shards" / "000001_stats.json").unlink()
    problems = validate_output(out)
    assert "shards/000001.parquet: no 000001_stats.json, so the unit is not committed (interrupted write); resume `generate`" in problems
    assert any(p.startswith("shards/000001.tar: no 000001_stats.json") for p in problems)
    assert "index.json: lists shards/000001.tar, which is not a committed unit" in problems


def test_row_without_members(out):
    _rewrite_tar(out / "shards" / "000000.tar", lambda ms: [m for m in ms if not m[0].startswith("000000_000003.")])
    problems = validate_output(out)
    assert "shards/000000.tar: parquet row 000000_000003 (ok) has no members in the tar" in problems
    assert "shards/000000.tar: 3 samples, stats say 4" in problems


def test_member_without_row_and_partial_sample(out):
    def edit(ms):
        ms = [m for m in ms if m[0] != "000000_000001.loser.png"]
        return ms + [("000000_000099.json", b"{}"), ("000000_000002.winner.png", ms[0][1])]  # 000002 failed

    _rewrite_tar(out / "shards" / "000000.tar", edit)
    problems = validate_output(out)
    assert "shards/000000.tar: member 000000_000099.json has no parquet row" in problems
    assert "shards/000000.tar: sample 000000_000001 lacks members ['000000_000001.loser.png']" in problems
    assert "shards/000000.tar: members of 000000_000002 present, but its parquet row is failed" in problems


def test_hash_mismatch_record_mismatch_and_duplicate_member(out):
    def edit(ms):
        d = dict(ms)
        d["000001_000000.winner.png"] = d["000001_000001.winner.png"]  # valid PNG, wrong content
        rec = json.loads(d["000001_000003.json"])
        d["000001_000003.json"] = json.dumps(dict(rec, lam=0.123)).encode()
        return list(d.items()) + [("000001_000005.mask.png", d["000001_000005.mask.png"])]

    _rewrite_tar(out / "shards" / "000001.tar", edit)
    problems = validate_output(out)
    assert any(p.startswith("shards/000001.tar: 000001_000000.winner.png sha256") for p in problems)
    assert "shards/000001.tar: 000001_000003.json differs from its parquet row in ['lam']" in problems
    assert "shards/000001.tar: duplicate member 000001_000005.mask.png" in problems


def test_duplicate_keys_across_units_and_wrong_schema_version(out):
    pq_path = out / "shards" / "000001.parquet"
    table = pq.read_table(pq_path)
    keys = table["key"].to_pylist()
    keys[0] = "000000_000000"
    table = table.set_column(table.schema.get_field_index("key"), ARROW_SCHEMA.field("key"), pa.array(keys))
    pq.write_table(table, pq_path)
    problems = validate_output(out)
    assert "shards/000001.parquet: duplicate key 000000_000000 (also in unit 000000)" in problems

    pq.write_table(table.replace_schema_metadata({b"mergemix.schema_version": b"9.0"}), pq_path)
    problems = validate_output(out)
    assert any("000001.parquet has schema version 9.0" in p for p in problems)
    with pytest.raises(UserError, match=r"schema version 9\.0, this mergemix-pipeline reads 1\.x"):
        inspect_output(out)


def test_missing_run_files_and_leftover_temp_file(out):
    (out / "index.json").unlink()
    (out / "run.json").unlink()
    (out / "shards" / ".000002.tar.abcdef012345.tmp").write_bytes(b"x")
    problems = validate_output(out)
    assert problems == [
        "shards/.000002.tar.abcdef012345.tmp: leftover temporary file of an interrupted write (resuming `generate` removes it)",
        "index.json: missing (the run did not finish); rerun `generate` to resume and write it",
        "run.json: missing (the run did not finish); rerun `generate` to resume and write it",
    ]


def test_cli_validate_inspect_exit_codes_and_one_line_errors(out, tmp_path):
    r = cli("validate", out)
    assert r.returncode == 0 and "is valid" in r.stdout, r.stderr
    r = cli("inspect", out)
    assert r.returncode == 0 and "inputs       12" in r.stdout

    tar = out / "shards" / "000000.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    r = cli("validate", out)
    assert r.returncode == 1 and "shards/000000.tar: 3000 bytes, stats say" in r.stdout
    assert "problem(s)" in r.stderr and "Traceback" not in r.stderr

    for args in (("validate", tmp_path / "missing"), ("inspect", tmp_path / "missing")):
        r = cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ") and "does not exist" in r.stderr

    pq_path = out / "shards" / "000001.parquet"
    pq.write_table(pq.read_table(pq_path).replace_schema_metadata({b"mergemix.schema_version": b"2.0"}), pq_path)
    r = cli("inspect", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert "schema version 2.0" in r.stderr

    pq_path.write_bytes(b"PAR1 garbage")
    r = cli("inspect", out)
    assert r.returncode == 2 and "not a readable Parquet file" in r.stderr and "Traceback" not in r.stderr
