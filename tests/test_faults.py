"""Faults a days-long run on preemptible nodes meets: a killed driver, a killed encoder actor,
an exception inside one unit, a full or read-only disk, a resume with another config.

Faults inside workers come from the test-only hook in pipeline/actor.py (MERGEMIX_TEST_FAULTS
names a folder; files in it make a unit raise, kill its actor once, or park it). Every
recovered run is compared with an uninterrupted one: same Parquet rows, same tar bytes.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import GenerateConfig
from pipeline.faults import FAULTS_ENV
from pipeline.distribute import UNIT_RETRIES
from pipeline.run import generate
from stages.errors import UserError
from stages.readers.validate import validate_output
from tests.conftest import local_ray, sample_demo

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)  # every test here runs with the module's Ray up
UNITS = 5  # 12 images + 1 text-only row, 3 per shard


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module", autouse=True)
def ray_local(faults):
    yield from local_ray({FAULTS_ENV: str(faults)})  # the hook reads it in the workers


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return sample_demo(tmp_path_factory, n=12, seed=11)


def flags(tiny_model_config, demo: Path, out: Path) -> dict:
    return dict(input=str(demo / "llava.json"), image_root=str(demo), output=str(out), model=str(tiny_model_config),
                pretrained="none", merge=16, samples_per_shard=3, batch_size=4, image_format="png", seed=5,
                progress=False)


def cli_args(tiny_model_config, demo: Path, out: Path, **extra) -> list[str]:
    """`generate` flags; prefix with `python -m pipeline.cli` for a subprocess of its own."""
    args = ["generate"]
    for key, value in (flags(tiny_model_config, demo, out) | extra).items():
        if key == "progress":
            args.append("--no-progress")
        elif value is True:
            args.append(f"--{key.replace('_', '-')}")
        else:
            args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def run_cli(args: list[str]):
    """The CLI in this process, on the module's Ray (saves a Ray start per call)."""
    return CliRunner().invoke(app, args, catch_exceptions=False)


PYTHON_CLI = [sys.executable, "-m", "pipeline.cli"]


def cli_env(faults: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", FAULTS_ENV)}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if faults is not None:
        env[FAULTS_ENV] = str(faults)
    return env


@pytest.fixture(scope="module")
def reference(tiny_model_config, demo, tmp_path_factory) -> Path:
    """The uninterrupted run every recovered run must equal."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = generate(GenerateConfig.build(flags(tiny_model_config, demo, out)))
    assert result.ok and result.units_written == UNITS
    return out


def assert_same_output(out: Path, ref: Path) -> None:
    """Same shard files; Parquet tables equal; tars byte-identical; validate finds nothing."""
    names = sorted(p.name for p in (out / "shards").iterdir())
    assert names == sorted(p.name for p in (ref / "shards").iterdir())
    for name in names:
        if name.endswith(".parquet"):
            assert pq.read_table(out / "shards" / name).equals(pq.read_table(ref / "shards" / name)), name
        elif name.endswith(".tar"):
            assert (out / "shards" / name).read_bytes() == (ref / "shards" / name).read_bytes(), name
    assert json.loads((out / "index.json").read_text())["shardlist"] == json.loads((ref / "index.json").read_text())["shardlist"]
    assert validate_output(out) == []


def attempts(faults: Path) -> Counter:
    """unit id -> number of encoder attempts, from the hook's log; and the pids that ran them."""
    log = faults / "attempts.log"
    lines = log.read_text().split() if log.exists() else []
    return Counter(int(u) for u in lines[0::2])


def attempt_pids(faults: Path, unit: int) -> list[int]:
    lines = (faults / "attempts.log").read_text().splitlines()
    return [int(p) for u, p in (line.split() for line in lines) if int(u) == unit]


@pytest.fixture
def clean_faults(faults):
    for path in faults.iterdir():
        path.unlink()
    yield faults
    for path in faults.iterdir():
        path.unlink()


# --- the driver dies -------------------------------------------------------------------------


def _session_processes(sid: int) -> list[int]:
    """Live processes of session `sid` (from /proc: field 6 of stat, after the command name)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.timeout(300)
def test_driver_sigkill_then_same_command_equals_uninterrupted_run(tiny_model_config, demo, reference, tmp_path):
    out, faults = tmp_path / "out", tmp_path / "faults"
    faults.mkdir()
    (faults / "hold-2").touch()  # park unit 2 in its actor, so the kill lands mid-run for sure
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(PYTHON_CLI + cli_args(tiny_model_config, demo, out), env=cli_env(faults), cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 200
        while not ((out / "shards" / "000000_stats.json").exists() and attempts(faults)[2]):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached unit 2"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Ray process it started
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _session_processes(proc.pid) == [], "Ray processes of the killed run survived"
    finally:
        log.close()
        for pid in _session_processes(proc.pid):  # only processes of the session this test started
            os.kill(pid, signal.SIGKILL)

    committed = sorted(p.name for p in (out / "shards").glob("*_stats.json"))
    assert 1 <= len(committed) < UNITS and not (out / "run.json").exists()
    problems = validate_output(out)
    assert problems and all(p.startswith(("index.json", "run.json", "shards/.", "shards/0")) for p in problems), problems
    # Whatever the kill left, nothing committed is broken: only run files and uncommitted leftovers are reported.
    assert not [p for p in problems if "stats say" in p or "sha256" in p or "differs" in p], problems

    rerun = run_cli(cli_args(tiny_model_config, demo, out))  # the same command again
    assert rerun.exit_code == 0, rerun.output[-3000:]
    assert f"{len(committed)} already committed" in rerun.stdout
    assert_same_output(out, reference)


# --- faults inside workers -------------------------------------------------------------------


@pytest.mark.timeout(200)
def test_killed_encoder_actor_is_replaced_and_output_is_identical(tiny_model_config, demo, reference, clean_faults, tmp_path):
    """The actor is SIGKILLed once on every unit: more deaths than a fixed restart budget would
    allow (preemptible nodes take actors down again and again over a days-long run)."""
    for unit in range(UNITS):
        (clean_faults / f"kill-{unit}").touch()
    out = tmp_path / "out"
    result = generate(GenerateConfig.build(flags(tiny_model_config, demo, out)))
    assert result.failed_units == {}
    for unit in range(UNITS):
        assert (clean_faults / f"killed-{unit}").exists()  # the actor really died (SIGKILL) on this unit
        pids = attempt_pids(clean_faults, unit)
        assert len(set(pids)) >= 2  # and the unit ran again in a new actor process
    assert result.ok and result.units_written == UNITS
    assert_same_output(out, reference)


@pytest.mark.timeout(200)
def test_unit_that_keeps_raising_is_retried_then_recorded_and_resumed(tiny_model_config, demo, reference, clean_faults, tmp_path):
    (clean_faults / "raise-2").touch()
    out = tmp_path / "out"
    cfg = GenerateConfig.build(flags(tiny_model_config, demo, out))
    result = generate(cfg)
    assert attempts(clean_faults)[2] == 1 + UNIT_RETRIES  # bounded retries
    assert not result.ok and list(result.failed_units) == [2]
    assert "RuntimeError: injected fault in unit 2" in result.failed_units[2]
    assert result.units_written == UNITS - 1
    run = json.loads((out / "run.json").read_text())
    assert run["failed_units"] == {"2": result.failed_units[2]}
    assert not (out / "shards" / "000002.tar").exists() and validate_output(out) == []

    (clean_faults / "raise-2").unlink()  # the cause goes away: the same command fills the gap
    again = generate(cfg)
    assert again.ok and again.units_written == 1 and again.units_skipped == UNITS - 1
    assert json.loads((out / "run.json").read_text())["failed_units"] == {}
    assert_same_output(out, reference)


@pytest.mark.timeout(200)
def test_cli_exit_code_says_a_unit_failed(tiny_model_config, demo, clean_faults, tmp_path):
    (clean_faults / "raise-0").touch()
    out = tmp_path / "out"
    proc = run_cli(cli_args(tiny_model_config, demo, out))
    assert proc.exit_code == 1, proc.output[-3000:]
    assert "failed unit 0" in proc.stdout and "injected fault in unit 0" in proc.stdout
    assert json.loads((out / "run.json").read_text())["failed_units"].keys() == {"0"}


# --- storage ---------------------------------------------------------------------------------


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    if not shutil.which("mount"):
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()[:100]})")


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


def _leftovers(out: Path) -> list[str]:
    """Temp files, and tars/parquets of units without a commit marker."""
    sdir = out / "shards"
    committed = {p.name[:6] for p in sdir.glob("*_stats.json")}
    return [p.name for p in sdir.iterdir() if p.name.startswith(".") or p.name[:6] not in committed]


@pytest.mark.timeout(200)
def test_disk_full_stops_with_a_clear_error_and_resumes_after(tiny_model_config, demo, reference, clean_faults, tmp_path):
    mnt = tmp_path / "small"
    _mount_tmpfs(mnt, "1m")
    try:
        out = mnt / "out"
        (out / "shards").mkdir(parents=True)
        # Leave room for about one and a half units (tmpfs counts whole 4 KiB pages).
        pages = lambda p: -(-p.stat().st_size // 4096) * 4096  # noqa: E731
        unit0 = sum(pages(p) for p in (reference / "shards").glob("000000*"))
        unit1 = sum(pages(p) for p in (reference / "shards").glob("000001*"))
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        filler = mnt / "filler"
        filler.write_bytes(b"\0" * (free - unit0 - unit1 // 2 - 4096))
        cfg = GenerateConfig.build(flags(tiny_model_config, demo, out))
        with pytest.raises(UserError) as err:
            generate(cfg)
        message = str(err.value)
        assert "\n" not in message and "No space left on device" in message and "rerun the same command" in message
        assert _leftovers(out) == []  # no temp file, no tar or parquet without its commit marker
        committed = sorted((out / "shards").glob("*_stats.json"))
        assert 1 <= len(committed) < UNITS
        problems = validate_output(out)  # committed units are whole; only the run files are missing
        assert problems and all(p.startswith(("index.json", "run.json")) for p in problems), problems

        filler.unlink()
        result = generate(cfg)
        assert result.ok and result.units_skipped == len(committed)
        assert_same_output(out, reference)
    finally:
        _umount(mnt)


@pytest.mark.timeout(200)
def test_unwritable_output_is_one_clear_line(tiny_model_config, demo, tmp_path):
    # As root, permission bits do not stop writes: use a path under a regular file, and a read-only mount.
    (tmp_path / "a-file").write_text("x")
    proc = subprocess.run(PYTHON_CLI + cli_args(tiny_model_config, demo, tmp_path / "a-file" / "out"), env=cli_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write to --output") and "Not a directory" in last

    mnt = tmp_path / "ro"
    _mount_tmpfs(mnt, "1m")
    try:
        (mnt / "out").mkdir()
        remount = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True)
        if remount.returncode != 0:
            pytest.skip("cannot remount read-only here")
        for out in (mnt / "out", mnt / "new" / "out"):
            with pytest.raises(UserError, match="cannot write to --output .*Read-only file system"):
                generate(GenerateConfig.build(flags(tiny_model_config, demo, out)))
    finally:
        _umount(mnt)


# --- resume with another config --------------------------------------------------------------


@pytest.mark.timeout(200)
def test_resume_with_another_config_is_refused_and_overwrite_is_explicit(tiny_model_config, demo, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    proc = run_cli(cli_args(tiny_model_config, demo, out, seed=6))
    assert proc.exit_code == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "different configuration" in last and "--overwrite" in last
    assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == before  # nothing touched

    # Keys that do not change the output (workers, batch size) resume; nothing is redone.
    same = generate(GenerateConfig.build(flags(tiny_model_config, demo, out) | {"workers": 2, "batch_size": 2}))
    assert same.units_written == 0 and same.units_skipped == UNITS
    assert_same_output(out, reference)

    redone = generate(GenerateConfig.build(flags(tiny_model_config, demo, out) | {"seed": 6, "overwrite": True}))
    assert redone.ok and redone.units_written == UNITS and validate_output(out) == []
    assert pq.read_table(out / "shards" / "000000.parquet")["lam"] != pq.read_table(reference / "shards" / "000000.parquet")["lam"]


# --- units that make no progress -------------------------------------------------------------


@pytest.mark.timeout(200)
def test_a_stalled_unit_is_cancelled_retried_and_the_output_is_identical(tiny_model_config, demo, reference, clean_faults,
                                                                         tmp_path):
    (clean_faults / "stall-1").touch()  # the first attempt of unit 1 hangs in the actor for 300 s
    out = tmp_path / "out"
    result = generate(GenerateConfig.build(flags(tiny_model_config, demo, out) | {"unit_timeout": 8}))
    assert result.ok and result.units_written == UNITS
    assert (clean_faults / "stalled-1").exists() and attempts(clean_faults)[1] == 2
    assert len(set(attempt_pids(clean_faults, 1))) == 2  # the stuck actor was replaced
    assert_same_output(out, reference)


@pytest.mark.timeout(300)
def test_a_unit_that_stalls_every_time_is_recorded_and_the_run_ends(tiny_model_config, demo, clean_faults, tmp_path):
    (clean_faults / "hold-3").touch()
    out = tmp_path / "out"
    result = generate(GenerateConfig.build(flags(tiny_model_config, demo, out) | {"unit_timeout": 10}))
    assert attempts(clean_faults)[3] == 1 + UNIT_RETRIES, result.failed_units
    assert list(result.failed_units) == [3] and result.units_written == UNITS - 1
    assert result.failed_units[3] == "timeout: no progress for 10 s while in the encoder actor"
    assert json.loads((out / "run.json").read_text())["failed_units"] == {"3": result.failed_units[3]}
    assert validate_output(out) == []


# --- one run per output ----------------------------------------------------------------------


@contextmanager
def held_run(tiny_model_config, demo, out, faults, log_path):
    """A `generate` in its own process, parked in unit 2 once unit 0 is committed; killed on the
    way out if it is still running."""
    (faults / "hold-2").touch()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(PYTHON_CLI + cli_args(tiny_model_config, demo, out), env=cli_env(faults), cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 200
            while not ((out / "shards" / "000000_stats.json").exists() and attempts(faults)[2]):
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "the run never reached unit 2"
                time.sleep(0.1)
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.timeout(300)
def test_a_second_run_on_the_same_output_is_refused_naming_the_first(tiny_model_config, demo, reference, tmp_path):
    out, faults = tmp_path / "out", tmp_path / "faults"
    faults.mkdir()
    with held_run(tiny_model_config, demo, out, faults, tmp_path / "first.log") as proc:
        for extra in ({"seed": 6}, {}):  # another config, and the very same command
            second = run_cli(cli_args(tiny_model_config, demo, out, **extra))
            assert second.exit_code == 2, second.output[-2000:]
            last = second.stderr.strip().splitlines()[-1]
            assert "is being written by another generate" in last and f"pid {proc.pid}" in last, last
        (faults / "hold-2").unlink()
        assert proc.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert_same_output(out, reference)  # the first run's output, untouched by the refused ones


@pytest.mark.timeout(300)
def test_sigint_says_one_line_and_the_rerun_completes(tiny_model_config, demo, reference, tmp_path):
    out, faults = tmp_path / "out", tmp_path / "faults"
    faults.mkdir()
    with held_run(tiny_model_config, demo, out, faults, tmp_path / "run.log") as proc:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 130, (tmp_path / "run.log").read_text()[-3000:]
    text = (tmp_path / "run.log").read_text()
    after = text[text.index("interrupted:"):]
    assert "Traceback" not in text and "Unhandled error" not in text and len(after.strip().splitlines()) == 1, after
    assert not (out / ".mergemix-lease.json").exists()  # released on the way out
    (faults / "hold-2").unlink()
    rerun = run_cli(cli_args(tiny_model_config, demo, out))
    assert rerun.exit_code == 0, rerun.output[-3000:]
    assert_same_output(out, reference)
