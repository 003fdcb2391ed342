"""`generate` on Ray: plan units, skip committed ones, and stream the rest through
CPU prepare tasks -> encoder actors -> CPU write tasks.

Every unit is independent (its partners, lam draws and masks depend only on its own
inputs, the config and the seed), so the output does not depend on how many actors run
or on which node a unit lands. The driver holds only light records and a bounded number
of units in flight; pixels move between tasks and actors through Ray's object store.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import ray
from tqdm import tqdm

from pipeline.config import GenerateConfig
from schemas.shard import SCHEMA_VERSION
from stages.encoder import collect_messages, load_encoder, resolve_pretrained
from stages.tower import resolve_tower
from stages.errors import UserError
from pipeline import tasks
from pipeline.tasks import Unit
from stages.pairs import PairMaker, PreparedUnit, UnitPairs
from stages.read import records_digest, InputRecord, detect_kind, read_records
from stages.writer import clean_uncommitted, committed_units, package_versions, write_run_files

UNITS_IN_FLIGHT_PER_ACTOR = 2  # at least: one being encoded, one being prepared behind it
UNIT_RETRIES = 2  # a unit that raises is retried this many times, then recorded as failed


@dataclass
class RunResult:
    out_dir: Path
    fingerprint: str
    units_total: int
    units_skipped: int  # already committed before this run
    units_written: int
    failed_units: dict = field(default_factory=dict)  # unit id -> error
    counts: dict = field(default_factory=dict)
    seconds: float = 0.0
    tower: str = ""  # the tower line: weights (or random weights), activation, constants

    @property
    def ok(self) -> bool:
        return not self.failed_units


def plan_units(records: list[InputRecord], per_shard: int) -> list[Unit]:
    return [Unit(u, s, records[s : s + per_shard]) for u, s in enumerate(range(0, len(records), per_shard))]


# --- resume: same config continues, another config is refused -----------------------------


def check_output(out: Path, cfg: GenerateConfig, fingerprint: str) -> None:
    run_file, shards = out / "run.json", out / "shards"
    if cfg.overwrite:
        try:
            for path in (run_file, out / "index.json"):
                path.unlink(missing_ok=True)
            if shards.exists():
                shutil.rmtree(shards)
        except OSError as exc:
            raise UserError(f"--overwrite could not remove the old output in {out}: {exc.strerror or exc}") from None
        return
    previous = {s.get("fingerprint") for s in committed_units(out).values()}
    if run_file.is_file():
        try:
            previous.add(json.loads(run_file.read_text()).get("fingerprint"))
        except ValueError:
            pass
    previous.discard(None)
    if previous and previous != {fingerprint}:
        raise UserError(
            f"{out} holds output of a different configuration (fingerprint {sorted(previous)[0]}, now {fingerprint}); "
            "use the same flags to resume, another --output, or --overwrite to replace it"
        )


# --- Ray side ------------------------------------------------------------------------------


@dataclass
class Sizing:
    actors: int
    actor_cpus: float
    actor_gpus: float
    task_cpus: float
    device: str
    threads: int


def size_from_cluster(cfg: GenerateConfig) -> Sizing:
    """Actors and task sizes from the cluster's resources; never asks for more than exist."""
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 1)), float(res.get("GPU", 0))
    use_gpu = gpus >= 1 and cfg.device != "cpu"
    if cfg.device == "cuda" and not use_gpu:
        raise UserError("--device cuda but the Ray cluster has no GPU")
    if use_gpu:
        actors = cfg.workers or int(gpus)
        return Sizing(actors, min(1.0, cpus / (2 * actors)), min(1.0, gpus / actors), 1.0 if cpus > actors + 1 else 0.5, "cuda", 4)
    actors = cfg.workers or max(1, int(cpus) // 2)
    # Half the CPUs to encoder actors, half to prepare/write tasks (fractional, so both fit).
    # One torch thread per actor: results must not depend on thread count (see README).
    return Sizing(actors, cpus / (2 * actors), 0.0, max(0.25, min(1.0, cpus / 4)), "cpu", 1)


@ray.remote
class UnitWorker:
    """One model load per actor; turns prepared units into pairs."""

    def __init__(self, cfg: dict, device: str, threads: int):
        import torch

        torch.set_num_threads(threads)
        c = GenerateConfig(**cfg)
        # Each actor resolves the weights itself: a tag downloads into its own node's cache.
        # Warnings of the load (random weights, open_clip's own) go to the driver (load_messages).
        self.messages: list[str] = []
        with collect_messages(self.messages):
            encoder = load_encoder(c.model, c.pretrained, merge=c.effective_merge, attn_layer=c.attn_layer,
                                   prop_attn=c.prop_attn, schedule=c.merge_schedule, device=device,
                                   precision=c.precision, quick_gelu=c.quick_gelu, mean=c.mean, std=c.std)
        describe = {"model": c.model, "pretrained": None if c.pretrained in ("", "none") else c.pretrained, "seed": c.seed,
                    "method": c.method, "lam_mode": c.lam_mode, **encoder.describe()}
        describe.pop("patch_size")
        self.maker = PairMaker(encoder, method=c.method, lam=c.lam, lam_mode=c.lam_mode, seed=c.seed,
                               batch_size=c.batch_size, describe=describe)

    def make(self, unit: PreparedUnit) -> UnitPairs:
        _injected_fault(unit.unit_id)
        return self.maker.make(unit)

    def load_messages(self) -> list[str]:
        return self.messages


def _print_messages(refs: list, seen: set, timeout: float = 0) -> list:
    """Print each actor load message not printed yet (the driver's terminal is the only one the
    user sees; the same warning from every actor prints once). Returns the refs not ready yet."""
    if not refs:
        return refs
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    for ref in ready:
        try:
            messages = ray.get(ref)
        except Exception:  # the actor died loading: its units fail and say why
            continue
        for message in messages:
            if message not in seen:
                seen.add(message)
                print(f"worker: {message}", file=sys.stderr)
    return pending


# TEST-ONLY fault injection for tests/test_faults.py; inert unless the variable is set.
# MERGEMIX_TEST_FAULTS names a directory; for unit N a file there named "raise-N" makes every
# attempt raise, "kill-N" makes the actor SIGKILL itself once (the file is claimed by rename),
# "hold-N" parks the attempt while the file exists. Each attempt appends "N pid" to attempts.log.
FAULTS_ENV = "MERGEMIX_TEST_FAULTS"


def _injected_fault(unit_id: int) -> None:
    faults = os.environ.get(FAULTS_ENV)
    if not faults:
        return
    import signal

    folder = Path(faults)
    with open(folder / "attempts.log", "a") as log:
        log.write(f"{unit_id} {os.getpid()}\n")
    deadline = time.monotonic() + 120
    while (folder / f"hold-{unit_id}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if (folder / f"raise-{unit_id}").exists():
        raise RuntimeError(f"injected fault in unit {unit_id}")
    try:
        os.rename(folder / f"kill-{unit_id}", folder / f"killed-{unit_id}")
    except FileNotFoundError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


# Defined in pipeline.tasks, which imports no torch, so task workers stay light.
_prepare = ray.remote(tasks.prepare)
_write = ray.remote(tasks.write)


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


# --- the run ---------------------------------------------------------------------------------


def default_image_root(input_path: str, kind: str) -> str | None:
    """Without --image-root: an image folder is its own root, and a JSON/JSONL/Parquet file's
    relative image paths resolve next to it (as LLaVA's data layout has them)."""
    if kind == "folder":
        return input_path
    if kind in ("llava", "jsonl", "parquet"):
        return str(Path(input_path).resolve().parent)
    return None


def generate(cfg: GenerateConfig) -> RunResult:
    t0 = time.perf_counter()
    out = Path(cfg.output)
    kind = detect_kind(cfg.input)
    image_root = cfg.image_root or default_image_root(cfg.input, kind)
    # The tower and its settings, from configs: an unusable tower or contradicting flags fail here,
    # in one line, before any worker starts; so do weights that cannot be fetched.
    tower = resolve_tower(cfg.model, cfg.pretrained, quick_gelu=cfg.quick_gelu, mean=cfg.mean, std=cfg.std)
    resolve_pretrained(cfg.model, tower.weights)
    print(tower.summary(), file=sys.stderr)
    image_size = tower.image_size
    records = read_records(cfg.input, folder_labels=cfg.folder_labels)
    if not records:
        raise UserError(f"{cfg.input} holds no samples")
    # The records (ids, image references, text) are part of the fingerprint: resuming after
    # the input list changed would mix units of two different inputs.
    input_digest = records_digest(records)
    fingerprint = cfg.fingerprint(input_digest, tower.describe())
    check_output(out, cfg, fingerprint)
    _check_writable(out)
    clean_uncommitted(out)
    units = plan_units(records, cfg.samples_per_shard)
    done = committed_units(out)
    todo = deque(u for u in units if u.unit_id not in done)
    result = RunResult(out, fingerprint, len(units), len(units) - len(todo), 0, tower=tower.summary())

    connect(cfg.address)
    sizing = size_from_cluster(cfg)
    # Actors restart without limit: preemptible nodes take them down again and again over a long
    # run. A unit that kills its actor every time still ends, after max_task_retries x UNIT_RETRIES.
    actors = [
        UnitWorker.options(num_cpus=sizing.actor_cpus, num_gpus=sizing.actor_gpus, max_restarts=-1, max_task_retries=3)
        .remote(cfg.to_dict(), sizing.device, sizing.threads)
        for _ in range(min(sizing.actors, len(todo)))  # none when every unit is already committed
    ]
    message_refs, seen_messages = [actor.load_messages.remote() for actor in actors], set()
    prepare = _prepare.options(num_cpus=sizing.task_cpus, max_retries=3)
    write = _write.options(num_cpus=sizing.task_cpus, max_retries=3)

    counts = {"ok": 0, "failed": 0, "skipped": 0}
    attempts: dict[int, int] = {}
    storage_error = None  # disk full / read-only OUT: retrying cannot help, so the run stops
    in_flight: dict = {}  # write ref -> (unit, actor index)
    load = [0] * len(actors)
    # Enough units in flight for prepare/write tasks on every CPU: a GPU actor encodes a unit
    # much faster than one CPU task prepares or writes it, so 2 per actor would idle most cores.
    task_slots = int(float(ray.cluster_resources().get("CPU", 1)) / sizing.task_cpus)
    per_actor = max(UNITS_IN_FLIGHT_PER_ACTOR, -(-task_slots // max(1, len(actors))))
    samples_todo = sum(len(u.records) for u in todo)
    bar = tqdm(total=samples_todo, unit="pair", disable=not cfg.progress, dynamic_ncols=True, desc="generate")
    try:
        while todo or in_flight:
            while todo and min(load) < per_actor:
                a = load.index(min(load))
                unit = todo.popleft()
                prepared = prepare.remote(unit, image_size, cfg.resize, image_root, tower.pad_rgb, tower.interpolation)
                pairs = actors[a].make.remote(prepared)
                # The writer takes the prepared pixels straight from the object store: the actor returns decisions only.
                in_flight[write.remote(prepared, pairs, str(out), cfg.image_format, cfg.jpeg_quality, fingerprint)] = (unit, a)
                load[a] += 1
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            message_refs = _print_messages(message_refs, seen_messages)
            unit, a = in_flight.pop(ready[0])
            load[a] -= 1
            try:
                stats = ray.get(ready[0])
            except Exception as exc:  # RayTaskError / actor death after Ray's own retries
                if _storage_error(exc) and not storage_error:
                    storage_error = f"unit {unit.unit_id}: {_one_line(exc)}"
                    todo.clear()  # stop feeding; the loop drains units already in flight
                if storage_error:
                    continue
                attempts[unit.unit_id] = attempts.get(unit.unit_id, 0) + 1
                if attempts[unit.unit_id] <= UNIT_RETRIES:
                    todo.append(unit)
                    continue
                result.failed_units[unit.unit_id] = _one_line(exc)
                bar.update(len(unit.records))
                continue
            result.units_written += 1
            for status in counts:
                counts[status] += int(stats["counts"].get(status, 0))
            bar.update(len(unit.records))
            bar.set_postfix(failed=counts["failed"], skipped=counts["skipped"], refresh=False)
    finally:
        bar.close()
        _print_messages(message_refs, seen_messages, timeout=5)
        for actor in actors:
            ray.kill(actor)
    if storage_error:
        raise UserError(f"cannot write to {out} ({storage_error}); committed units are kept: "
                        "free space or fix permissions, then rerun the same command to resume")
    result.counts = counts
    result.seconds = time.perf_counter() - t0
    _run_files(out, {
        "fingerprint": fingerprint,
        "input_digest": input_digest,
        "config": cfg.to_dict(),
        "output_config": cfg.output_keys(),
        "tower": {"model": tower.model, "weights": tower.weights, **tower.describe(), "pad_rgb": list(tower.pad_rgb),
                  "settings_from": tower.settings_from},
        "schema_version": SCHEMA_VERSION,
        "versions": package_versions(),
        "input_kind": kind,
        "inputs": len(records),
        "units_planned": len(units),
        "failed_units": {str(k): v for k, v in sorted(result.failed_units.items())},
        "this_run": {"units_written": result.units_written, "units_already_committed": result.units_skipped,
                     "seconds": round(result.seconds, 3), "counts": counts, "sizing": vars(sizing)},
    })
    return result


STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _storage_error(exc: BaseException) -> bool:
    cause = getattr(exc, "cause", None) or exc
    return isinstance(cause, OSError) and cause.errno in STORAGE_ERRNOS


def _check_writable(out: Path) -> None:
    """Create OUT/shards and prove a file can be written there, before any worker starts."""
    try:
        (out / "shards").mkdir(parents=True, exist_ok=True)
        probe = out / "shards" / f".write-probe-{os.getpid()}.tmp"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to --output {out}: {exc.strerror or exc} ({exc.filename or out}); "
                        "choose a writable directory") from None


def _run_files(out: Path, info: dict) -> None:
    try:
        write_run_files(out, info)
    except OSError as exc:
        raise UserError(f"all units done, but {out}/run.json could not be written: {exc.strerror or exc}; "
                        "free space, then rerun the same command to write it") from None


def _one_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:300] if str(cause).strip() else ''}"
