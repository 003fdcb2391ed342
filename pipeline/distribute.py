"""Ray scheduling for `generate`: connect, size actors and tasks from the cluster, and drive
units through prepare task -> encoder actor -> write task with retries and timeouts.

Each unit is one attempt at a time. Its clock runs while it can make progress: from its
submission while its prepare task runs; while it is first in its actor's queue with its
pixels ready (an actor runs its calls in order, so units behind it are waiting, not stuck);
and while its write task runs. An attempt whose clock passes `unit_timeout` is cancelled
(the prepare or write task's worker is killed; a stuck actor is killed and Ray restarts it)
and counts as a failed attempt: the unit is retried, and after `UNIT_RETRIES` retries it is
recorded as failed with the reason. So a FIFO, a hung NFS read, a wedged GPU or a lost
object can cost a unit, never the run.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ray

from stages.errors import UserError, one_line

UNITS_IN_FLIGHT_PER_ACTOR = 2  # at least: one being encoded, one being prepared behind it
UNIT_RETRIES = 2  # a unit whose attempt fails is retried this many times, then recorded as failed
TICK_S = 1.0  # how often the driver looks at the clocks when nothing completes
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
# torch threads per encoder actor instead of the default (1 on CPU, 4 on GPU). The output does not
# depend on it (tests/test_output_digest.py runs with 4 to stand in for another machine's kernels).
THREADS_ENV = "MERGEMIX_TORCH_THREADS"


def connect(address: str | None) -> None:
    if ray.is_initialized():
        return
    if address:
        project = Path(__file__).resolve().parents[1]
        modules = [str(project / name) for name in ("pipeline", "stages", "schemas")]
        ray.init(address=address, runtime_env={"py_modules": modules}, log_to_driver=False)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)  # inside `ray job submit`, or a user-chosen cluster
    else:
        # address="local": start our own Ray even if `ray start` left a cluster address in /tmp/ray.
        with _quiet_token_notice():
            ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)


@contextlib.contextmanager
def _quiet_token_notice():
    """A local Ray turns token authentication on and logs a notice (and where it saved a new
    token) meant for people who run shared clusters; a local run keeps the default, quietly."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass
class Sizing:
    actors: int
    actor_cpus: float
    actor_gpus: float
    task_cpus: float
    device: str
    threads: int


def size_from_cluster(resources: dict, workers: int | None, device: str) -> Sizing:
    """Actors and task sizes from the cluster's resources; never asks for more than exist."""
    cpus, gpus = float(resources.get("CPU", 1)), float(resources.get("GPU", 0))
    use_gpu = gpus >= 1 and device != "cpu"
    if device == "cuda" and not use_gpu:
        raise UserError("--device cuda but the Ray cluster has no GPU")
    if use_gpu:
        actors = workers or int(gpus)
        return Sizing(actors, min(1.0, cpus / (2 * actors)), min(1.0, gpus / actors), 1.0 if cpus > actors + 1 else 0.5,
                      "cuda", _threads(4))
    actors = workers or max(1, int(cpus) // 2)
    # Half the CPUs to encoder actors, half to prepare/write tasks (fractional, so both fit).
    # One torch thread per actor: tiny batches gain little from more, and they would compete with the tasks.
    return Sizing(actors, cpus / (2 * actors), 0.0, max(0.25, min(1.0, cpus / 4)), "cpu", _threads(1))


def _threads(default: int) -> int:
    value = os.environ.get(THREADS_ENV, "")
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{THREADS_ENV}={value!r}: give a whole number of threads >= 1, or unset it")
    return int(value)


def resolve_image_ops(image_ops: str, device: str, address: str | None, device_encode: bool = False) -> str:
    """The image path of a run, pil or torch. auto: torch where the encoder actors run on CUDA, pil
    on CPU; with --device auto that is the cluster's to say, so this connects to it. Resolved before
    the fingerprint: the two paths differ in pixels (stages.imaging.device)."""
    if image_ops == "auto":
        if device == "auto":
            connect(address)
            device = "cuda" if float(ray.cluster_resources().get("GPU", 0)) >= 1 else "cpu"
        image_ops = "torch" if device == "cuda" else "pil"
    if device_encode and image_ops != "torch":
        raise UserError("--device-encode needs the torch image path, and --image-ops auto chose pil (no GPU): "
                        "add --image-ops torch, or drop --device-encode")
    return image_ops


def units_in_flight(resources: dict, sizing: Sizing, actors: int) -> int:
    """Units in flight per actor: enough prepare/write tasks for every CPU (a GPU actor encodes
    a unit much faster than one CPU task prepares or writes it), at least two."""
    task_slots = int(float(resources.get("CPU", 1)) / sizing.task_cpus)
    return max(UNITS_IN_FLIGHT_PER_ACTOR, -(-task_slots // max(1, actors)))


@dataclass
class Attempt:
    """One try of one unit: its three object refs and where it stands."""

    unit: object
    actor: int
    refs: tuple  # (prepared, decided, written)
    stage: str = "prepare"  # prepare | encode | write
    since: float | None = None  # monotonic start of the current stage's clock; None while queued


@dataclass
class Outcome:
    written: list = field(default_factory=list)  # (unit, stats) in completion order
    failed: dict = field(default_factory=dict)  # unit id -> reason
    storage_error: str | None = None


_STORAGE_WORDS = ("nosuchbucket", "no such bucket", "bucket does not exist", "access denied", "quotaexceeded",
                  "quota exceeded")


def storage_error(exc: BaseException) -> bool:
    """Whether a unit failed because the output cannot be written (disk full, read-only, no
    bucket, access denied, quota): retrying cannot help, so the run stops with one line. Only
    errors of the write task count: an input that cannot be read is a unit's own failure."""
    function = getattr(exc, "function_name", None)
    if function is not None and not str(function).endswith("write"):
        return False
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, PermissionError):
        return True
    if isinstance(cause, OSError) and cause.errno in STORAGE_ERRNOS:
        return True
    text = str(cause).lower()
    return isinstance(cause, OSError) and any(word in text for word in _STORAGE_WORDS)


class Distributor:
    """Runs units on `actors` with `submit(unit, actor) -> (prepared, decided, written)`."""

    def __init__(self, actors: list, submit: Callable, per_actor: int, unit_timeout: float,
                 on_written: Callable = lambda unit, stats: None, on_failed: Callable = lambda unit, reason: None,
                 lost: Callable[[], bool] = lambda: False, on_tick: Callable[[], None] = lambda: None,
                 make_actor: Callable | None = None):
        self.actors, self.submit, self.per_actor, self.timeout = actors, submit, per_actor, unit_timeout
        self.make_actor = make_actor
        self.on_written, self.on_failed, self.lost, self.on_tick = on_written, on_failed, lost, on_tick
        self.queues: list[deque[Attempt]] = [deque() for _ in actors]  # attempts not past their actor
        self.load = [0] * len(actors)
        self.attempts: dict[int, int] = {}
        self.in_flight: dict = {}  # ref of an attempt's current stage -> attempt
        self.abandoned: list = []
        # An actor's load (imports, weights, a download) is not a unit's fault: the encode clock of
        # the unit at its head starts when the actor is ready. Its load runs on the clock from its birth.
        self.born = [time.monotonic()] * len(actors)
        self.ready_refs = [actor.load_messages.remote() for actor in actors]
        self.ready_at: list[float | None] = [None] * len(actors)

    def run(self, units) -> Outcome:
        todo, outcome = deque(units), Outcome()
        try:
            while todo or self.in_flight:
                if self.lost():
                    raise UserError("another generate run took over this output's lease (this run was stalled "
                                    "longer than the lease's ttl); stopped, committed units are kept")
                while todo and not outcome.storage_error and min(self.load) < self.per_actor:
                    self._start(todo.popleft())
                ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=TICK_S, fetch_local=False)
                if ready:
                    ready, _ = ray.wait(list(self.in_flight), num_returns=len(self.in_flight), timeout=0,
                                        fetch_local=False)
                for ref in ready:
                    self._advance(self.in_flight.pop(ref), todo, outcome)
                self._check_clocks(todo, outcome)
                self.on_tick()
        except BaseException:
            # Interrupted, or the lease is lost: what is in flight is abandoned on purpose, so Ray
            # must not report its errors as unhandled when the refs go away.
            os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"
            for attempt in list(self.in_flight.values()):
                self._cancel(attempt)
            raise
        _settle(self.abandoned + [r for r, at in zip(self.ready_refs, self.ready_at) if at is not None])
        return outcome

    def _start(self, unit) -> None:
        a = self.load.index(min(self.load))
        attempt = Attempt(unit, a, tuple(self.submit(unit, self.actors[a])), since=time.monotonic())
        self.queues[a].append(attempt)
        self.load[a] += 1
        self.in_flight[attempt.refs[0]] = attempt

    def _advance(self, attempt: Attempt, todo: deque, outcome: Outcome) -> None:
        now = time.monotonic()
        queue = self.queues[attempt.actor]
        if attempt.stage == "prepare":
            attempt.stage, attempt.since = "encode", now if queue and queue[0] is attempt else None
            self.in_flight[attempt.refs[1]] = attempt
        elif attempt.stage == "encode":
            queue.remove(attempt)
            if queue and queue[0].stage == "encode" and queue[0].since is None:
                queue[0].since = now  # the next unit's turn on this actor starts now
            attempt.stage, attempt.since = "write", now
            self.in_flight[attempt.refs[2]] = attempt
        else:
            self.load[attempt.actor] -= 1
            try:
                stats = ray.get(attempt.refs[2])
            except Exception as exc:  # RayTaskError, actor death after Ray's own retries, lost objects
                self._failed_attempt(attempt.unit, one_line(exc), todo, outcome, storage=storage_error(exc))
                return
            outcome.written.append((attempt.unit, stats))
            self.on_written(attempt.unit, stats)

    def _check_clocks(self, todo: deque, outcome: Outcome) -> None:
        now = time.monotonic()
        for ref, attempt in list(self.in_flight.items()):
            if ref not in self.in_flight or attempt.since is None:
                continue
            stage, words = attempt.stage, _STAGE_WORDS[attempt.stage]
            since = attempt.since
            if stage == "encode":
                ready_at = self._ready_at(attempt.actor)
                since, words = ((max(since, ready_at), words) if ready_at is not None
                                else (self.born[attempt.actor], "the encoder actor loaded"))
            if now - since <= self.timeout:
                continue
            self._drop(attempt)
            if stage == "encode":
                self._replace_actor(attempt.actor, todo)
            reason = f"timeout: no progress for {self.timeout:g} s while {words}"
            self._failed_attempt(attempt.unit, reason, todo, outcome)

    def _ready_at(self, a: int) -> float | None:
        """When actor `a` finished loading (None while it loads); an actor that died loading counts
        as ready: its calls fail at once and say why."""
        if self.ready_at[a] is None and ray.wait([self.ready_refs[a]], timeout=0, fetch_local=False)[0]:
            self.ready_at[a] = time.monotonic()
        return self.ready_at[a]

    def _drop(self, attempt: Attempt) -> None:
        """Stop tracking an attempt and cancel what of it still runs."""
        for ref in attempt.refs:
            self.in_flight.pop(ref, None)
        self._cancel(attempt)
        self.load[attempt.actor] -= 1

    def _replace_actor(self, a: int, todo: deque) -> None:
        """A call stuck in an actor (a wedged device, a deadlock) only ends with its process. The
        actor is killed for good (a restarted one would retry the stuck call) and a new one takes
        its place; the units queued behind the stuck one go back to the front of the queue
        without counting an attempt: they were never at fault."""
        ray.kill(self.actors[a], no_restart=True)
        self.abandoned.append(self.ready_refs[a])
        self.actors[a] = self.make_actor()
        self.born[a], self.ready_refs[a], self.ready_at[a] = time.monotonic(), self.actors[a].load_messages.remote(), None
        for attempt in list(self.queues[a]):
            self._drop(attempt)
            todo.appendleft(attempt.unit)

    def _cancel(self, attempt: Attempt) -> None:
        prepared, decided, written = attempt.refs
        for ref, force in ((written, True), (decided, False), (prepared, True)):
            try:
                ray.cancel(ref, force=force)
            except Exception:  # already finished, or its worker is gone
                pass
        self.abandoned.extend((decided, written))  # small results; the prepared pixels are never fetched
        queue = self.queues[attempt.actor]
        if attempt in queue:
            head = queue[0] is attempt
            queue.remove(attempt)
            if head and queue and queue[0].stage == "encode":
                queue[0].since = time.monotonic()

    def _failed_attempt(self, unit, reason: str, todo: deque, outcome: Outcome, storage: bool = False) -> None:
        if storage and not outcome.storage_error:
            outcome.storage_error = f"unit {unit.unit_id}: {reason}"
            todo.clear()  # stop feeding; the loop drains units already in flight
        if outcome.storage_error:
            return
        self.attempts[unit.unit_id] = self.attempts.get(unit.unit_id, 0) + 1
        if self.attempts[unit.unit_id] <= UNIT_RETRIES:
            todo.append(unit)
            return
        outcome.failed[unit.unit_id] = reason
        self.on_failed(unit, reason)


def _settle(refs: list, wait_s: float = 10.0) -> None:
    """Collect the errors of cancelled attempts (cancelled, worker killed, actor restarted),
    so Ray does not print them as unhandled when the refs go away."""
    if not refs:
        return
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=wait_s, fetch_local=False)
    for ref in ready:
        try:
            ray.get(ref, timeout=0)
        except Exception:
            pass


_STAGE_WORDS = {"prepare": "reading and decoding its inputs", "encode": "in the encoder actor",
                "write": "writing its shard"}
