"""Ray scheduling decisions that need no Ray: sizing from a cluster's resources, units in
flight, and which errors stop a run; and the resume check of pipeline.run on a real store."""
from __future__ import annotations

import errno

import pytest

from pipeline.config import GenerateConfig
from pipeline.distribute import Sizing, size_from_cluster, storage_error, units_in_flight
from pipeline.run import check_output
from stages.errors import UserError, one_line
from stages.storage import LocalStore
from tests.shard_fixtures import make_output


def test_cpu_cluster_splits_cpus_between_actors_and_tasks():
    s = size_from_cluster({"CPU": 2.0}, None, "auto")
    assert s == Sizing(actors=1, actor_cpus=1.0, actor_gpus=0.0, task_cpus=0.5, device="cpu", threads=1)
    s = size_from_cluster({"CPU": 16.0}, 2, "auto")
    assert s.actors == 2 and s.actor_cpus == 4.0 and s.task_cpus == 1.0 and s.device == "cpu"
    assert s.actors * s.actor_cpus <= 16  # never more than exist, so nothing waits forever for a CPU


def test_gpu_cluster_gives_one_actor_per_gpu():
    s = size_from_cluster({"CPU": 16.0, "GPU": 2.0}, None, "auto")
    assert (s.actors, s.actor_gpus, s.device, s.threads) == (2, 1.0, "cuda", 4) and s.actor_cpus == 1.0
    assert size_from_cluster({"CPU": 16.0, "GPU": 2.0}, None, "cpu").device == "cpu"  # asked for CPU
    with pytest.raises(UserError, match="no GPU"):
        size_from_cluster({"CPU": 4.0}, None, "cuda")


def test_units_in_flight_keep_every_cpu_busy_and_at_least_two_per_actor():
    gpu = size_from_cluster({"CPU": 16.0, "GPU": 1.0}, None, "auto")
    assert units_in_flight({"CPU": 16.0}, gpu, 1) == 16  # 16 one-CPU task slots, one actor
    cpu = size_from_cluster({"CPU": 2.0}, None, "auto")
    assert units_in_flight({"CPU": 2.0}, cpu, 1) == 4
    assert units_in_flight({"CPU": 1.0}, Sizing(4, 0.1, 0, 1.0, "cpu", 1), 4) == 2


def test_storage_errors_stop_the_run_others_are_retried():
    assert storage_error(OSError(errno.ENOSPC, "No space left on device"))
    assert storage_error(PermissionError(errno.EACCES, "denied"))
    assert not storage_error(RuntimeError("injected fault"))
    assert not storage_error(OSError(errno.ECONNRESET, "reset"))
    assert storage_error(PermissionError("Access Denied."))  # s3fs: no errno
    assert storage_error(OSError("An error occurred (QuotaExceeded) when calling PutObject"))

    from ray.exceptions import RayTaskError

    def raised_in(function: str, cause: BaseException):
        return RayTaskError(function, "traceback", cause)

    assert storage_error(raised_in("pipeline.tasks.write", OSError(errno.ENOSPC, "full")))
    assert not storage_error(raised_in("pipeline.tasks.prepare", PermissionError("input not readable")))
    assert one_line(RuntimeError("first\nlast line")) == "RuntimeError: last line"


def cfg(**kw) -> GenerateConfig:
    return GenerateConfig.build(dict(input="x.json", output="out", pretrained="none", model="ViT-B-32") | kw)


def test_check_output_resumes_the_same_fingerprint_and_refuses_another(tmp_path):
    out = make_output(tmp_path / "out", units=(0, 1))  # fingerprint "fp-test"
    store = LocalStore(out)
    check_output(store, cfg(), "fp-test", range(2))  # same: resume
    with pytest.raises(UserError, match="different configuration .*--overwrite"):
        check_output(store, cfg(), "fp-other", range(2))
    check_output(store, cfg(overwrite=True), "fp-other", range(2))
    assert sorted(p.name for p in (out / "shards").iterdir()) == [] and not (out / "run.json").exists()
    check_output(LocalStore(tmp_path / "new"), cfg(), "fp-new", range(3))  # nothing there yet: fine
