"""`generate` and every reader against a real S3 server on 127.0.0.1 (SeaweedFS): inputs and
output in a bucket give the bytes a run on local disk gives; a killed driver resumes; the
lease and the ownership rules hold there; bad endpoints and buckets are one line each."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from typer.testing import CliRunner

from pipeline.faults import FAULTS_ENV
from pipeline.cli import app
from pipeline.config import GenerateConfig
from pipeline.run import generate
from stages.errors import UserError
from stages.output.lease import Lease
from stages.training.loader import ShardDataset
from stages.readers.preview import make_contact_sheet
from stages.readers.inspect import inspect_output
from stages.storage import open_store
from stages.readers.validate import validate_output
from tests.conftest import local_ray, sample_demo

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)
UNITS = 4  # 11 images + 1 text-only row, 3 per unit


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module", autouse=True)
def ray_local(faults):
    yield from local_ray({FAULTS_ENV: str(faults)})  # the hook reads it in the workers


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return sample_demo(tmp_path_factory, n=11, seed=8)


@pytest.fixture(scope="module")
def bucket_input(s3_server, demo) -> str:
    """The demo set uploaded: s3://mergemix-tests/object-store-input/{llava.json, images/...}."""
    fs = s3_server.filesystem()
    if not fs.exists("mergemix-tests"):
        fs.mkdir("mergemix-tests")
    fs.put(str(demo) + "/", "mergemix-tests/object-store-input/", recursive=True)
    return "s3://mergemix-tests/object-store-input"


def flags(tiny_model_config, input_, out, **kw) -> dict:
    return dict(input=str(input_), output=str(out), model=str(tiny_model_config), pretrained="none", merge=16,
                samples_per_shard=3, batch_size=4, image_format="png", progress=False, seed=2) | kw


@pytest.fixture(scope="module")
def local_reference(tiny_model_config, demo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    result = generate(GenerateConfig.build(flags(tiny_model_config, demo / "llava.json", out)))
    assert result.ok and result.units_written == UNITS
    return out


def shard_files(store) -> dict[str, bytes]:
    return {name: store.read_bytes(f"shards/{name}") for name in store.list("shards") if name.endswith(".tar")}


def rows(store) -> list[dict]:
    out = []
    for name in store.list("shards"):
        if name.endswith(".parquet"):
            out += pq.read_table(store.open_read(f"shards/{name}")).to_pylist()
    return out


def assert_same_as_local(store, local: Path) -> None:
    """Byte-identical tars and equal Parquet rows (the fingerprint does not depend on where
    the input lives)."""
    local_store = open_store(local)
    assert shard_files(store) == shard_files(local_store)
    assert rows(store) == rows(local_store)


def test_bucket_in_bucket_out_equals_disk(tiny_model_config, bucket_input, s3_server, s3_prefix, local_reference):
    out = f"s3://{s3_prefix}/out"
    cfg = GenerateConfig.build(flags(tiny_model_config, f"{bucket_input}/llava.json", out,
                                     storage_options=s3_server.storage_options))
    result = generate(cfg)
    assert result.ok and result.units_written == UNITS and result.counts == {"ok": 11, "failed": 0, "skipped": 1}
    store = open_store(out, s3_server.storage_options)
    assert_same_as_local(store, local_reference)
    run = json.loads(store.read_bytes("run.json"))
    assert "storage_options" not in run["config"] and s3_server.storage_options["secret"] not in store.read_bytes("run.json").decode()
    assert not store.exists(".mergemix-lease.json")  # released
    assert store.read_bytes("README.md") == (local_reference / "README.md").read_bytes()  # the dataset card

    # Every reader takes the URL.
    opts = s3_server.storage_options
    assert validate_output(out, opts) == []
    assert "inputs       12: ok 11" in inspect_output(out, opts)
    ds = ShardDataset(out, storage_options=opts)
    samples = list(ds)
    assert len(samples) == 11 and samples[0]["winner"].shape == (3, 64, 64)
    sheet = make_contact_sheet(out, 3, Path(s3_server.data) / "sheet.png", opts)
    assert sheet.is_file()
    cli = CliRunner().invoke(app, ["validate", out, "--storage-options", json.dumps(opts)])
    assert cli.exit_code == 0 and "is valid" in cli.output


def test_environment_credentials_and_a_local_input(tiny_model_config, demo, s3_server, s3_prefix, local_reference,
                                                   monkeypatch):
    """No --storage-options: endpoint and keys from AWS_* variables, as s3fs reads them (here
    in-process for the driver; the workers get them through the config they are sent)."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    out = f"s3://{s3_prefix}/out"
    cfg = GenerateConfig.build(flags(tiny_model_config, demo / "llava.json", out, storage_options=s3_server.storage_options))
    assert generate(cfg).ok
    assert_same_as_local(open_store(out), local_reference)  # read back with the environment's credentials


def test_ownership_and_the_lease_on_the_bucket(tiny_model_config, bucket_input, s3_server, s3_prefix):
    opts = s3_server.storage_options
    out = f"s3://{s3_prefix}/out"
    store = open_store(out, opts)
    foreign = {"shards/999999.tar": b"theirs", "shards/notes.parquet": b"theirs too", "notes.txt": b"keep",
               "README.md": b"their readme"}
    for name, data in foreign.items():
        store.write_bytes(name, data)
    cfg = dict(flags(tiny_model_config, f"{bucket_input}/llava.json", out, storage_options=opts))
    lease = Lease(store, "generate").acquire()  # another run holds the output
    try:
        with pytest.raises(UserError, match="is being written by another generate"):
            generate(GenerateConfig.build(cfg))
    finally:
        lease.release()
    assert generate(GenerateConfig.build(cfg)).ok
    assert generate(GenerateConfig.build(cfg | {"seed": 5, "overwrite": True})).ok
    assert {name: store.read_bytes(name) for name in foreign} == foreign  # left alone, twice
    assert validate_output(out, opts) == []


def test_driver_killed_mid_run_then_the_same_command(tiny_model_config, bucket_input, s3_server, s3_prefix, faults,
                                                     local_reference, tmp_path):
    opts = s3_server.storage_options
    out = f"s3://{s3_prefix}/out"
    for path in faults.iterdir():
        path.unlink()
    (faults / "hold-2").touch()  # park unit 2 so the kill lands mid-run
    args = ["generate", "--no-progress", "--storage-options", json.dumps(opts)]
    for key, value in flags(tiny_model_config, f"{bucket_input}/llava.json", out).items():
        if key != "progress":
            args += [f"--{key.replace('_', '-')}", str(value)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {FAULTS_ENV: str(faults)}
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=env, cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    store = open_store(out, opts)
    try:
        deadline = time.monotonic() + 200
        while not (store.exists("shards/000000_stats.json") and (faults / "attempts.log").exists()
                   and "2 " in (faults / "attempts.log").read_text()):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached unit 2"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        log.close()
        (faults / "hold-2").unlink()
    assert not store.exists("run.json") and store.exists(".mergemix-lease.json")  # the dead run's lease
    rerun = CliRunner().invoke(app, args)
    assert rerun.exit_code == 0, rerun.output[-3000:]
    assert "already committed" in rerun.stdout
    assert_same_as_local(store, local_reference)
    assert validate_output(out, opts) == []


def test_unreachable_endpoint_and_missing_bucket_are_one_line(tiny_model_config, demo, s3_server, tmp_path):
    runner = CliRunner()
    base = ["generate", "--input", str(demo / "llava.json"), "--model", str(tiny_model_config), "--pretrained", "none", "--merge", "16",
            "--no-progress"]
    closed = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
              "config_kwargs": {"retries": {"max_attempts": 1}}}
    for out, opts, needle in (("s3://mergemix-tests/x/out", closed, "cannot write to --output s3://mergemix-tests/x/out"),
                              ("s3://no-such-bucket-here/out", s3_server.storage_options, "cannot write to --output s3://no-such-bucket-here/out")):
        result = runner.invoke(app, base + ["--output", out, "--storage-options", json.dumps(opts)])
        assert result.exit_code == 2, result.output[-2000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and needle in last and "Traceback" not in result.output
    missing_input = runner.invoke(app, ["validate", "s3://no-such-bucket-here/out", "--storage-options",
                                        json.dumps(s3_server.storage_options)])
    assert missing_input.exit_code == 2 and "Traceback" not in missing_input.output
    assert missing_input.stderr.strip().count("\n") == 0


def test_image_keys_may_not_leave_the_image_root(tiny_model_config, s3_server, s3_prefix, demo):
    fs, opts = s3_server.filesystem(), s3_server.storage_options
    fs.put(str(demo / "images" / "00000.jpg"), f"{s3_prefix}/root/a.jpg")
    fs.put(str(demo / "images" / "00001.jpg"), f"{s3_prefix}/root/b.jpg")
    fs.put(str(demo / "images" / "00002.jpg"), f"{s3_prefix}/secret.jpg")
    manifest = [{"id": "a", "image": "a.jpg"}, {"id": "b", "image": "b.jpg"}, {"id": "up", "image": "../secret.jpg"},
                {"id": "abs", "image": f"/{s3_prefix}/secret.jpg"}, {"id": "url", "image": f"s3://{s3_prefix}/secret.jpg"},
                {"id": "missing", "image": "nope.jpg"}]
    fs.pipe(f"{s3_prefix}/in.jsonl", "\n".join(json.dumps(m) for m in manifest).encode())
    out = f"s3://{s3_prefix}/out"
    cfg = GenerateConfig.build(flags(tiny_model_config, f"s3://{s3_prefix}/in.jsonl", out, storage_options=opts,
                                     image_root=f"s3://{s3_prefix}/root", samples_per_shard=10))
    assert generate(cfg).ok
    got = {r["source_id"]: (r["status"], (r["error"] or "").split(":")[0]) for r in rows(open_store(out, opts))}
    assert got == {"a": ("ok", ""), "b": ("ok", ""), "up": ("failed", "path_outside_root"),
                   "abs": ("failed", "path_outside_root"), "url": ("failed", "path_outside_root"),
                   "missing": ("failed", "missing_file")}
    assert np.isfinite([r["lam"] for r in rows(open_store(out, opts)) if r["status"] == "ok"]).all()


def test_other_readers_read_the_bucket(tiny_model_config, bucket_input, s3_server, s3_prefix):
    """The URL forms the README gives for reading an output from a bucket: webdataset and wids
    over presigned HTTP URLs (curl), Ray Data through pyarrow's S3 file system."""
    import pyarrow.fs as pafs
    import webdataset as wds
    import wids

    opts = s3_server.storage_options
    out = f"s3://{s3_prefix}/out"
    assert generate(GenerateConfig.build(flags(tiny_model_config, f"{bucket_input}/llava.json", out,
                                               storage_options=opts))).ok
    fs, index = s3_server.filesystem(), json.loads(open_store(out, opts).read_bytes("index.json"))
    urls = [fs.url(f"{s3_prefix}/out/{entry['url']}", expires=600) for entry in index["shardlist"]]
    assert all(u.startswith("http://127.0.0.1:") for u in urls)

    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb"))
    assert len(samples) == 11 and samples[0]["winner.png"].shape == (64, 64, 3)

    shards = [{"url": u, "nsamples": e["nsamples"]} for u, e in zip(urls, index["shardlist"])]
    ds = wids.ShardListDataset(shards, cache_dir=str(Path(s3_server.data) / "wids-cache"))
    assert len(ds) == 11 and ds[4][".json"]["key"].startswith("0000")

    endpoint = s3_server.endpoint.removeprefix("http://")
    s3 = pafs.S3FileSystem(access_key=opts["key"], secret_key=opts["secret"], endpoint_override=endpoint,
                           scheme="http", region="us-east-1")
    tars = [f"{s3_prefix}/out/{entry['url']}" for entry in index["shardlist"]]
    rows_ = ray.data.read_webdataset(tars, filesystem=s3).take_all()
    assert len(rows_) == 11
