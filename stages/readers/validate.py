"""`validate`: is every committed unit of an output complete and consistent with its rows,
its stats and the run files? Lists every problem, one precise line each."""
from __future__ import annotations

import hashlib
import io
import json
from collections import Counter

from PIL import Image

from schemas.layout import CARD_FILE, INDEX_FILE, RUN_FILE, SHARDS_DIR, STATS_SUFFIX, parse_tmp_file, parse_unit_file
from schemas.shard import (
    FIELDS, IMAGE_NEGATIVES, PARTS, SCHEMA_VERSION, mask_problem, part_ext, sample_key, shard_name, validate_row,
)
from stages.errors import UserError
from stages.readers.output_state import card_tars
from stages.readers.output_state import card_owner, read_stats
from stages.readers.shards import ShardRef, decode_image, iter_tar_samples, output_store, read_parquet


def _read_json(store, name: str):
    """A JSON file of the output; FileNotFoundError when absent, ValueError when not JSON."""
    return json.loads(store.read_bytes(name))


def _planned_units(store) -> int | None:
    """Units the run planned (from run.json), or None when unknown."""
    try:
        planned = _read_json(store, RUN_FILE).get("units_planned")
    except (OSError, ValueError, AttributeError):
        return None
    return planned if isinstance(planned, int) else None

# --- validate ---------------------------------------------------------------------------


def _file_md5(store, name: str) -> str:
    h = hashlib.md5()
    with store.open_read(name) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _image_size(data: bytes) -> tuple[int, int]:
    """(h, w) from the image header, without decoding the pixels."""
    with Image.open(io.BytesIO(data)) as img:
        return img.size[1], img.size[0]


def _check_members(tar: str, key: str, row: dict, parts: dict[str, bytes]) -> list[str]:
    """One ok row against its tar members: presence, hashes, record, geometry, mask."""
    fmt = row["image_format"]
    expected = {part_ext(part, fmt): f"{part}_sha256" if part != "json" else None for part in PARTS}
    problems = []
    missing = [ext for ext in expected if ext not in parts]
    if len(missing) == len(expected):
        return [f"{tar}: parquet row {key} (ok) has no members in the tar"]
    if missing:
        problems.append(f"{tar}: sample {key} lacks members {[f'{key}.{m}' for m in missing]}")
    for ext in sorted(set(parts) - set(expected)):
        problems.append(f"{tar}: unexpected member {key}.{ext} (image_format is {fmt})")
    for ext, field in expected.items():
        if field and ext in parts:
            got = hashlib.sha256(parts[ext]).hexdigest()
            if got != row[field]:
                problems.append(f"{tar}: {key}.{ext} sha256 {got[:12]}... != parquet {field} {str(row[field])[:12]}...")
    if "json" in parts:
        try:
            record = json.loads(parts["json"])
        except ValueError:
            record = None
        if not isinstance(record, dict):
            problems.append(f"{tar}: {key}.json is not a JSON object")
        else:
            diff = sorted(f for f in set(FIELDS) | set(record) if record.get(f, "<absent>") != row.get(f, "<absent>"))
            if diff:
                problems.append(f"{tar}: {key}.json differs from its parquet row in {diff}")
    try:
        for ext in (part_ext("winner", fmt), part_ext("loser", fmt)):
            if ext in parts and list(_image_size(parts[ext])) != list(row["image_size"] or []):
                problems.append(f"{tar}: {key}.{ext} is {_image_size(parts[ext])}, parquet image_size is {row['image_size']}")
        mask_ext = part_ext("mask", fmt)
        if mask_ext in parts:
            mask = decode_image(parts[mask_ext], "L")
            if list(mask.shape) != list(row["grid"] or []):
                problems.append(f"{tar}: {key}.mask.png is {mask.shape}, parquet grid is {row['grid']}")
            problem = mask_problem(row["method"], row["lam"], row["kept_patches"], mask, row["image_size"])
            if problem:
                problems.append(f"{tar}: {key}.mask.png: {problem}")
        if row["method"] in IMAGE_NEGATIVES:
            problem = _negative_problem(row)
            if problem:
                problems.append(f"{tar}: {key}: {problem}")
    except (OSError, ValueError) as exc:
        problems.append(f"{tar}: sample {key} has an image that does not decode ({exc})")
    return problems


def _negative_problem(row: dict) -> str | None:
    """An image-side negative's parameters against their ranges, and its lam against them."""
    from stages.mixing.negatives import record_problem

    try:
        params = json.loads(row["method_params"]) if row.get("method_params") else None
    except ValueError:
        return "method_params is not JSON"
    height, width = row["image_size"] or (0, 0)
    return record_problem(row["method"], params, row["lam"], height, width)


def _check_unit(store, unit: int, stats: dict, seen: dict[str, int]) -> list[str]:
    name = shard_name(unit)
    tar, pqn = f"{SHARDS_DIR}/{name}.tar", f"{SHARDS_DIR}/{name}.parquet"  # names in the store, and in messages
    problems = []
    if stats.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"shards/{name}{STATS_SUFFIX}: schema_version {stats.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    if not store.is_file(pqn):
        problems.append(f"{pqn}: missing, but {name}{STATS_SUFFIX} marks the unit committed")
        rows = None
    else:
        try:
            rows = read_parquet(store, pqn).to_pylist()
        except UserError as exc:
            problems.append(f"{pqn}: {exc}")
            rows = None
        expected_size = stats.get("parquet", {}).get("filesize")
        if store.size(pqn) != expected_size:
            problems.append(f"{pqn}: {store.size(pqn)} bytes, stats say {expected_size}")

    by_key: dict[str, dict] = {}
    if rows is not None:
        counts = Counter(r["status"] for r in rows)
        for i, row in enumerate(rows):
            key = row["key"]
            problems += [f"{pqn}: {p}" for p in validate_row(row)]
            if key != sample_key(unit, i) or row["unit"] != unit or row["index"] != i:
                problems.append(f"{pqn}: row {i} has key {key} unit {row['unit']} index {row['index']}, expected {sample_key(unit, i)}")
            if row["fingerprint"] != stats.get("fingerprint"):
                problems.append(f"{pqn}: row {key} fingerprint {row['fingerprint']!r} != stats fingerprint {stats.get('fingerprint')!r}")
            if key in seen:
                problems.append(f"{pqn}: duplicate key {key} (also in unit {shard_name(seen[key])})")
            seen.setdefault(key, unit)
            by_key[key] = row
        want = stats.get("counts", {})
        for status in ("ok", "failed", "skipped"):
            if counts.get(status, 0) != want.get(status):
                problems.append(f"{pqn}: {counts.get(status, 0)} {status} rows, stats say {want.get(status)}")
        if len(rows) != want.get("total"):
            problems.append(f"{pqn}: {len(rows)} rows, stats say {want.get('total')}")

    if not store.is_file(tar):
        return problems + [f"{tar}: missing, but {name}{STATS_SUFFIX} marks the unit committed"]
    tar_stats = stats.get("tar", {})
    size = store.size(tar)
    if size != tar_stats.get("filesize"):
        problems.append(f"{tar}: {size} bytes, stats say {tar_stats.get('filesize')} (truncated or replaced)")
    elif _file_md5(store, tar) != tar_stats.get("md5sum"):
        problems.append(f"{tar}: md5 differs from the stats (content changed)")

    samples: dict[str, dict[str, bytes]] = {}
    grouping: list[str] = []
    try:
        for key, parts in iter_tar_samples(ShardRef(store, tar), grouping):
            samples.setdefault(key, {}).update(parts)
    except UserError as exc:
        problems.append(f"{tar}: unreadable after {sum(map(len, samples.values()))} members: {exc}")
    problems += [f"{tar}: {p}" for p in grouping]
    if rows is None:
        return problems
    if sum(1 for k in samples) != tar_stats.get("nsamples"):
        problems.append(f"{tar}: {len(samples)} samples, stats say {tar_stats.get('nsamples')}")
    for key, parts in samples.items():
        row = by_key.get(key)
        if row is None:
            problems += [f"{tar}: member {key}.{ext} has no parquet row" for ext in sorted(parts)]
        elif row["status"] != "ok":
            problems.append(f"{tar}: members of {key} present, but its parquet row is {row['status']}")
        else:
            problems += _check_members(tar, key, row, parts)
    for key, row in by_key.items():
        if row["status"] == "ok" and key not in samples:
            problems.append(f"{tar}: parquet row {key} (ok) has no members in the tar")
    return problems


def _check_run_files(store, units: dict[int, dict]) -> list[str]:
    problems = []
    try:
        index = _read_json(store, INDEX_FILE)
    except FileNotFoundError:
        index = None
        problems.append("index.json: missing (the run did not finish); rerun `generate` to resume and write it")
    except ValueError:
        index = None
        problems.append("index.json: not valid JSON")
    if isinstance(index, dict):
        if index.get("__kind__") != "wids-shard-index-v1":
            problems.append(f"index.json: __kind__ is {index.get('__kind__')!r}, expected 'wids-shard-index-v1'")
        listed = {e.get("url"): e for e in index.get("shardlist", []) if isinstance(e, dict)}
        want = {f"shards/{st['tar']['file']}": st["tar"] for st in units.values()}
        for url in sorted(set(want) - set(listed)):
            problems.append(f"index.json: committed {url} is not listed")
        for url in sorted(set(listed) - set(want)):
            problems.append(f"index.json: lists {url}, which is not a committed unit")
        for url in sorted(set(want) & set(listed)):
            for field in ("nsamples", "filesize", "md5sum"):
                if listed[url].get(field) != want[url].get(field):
                    problems.append(f"index.json: {url} {field} {listed[url].get(field)!r} != stats {want[url].get(field)!r}")
    try:
        run = _read_json(store, RUN_FILE)
    except FileNotFoundError:
        return problems + ["run.json: missing (the run did not finish); rerun `generate` to resume and write it"]
    except ValueError:
        return problems + ["run.json: not valid JSON"]
    if isinstance(run, dict):
        for unit, st in units.items():
            if st.get("fingerprint") != run.get("fingerprint"):
                problems.append(f"shards/{shard_name(unit)}{STATS_SUFFIX}: fingerprint {st.get('fingerprint')!r} != "
                                f"run.json fingerprint {run.get('fingerprint')!r} (a unit of another run)")
    problems += _check_card(store, units)
    totals = run.get("totals", {}) if isinstance(run, dict) else {}
    for status in ("ok", "failed", "skipped"):
        got = sum(int(st.get("counts", {}).get(status, 0)) for st in units.values())
        if totals.get(status) != got:
            problems.append(f"run.json: totals.{status} is {totals.get(status)!r}, committed units hold {got}")
    return problems


def _check_card(store, units: dict[int, dict]) -> list[str]:
    """Our dataset card must list exactly the committed tars that hold pairs (a README.md that
    is not ours is not checked)."""
    if card_owner(store) != "ours":
        return []
    listed = card_tars(store.read_bytes(CARD_FILE))
    if listed is None:
        return [f"{CARD_FILE}: its configs list no shards; rerun `generate` to rewrite it"]
    want = [f"{SHARDS_DIR}/{st['tar']['file']}" for st in units.values() if st["tar"]["nsamples"]]
    problems = [f"{CARD_FILE}: committed {name} is not listed" for name in want if name not in listed]
    return problems + [f"{CARD_FILE}: lists {name}, which is not a committed unit with pairs" for name in listed if name not in want]


def validate_output(out_dir, storage_options: dict | None = None) -> list[str]:
    """Every problem found in an output (a folder or an object-store prefix), one precise line
    each; empty if valid. A missing or non-output location raises UserError."""
    store = output_store(out_dir, storage_options)
    problems: list[str] = []
    units: dict[int, dict] = {}
    planned = _planned_units(store)
    names = store.list(SHARDS_DIR)
    for name in names:
        rel = f"{SHARDS_DIR}/{name}"
        parsed = parse_unit_file(name)
        if parse_tmp_file(name) is not None:
            problems.append(f"{rel}: leftover temporary file of an interrupted write (resuming `generate` removes it)")
        elif parsed is None or (planned is not None and parsed[0] >= planned):
            continue  # not one of our names, or a unit outside the run's plan: somebody else's file
        elif parsed[1] == STATS_SUFFIX:
            stats = read_stats(store, parsed[0])
            if stats is None:
                problems.append(f"{rel}: unreadable stats file (or wrong unit); regenerate this unit")
            else:
                units[parsed[0]] = stats
    for name in names:
        parsed = parse_unit_file(name)
        if parsed and parsed[1] != STATS_SUFFIX and parsed[0] not in units and (planned is None or parsed[0] < planned):
            problems.append(f"{SHARDS_DIR}/{name}: no {shard_name(parsed[0])}{STATS_SUFFIX}, so the unit is not committed (interrupted write); resume `generate`")
    if not units:
        problems.append(f"{store.url.rstrip('/')}/{SHARDS_DIR}: no committed units")
        return problems
    seen: dict[str, int] = {}
    for unit, stats in units.items():
        problems += _check_unit(store, unit, stats, seen)
    problems += _check_run_files(store, units)
    return problems
