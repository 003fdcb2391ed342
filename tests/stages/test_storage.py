"""The output store (stages.storage) behaves the same on local disk, in memory (fsspec) and on
a real S3 server: listing, atomic writes, aborted writes leave nothing, exclusive create; and
the lease works on S3 as on disk."""
from __future__ import annotations

import pytest

from stages.errors import UserError
from stages.output.lease import Lease
from stages.readers.output_state import read_lease
from stages.storage import FsspecStore, LocalStore, is_transient, open_store

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["local", "memory", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "out")
    if request.param == "memory":
        return open_store(f"memory://{tmp_path.name}/out")
    server, prefix = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_prefix")
    return open_store(f"s3://{prefix}/out", server.storage_options)


def test_write_read_list_delete(store):
    store.makedirs("shards")
    store.write_bytes("run.json", b"{}")
    store.write_bytes("shards/000000.tar", b"tar")
    store.write_bytes("shards/sub/x.tar", b"deeper")
    assert store.list() == ["run.json"] and store.list("shards") == ["000000.tar"] and store.list("nope") == []
    assert store.read_bytes("shards/000000.tar") == b"tar" and store.size("shards/000000.tar") == 3
    assert store.exists("run.json") and not store.exists("index.json")
    with store.open_read("shards/sub/x.tar") as f:
        f.seek(2)
        assert f.read(3) == b"epe"
    store.delete("run.json")
    store.delete("run.json")  # already gone: fine
    assert store.list() == [] and not store.exists("run.json")


def test_a_writer_commits_whole_or_leaves_nothing(store):
    store.makedirs("shards")
    payload = bytes(range(256)) * (12 * 4096)  # 12 MiB: a multipart upload on S3
    with store.writer("shards/000001.tar") as f:
        for i in range(0, len(payload), 1 << 20):
            f.write(payload[i:i + (1 << 20)])
    assert store.read_bytes("shards/000001.tar") == payload
    with pytest.raises(RuntimeError):
        with store.writer("shards/000002.tar") as f:
            f.write(payload)
            raise RuntimeError("the producer failed")
    assert store.list("shards") == ["000001.tar"]


def test_create_exclusive(store):
    assert store.create_exclusive("lease.json", b"first")
    assert not store.create_exclusive("lease.json", b"second")
    assert store.read_bytes("lease.json") == b"first"


def test_lease_on_the_store(store):
    first = Lease(store, "generate", interval=60).acquire()
    try:
        with pytest.raises(UserError, match="being written by another generate"):
            Lease(store, "generate").acquire()
    finally:
        first.release()
    assert read_lease(store) is None


def test_transient_errors_are_told_from_facts():
    class EndpointConnectionError(Exception):
        pass

    assert is_transient(EndpointConnectionError("Could not connect")) and is_transient(ConnectionResetError())
    assert is_transient(OSError("An error occurred (SlowDown): Please reduce your request rate"))
    assert not is_transient(FileNotFoundError("The specified bucket does not exist"))
    assert not is_transient(PermissionError("Access Denied"))


def test_urls_pick_the_store(tmp_path):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert open_store(f"file://{tmp_path}").root == tmp_path
    assert isinstance(open_store("memory://x/y"), FsspecStore)


def test_the_commit_protocol_in_memory(tmp_path):
    """write_unit on an object store (memory://): tar and Parquet under their final names, the
    stats object last; a unit without its stats is a leftover that a resume removes."""
    from stages.readers.output_state import committed_units, leftovers
    from stages.output.cleanup import remove_leftovers
    from stages.output.writer import write_unit
    from tests.shard_fixtures import unit_rows

    store = open_store(f"memory://{tmp_path.name}/commit")
    for unit in (0, 1):
        rows, images = unit_rows(unit, 4)
        write_unit(store, unit, rows, images, image_format="png", fingerprint="fp")
    assert set(committed_units(store)) == {0, 1}
    assert store.list("shards") == ["000000.parquet", "000000.tar", "000000_stats.json",
                                    "000001.parquet", "000001.tar", "000001_stats.json"]
    store.delete("shards/000001_stats.json")  # killed between the tar/parquet and the commit
    store.write_bytes("shards/999999.tar", b"someone else's")
    assert set(committed_units(store)) == {0}
    assert leftovers(store, range(2)) == ["shards/000001.parquet", "shards/000001.tar"]
    remove_leftovers(store, range(2))
    assert store.list("shards") == ["000000.parquet", "000000.tar", "000000_stats.json", "999999.tar"]


def test_merge_and_attn_layer_are_checked_against_the_tower_before_any_worker(tiny_model_config):
    from pipeline.config import GenerateConfig
    from pipeline.run import check_merging
    from stages.model.tower import resolve_tower

    tower = resolve_tower(str(tiny_model_config), "none")
    base = dict(input="x.json", output="out", model=str(tiny_model_config), pretrained="none")
    check_merging(GenerateConfig.build(base | {"merge": 16}), tower)
    with pytest.raises(UserError, match="cannot merge 288 of 64 patch tokens"):
        check_merging(GenerateConfig.build(base), tower)
    with pytest.raises(UserError, match="--attn-layer 9 is outside the tower's 4 blocks"):
        check_merging(GenerateConfig.build(base | {"merge": 0, "attn_layer": 9}), tower)


def test_transient_errors_are_retried_and_facts_are_not(monkeypatch):
    from stages import storage

    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "done"

    assert storage.read_with_retries(flaky) == "done" and len(calls) == 3

    def denied():
        calls.append(1)
        raise PermissionError("Access Denied")

    calls.clear()
    with pytest.raises(PermissionError):
        storage.read_with_retries(denied)
    assert len(calls) == 1  # a fact is not retried
