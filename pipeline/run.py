"""`generate`: plan -> check -> distribute -> run files.

The driver lists the input in a stream (stages.inputs: one small slice per unit, never the
records), takes the output's lease (one run writes OUT at a time), checks what OUT already
holds (same fingerprint resumes, another is refused, a file we did not write is never
touched), removes leftovers of interrupted writes, then hands the units that are not yet
committed to pipeline.distribute. Every unit is independent (its partners, lam draws and
masks depend only on its own inputs, the config and the seed), so the output does not depend
on how many actors run or on which node a unit lands.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace

import ray
from tqdm import tqdm

from pipeline import tasks
from pipeline.actor import ActorMessages, UnitWorker, check_blocks
from pipeline.config import GenerateConfig
from pipeline.distribute import Distributor, connect, resolve_image_ops, size_from_cluster, units_in_flight
from stages.units import Unit
from schemas.layout import INDEX_FILE, SHARDS_DIR
from schemas.shard import IMAGE_NEGATIVES, SCHEMA_VERSION
from stages.errors import UserError, one_line
from stages.output.lease import Lease
from stages.inputs.kinds import default_image_root, detect_kind, list_input
from stages.readers.output_state import committed_units, read_run_file, recorded_attn_layer
from stages.output.cleanup import remove_leftovers, remove_output
from stages.tome.schedule import merge_schedule
from stages.storage import input_fs, is_url, open_store
from stages.mixing.negatives import WANTS_LOSSLESS
from stages.model.weights import resolve_pretrained
from stages.model.tower import resolve_tower
from stages.output.runfiles import package_versions, write_run_files


@dataclass
class RunResult:
    out_dir: str
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


# Defined in pipeline.tasks, which imports no torch, so task workers stay light.
_prepare = ray.remote(tasks.prepare)
_write = ray.remote(tasks.write)


def check_output(store, cfg: GenerateConfig, fingerprint: str, planned: range) -> None:
    """Resume: the same fingerprint continues; another is refused unless --overwrite, which
    removes our files only. A run.json or index.json we did not write is refused either way."""
    run = read_run_file(store)
    read_run_file(store, INDEX_FILE)
    if cfg.overwrite:
        try:
            remove_output(store, planned)
        except OSError as exc:
            raise UserError(f"--overwrite could not remove the old output in {store.url}: {exc.strerror or exc}") from None
        return
    previous = {s.get("fingerprint") for s in committed_units(store).values()}
    if run is not None:
        previous.add(run.get("fingerprint"))
    previous.discard(None)
    if previous and previous != {fingerprint}:
        raise UserError(
            f"{store.url} holds output of a different configuration (fingerprint {sorted(previous)[0]}, now {fingerprint}); "
            "use the same flags to resume, another --output, or --overwrite to replace it"
        )


def check_merging(cfg: GenerateConfig, tower) -> None:
    """--attn-layer and --merge against the tower's blocks and patches, before any worker starts
    (the encoder checks the same when it is built; a failure there would cost every unit)."""
    depth = tower.layers
    if not -depth <= cfg.attn_layer < depth:
        raise UserError(f"--attn-layer {cfg.attn_layer} is outside the tower's {depth} blocks "
                        f"(use 0..{depth - 1} or -1..-{depth})")
    try:
        merge_schedule(cfg.effective_merge, cfg.attn_layer % depth, tower.num_patches + 1, cfg.merge_schedule)
    except ValueError as exc:
        raise UserError(str(exc)) from None


AUTO_SAMPLE = 128  # images --attn-layer auto checks: enough to rank blocks whose gaps differ by 0.1 or more


def auto_attn_layer(cfg: GenerateConfig, store, tower) -> int:
    """`--attn-layer auto`: the block the committed units were made with (a resume never chooses
    again, unless --overwrite starts over); else the block saliency-check ranks first on the input's
    first AUTO_SAMPLE images, among those that can take the whole --merge before them."""
    kept = None if cfg.overwrite else recorded_attn_layer(store)
    if kept is not None:
        print(f"attn-layer auto: block {kept}, as the committed units", file=sys.stderr)
        return kept
    connect(cfg.address)
    sizing = size_from_cluster(ray.cluster_resources(), 1, cfg.device)
    task = check_blocks.options(num_cpus=sizing.actor_cpus, num_gpus=sizing.actor_gpus)
    try:
        found = ray.get(task.remote(cfg.to_dict(), sizing.device, sizing.threads, AUTO_SAMPLE))
    except ray.exceptions.RayTaskError as exc:
        why = str(exc.cause) if isinstance(exc.cause, UserError) else one_line(exc.cause or exc)
        raise UserError(f"--attn-layer auto could not check the tower: {why}") from None
    merge = cfg.effective_merge
    eligible = [b for b in found["layers"] if b["merge"] == merge]
    if not eligible:
        raise UserError(f"--attn-layer auto: no block of this tower can take --merge {merge}; lower --merge")
    best = max(eligible, key=lambda b: b["score"] - b["random"])
    gap = best["score"] - best["random"]
    print(f"attn-layer auto: block {best['layer']} (saliency-check gap {gap:.3f} over random, on "
          f"{found['images']} images; {len(eligible)} of {tower.layers} blocks take --merge {merge})", file=sys.stderr)
    if found["no_better_than_random"]:
        print("warning: this tower's saliency is no better than random patches: random weights, or a wrong "
              "--mean/--std or activation for these weights? (mergemix-pipeline saliency-check shows the table)",
              file=sys.stderr)
    return best["layer"]


def generate(cfg: GenerateConfig) -> RunResult:
    t0 = time.perf_counter()
    opts = cfg.storage_options
    store = _open_output(cfg.output, opts)
    kind = detect_kind(cfg.input, opts)
    image_root = cfg.image_root or default_image_root(cfg.input, kind)
    _check_image_root(image_root, opts)
    # The tower and its settings, from configs: an unusable tower or contradicting flags fail here,
    # in one line, before any worker starts; so do weights that cannot be fetched.
    tower = resolve_tower(cfg.model, cfg.pretrained, quick_gelu=cfg.quick_gelu, mean=cfg.mean, std=cfg.std)
    towerless = cfg.method in IMAGE_NEGATIVES
    if towerless:  # no forward: the tower's settings only (image size, mean, std, pad colour)
        print(f"{cfg.method} runs no tower (no weights, no GPU); {tower.summary()}", file=sys.stderr)
        if cfg.method in WANTS_LOSSLESS and cfg.image_format == "jpg":
            print(f"notice: JPEG smooths away much of {cfg.method}'s per-pixel noise; "
                  "--image-format png or webp keeps the loser as made", file=sys.stderr)
    else:
        resolve_pretrained(cfg.model, tower.weights, opts, download=False)
        if not cfg.attn_layer_auto:
            check_merging(cfg, tower)
        print(tower.summary(), file=sys.stderr)
    _check_writable(store)
    auto = cfg.attn_layer_auto and not towerless
    with Lease(store, "generate") as lease:
        if auto:  # before the fingerprint, which holds the block chosen
            cfg = replace(cfg, attn_layer=auto_attn_layer(cfg, store, tower))
            check_merging(cfg, tower)
        # The records (ids, image references, text) are part of the fingerprint: resuming after
        # the input changed would mix units of two different inputs.
        listing = list_input(cfg.input, cfg.samples_per_shard, folder_labels=cfg.folder_labels, storage_options=opts)
        if not listing.count:
            raise UserError(f"{cfg.input} holds no samples")
        image_ops = "pil" if towerless else resolve_image_ops(cfg.image_ops, cfg.device, cfg.address, cfg.device_encode)
        fingerprint = cfg.fingerprint(listing.digest, tower.describe(), image_ops)
        planned = range(len(listing.slices))
        check_output(store, cfg, fingerprint, planned)
        remove_leftovers(store, planned)
        done = committed_units(store)
        units = [Unit(i, s) for i, s in enumerate(listing.slices) if i not in done]
        result = RunResult(cfg.output, fingerprint, len(planned), len(planned) - len(units), 0,
                           tower=tower.summary())
        outcome, sizing = _distribute(cfg, units, tower, image_root, fingerprint, lease, image_ops)
        if outcome.storage_error:
            raise UserError(f"cannot write to {store.url} ({outcome.storage_error}); committed units are kept: "
                            "free space or fix permissions, then rerun the same command to resume")
        result.units_written = len(outcome.written)
        result.failed_units = dict(sorted(outcome.failed.items()))
        result.counts = {s: sum(int(stats["counts"].get(s, 0)) for _, stats in outcome.written)
                         for s in ("ok", "failed", "skipped")}
        result.seconds = time.perf_counter() - t0
        _run_files(store, {
            "fingerprint": fingerprint,
            "input_digest": listing.digest,
            "config": cfg.record(),
            "output_config": cfg.output_keys(),
            "tower": {"model": tower.model, "weights": tower.weights, **tower.describe(),
                      "pad_rgb": list(tower.pad_rgb), "settings_from": tower.settings_from},
            "schema_version": SCHEMA_VERSION,
            "versions": package_versions(),
            "image_ops": image_ops,
            "attn_layer_auto": auto,
            "input_kind": listing.kind,
            "inputs": listing.count,
            "units_planned": len(planned),
            "failed_units": {str(k): v for k, v in result.failed_units.items()},
            "this_run": {"units_written": result.units_written, "units_already_committed": result.units_skipped,
                         "seconds": round(result.seconds, 3), "counts": result.counts,
                         "sizing": vars(sizing) if sizing else None},
        })
    return result


def _distribute(cfg: GenerateConfig, units: list[Unit], tower, image_root, fingerprint: str, lease: Lease,
                image_ops: str = "pil"):
    """Run `units` on Ray; returns (pipeline.distribute.Outcome, the sizing used or None)."""
    from pipeline.distribute import Outcome

    if not units:  # a finished run resumes as a no-op: no actor (Ray starts only to resolve --image-ops auto)
        return Outcome(), None
    connect(cfg.address)
    resources = ray.cluster_resources()
    # The image-side negatives' actors hold no tower: they run on CPUs, whatever the cluster has.
    sizing = size_from_cluster(resources, cfg.workers, "cpu" if cfg.method in IMAGE_NEGATIVES else cfg.device)
    # Actors restart without limit: preemptible nodes take them down again and again over a long
    # run. A unit that kills its actor every time still ends, after max_task_retries x UNIT_RETRIES.
    def make_actor():
        return (UnitWorker.options(num_cpus=sizing.actor_cpus, num_gpus=sizing.actor_gpus, max_restarts=-1,
                                   max_task_retries=3)
                .remote(cfg.to_dict(), sizing.device, sizing.threads, image_ops))

    actors = [make_actor() for _ in range(min(sizing.actors, len(units)))]
    # Warnings raised while the actors load (random weights, open_clip's own) reach this terminal once.
    messages = ActorMessages([actor.load_messages.remote() for actor in actors])
    prepare = _prepare.options(num_cpus=sizing.task_cpus, max_retries=3)
    write = _write.options(num_cpus=sizing.task_cpus, max_retries=3)

    def submit(unit: Unit, actor):
        prepared = prepare.remote(unit, tower.image_size, cfg.resize, image_root, tower.pad_rgb, tower.interpolation,
                                  cfg.storage_options, image_ops)
        decided = actor.make.remote(prepared)
        # The writer takes the prepared pixels straight from the object store: the actor returns decisions only.
        return prepared, decided, write.remote(prepared, decided, cfg.output, cfg.image_format, cfg.jpeg_quality,
                                               fingerprint, cfg.storage_options)

    bar = tqdm(total=sum(u.size for u in units), unit="pair", disable=not cfg.progress, dynamic_ncols=True,
               desc="generate")
    counts = {"failed": 0, "skipped": 0}

    def written(unit: Unit, stats: dict) -> None:
        for status in counts:
            counts[status] += int(stats["counts"].get(status, 0))
        bar.update(unit.size)
        bar.set_postfix(counts, refresh=False)

    distributor = Distributor(actors, submit, units_in_flight(resources, sizing, len(actors)), cfg.unit_timeout,
                              on_written=written, on_failed=lambda unit, reason: bar.update(unit.size),
                              lost=lease.lost.is_set, on_tick=messages.print_new, make_actor=make_actor)
    try:
        return distributor.run(units), sizing
    finally:
        messages.print_new(timeout=5)
        bar.close()
        for actor in actors:
            ray.kill(actor)


def _open_output(location: str, storage_options: dict | None):
    try:
        return open_store(location, storage_options)
    except (ImportError, ValueError) as exc:  # no fsspec implementation for the protocol, bad URL
        raise UserError(f"cannot open --output {location}: {one_line(exc)} (s3:// needs `pip install s3fs`, "
                        "gs:// `pip install gcsfs`)") from None


def _check_image_root(image_root: str | None, storage_options: dict | None) -> None:
    """An image root on an object store must be reachable (a local one is checked with the config)."""
    if image_root is None or not is_url(image_root):
        return
    try:
        fs, path = input_fs(image_root, storage_options)
        fs.ls(path)
    except Exception as exc:  # no bucket, no endpoint, no credentials
        raise UserError(f"cannot read --image-root {image_root}: {one_line(exc)}") from None


def _check_writable(store) -> None:
    """Create OUT/shards and prove a file can be written there, before any worker starts."""
    try:
        store.makedirs(SHARDS_DIR)
        probe = store.tmp_name(f"{SHARDS_DIR}/write-probe")
        store.write_bytes(probe, b"ok")
        store.delete(probe)
    except OSError as exc:
        where = getattr(exc, "filename", None) or store.url
        raise UserError(f"cannot write to --output {store.url}: {exc.strerror or one_line(exc)} ({where}); "
                        "choose a writable directory") from None
    except Exception as exc:  # an object store that cannot be reached: botocore and aiohttp errors
        raise UserError(f"cannot write to --output {store.url}: {one_line(exc)}") from None


def _run_files(store, info: dict) -> None:
    try:
        notice = write_run_files(store, info)
    except OSError as exc:
        raise UserError(f"all units done, but {store.url}/run.json could not be written: {exc.strerror or exc}; "
                        "free space, then rerun the same command to write it") from None
    if notice:
        print(f"notice: {notice}", file=sys.stderr)
