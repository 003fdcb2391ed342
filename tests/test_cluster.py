"""`generate` on real multi-process Ray clusters: a `ray start` head with token auth and a
job submitted with `ray job submit --working-dir .`, and a two-node cluster whose output
must equal the one-node run."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster

from pipeline.config import GenerateConfig
from pipeline.run import generate
from stages.samples.demo import write_sample_data
from stages.readers.validate import validate_output

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outputs_equal(a: Path, b: Path) -> None:
    names = sorted(p.name for p in (a / "shards").iterdir() if not p.name.endswith("_stats.json"))
    assert names == sorted(p.name for p in (b / "shards").iterdir() if not p.name.endswith("_stats.json"))
    for name in names:
        if name.endswith(".parquet"):
            assert pq.read_table(a / "shards" / name).equals(pq.read_table(b / "shards" / name)), name
        else:
            assert (a / "shards" / name).read_bytes() == (b / "shards" / name).read_bytes(), name


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    write_sample_data(root, n=12, seed=5)
    return root


def generate_args(tiny_model_config, demo: Path, out: Path) -> list[str]:
    return ["--input", str(demo / "llava.json"), "--image-root", str(demo), "--output", str(out),
            "--model", str(tiny_model_config), "--pretrained", "none", "--merge", "16",
            "--samples-per-shard", "4", "--image-format", "png", "--seed", "3"]


@pytest.mark.timeout(400)
def test_ray_job_submit_to_a_token_auth_head(tiny_model_config, demo, tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="mmray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_ADDRESS="")
    env.pop("RAY_ADDRESS")
    gcs, dashboard, agent_http, agent_grpc, runtime_env, metrics, client = (free_port() for _ in range(7))
    # Every port of the head is a free one: the agent's defaults (52365, ...) may be held by another
    # Ray on the machine, and a job agent that cannot bind answers "No available agent" for ever.
    start = [RAY, "start", "--head", f"--port={gcs}", "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
             "--disable-usage-stats"]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    try:
        out = tmp_path / "job-out"
        submit = [RAY, "job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--working-dir", str(REPO), "--",
                  sys.executable, "-m", "pipeline.cli", "generate", "--no-progress", *generate_args(tiny_model_config, demo, out)]
        deadline = time.monotonic() + 180  # the head's job agent comes up seconds after `ray start` returns
        while True:
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
            said = job.stdout + job.stderr
            if job.returncode == 0 or not any(m in said for m in ("No available agent", "Connection aborted",
                                                                   "Connection refused")) or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in (job.stdout + job.stderr).lower()
        assert validate_output(out) == []

        # The same command without the token is refused by the head.
        no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
        no_token["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "no-such-token")
        refused = subprocess.run([RAY, "job", "list", f"--address=http://127.0.0.1:{dashboard}"], env=no_token,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0

        # A local (embedded Ray) run of the same command gives the same bytes.
        local = tmp_path / "local-out"
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "generate", "--no-progress",
                               *generate_args(tiny_model_config, demo, local)],
                              env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                              capture_output=True, text=True, timeout=300, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs_equal(out, local)
    finally:
        stop_head(temp_dir, env["RAY_AUTH_TOKEN"])
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_head(temp_dir: str, token: str) -> None:
    """Kill the processes of this test's head only: their command lines name its temp dir, or
    (the agents retitle themselves "ray::DashboardAgent") their environment holds its token.
    `ray stop` would kill every Ray on the machine, other test runs' included."""
    marks = (temp_dir.encode(), f"RAY_AUTH_TOKEN={token}".encode())
    for _ in range(3):
        pids = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if marks[0] in (proc / "cmdline").read_bytes() or marks[1] in (proc / "environ").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not pids:
            return
        time.sleep(1)


@pytest.mark.timeout(400)
def test_two_node_cluster_equals_one_node(tiny_model_config, demo, tmp_path):
    cfg = dict(input=str(demo / "llava.json"), image_root=str(demo), model=str(tiny_model_config), pretrained="none",
               merge=16, samples_per_shard=4, image_format="png", seed=3, progress=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        two = tmp_path / "two"
        result = generate(GenerateConfig.build(cfg | {"output": str(two), "workers": 2}))
        assert result.ok
    finally:
        ray.shutdown()
        cluster.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        one = tmp_path / "one"
        generate(GenerateConfig.build(cfg | {"output": str(one), "workers": 1}))
    finally:
        ray.shutdown()
    assert validate_output(two) == []
    outputs_equal(two, one)
