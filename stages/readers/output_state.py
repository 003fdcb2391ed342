"""What an output holds, as any reader sees it: its committed units and their stats, the leftovers of
interrupted writes, its run files, its dataset card (ours or not, and the tars it lists), and whether
a `generate` run is writing it (a live lease: stages.output.lease). Only reads; the driver's cleanup
is stages.output.cleanup."""
from __future__ import annotations

import json
import os
import socket
import time

import yaml

from schemas.layout import (
    CARD_FILE,
    LEASE_FILE,
    RUN_FILE,
    SHARDS_DIR,
    STATS_SUFFIX,
    is_our_card,
    is_ours,
    is_root_tmp_file,
    parse_tmp_file,
    parse_unit_file,
    stats_name,
)
from stages.errors import UserError


TTL_S = 60.0  # a lease whose heartbeat is older than this is stale


def shard(name: str) -> str:
    return f"{SHARDS_DIR}/{name}"


def read_stats(store, unit_id: int) -> dict | None:
    """Stats of a committed unit, or None if the unit is not committed (or its stats are unreadable)."""
    try:
        stats = json.loads(store.read_bytes(shard(stats_name(unit_id))))
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) and stats.get("unit") == unit_id else None


def committed_units(store) -> dict[int, dict]:
    """Unit id -> stats, for committed units only, in unit order."""
    result = {}
    for name in store.list(SHARDS_DIR):
        parsed = parse_unit_file(name)
        if parsed and parsed[1] == STATS_SUFFIX and (stats := read_stats(store, parsed[0])) is not None:
            result[parsed[0]] = stats
    return dict(sorted(result.items()))


def leftovers(store, units: range | None = None) -> list[str]:
    """Names (relative to the store) of our temporary files and of tar/Parquet files of
    uncommitted units. With `units`, only files of those units count as leftovers (a
    `999999.tar` outside the plan is somebody else's)."""
    committed = set(committed_units(store))
    found = [name for name in store.list() if is_root_tmp_file(name)]
    for name in store.list(SHARDS_DIR):
        tmp_unit = parse_tmp_file(name)
        parsed = parse_unit_file(name)
        if tmp_unit is not None:
            mine = units is None or tmp_unit in units
        elif parsed and parsed[1] != STATS_SUFFIX:
            mine = parsed[0] not in committed and (units is None or parsed[0] in units)
        else:
            mine = False
        if mine:
            found.append(shard(name))
    return found


def card_owner(store) -> str:
    """Who OUT/README.md belongs to: 'absent', 'ours' (it carries our marker) or 'foreign'."""
    try:
        data = store.read_bytes(CARD_FILE)
    except FileNotFoundError:
        return "absent"
    except OSError:  # a folder of that name, unreadable: not ours to touch
        return "foreign"
    return "ours" if is_our_card(data) else "foreign"


def card_tars(data: bytes) -> list[str] | None:
    """The tar names listed by a card's default config (None when it lists none or does not parse)."""
    text = data.decode("utf-8", errors="replace")
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        return None
    try:
        meta = yaml.safe_load(text[4 : text.index("\n---\n", 4)])
        paths = meta["configs"][0]["data_files"][0]["path"]
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        return None
    return [paths] if isinstance(paths, str) else list(paths) if isinstance(paths, list) else None


def read_run_file(store, name: str = RUN_FILE) -> dict | None:
    """Our run.json (or index.json), None when absent; a file of that name that we did not
    write is refused: it is somebody else's, and generate never overwrites it."""
    try:
        data = store.read_bytes(name)
    except FileNotFoundError:
        return None
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    if not is_ours(parsed):
        raise UserError(f"{store.url}/{name} was not written by mergemix-pipeline; it is left untouched: "
                        "choose another --output")
    return parsed


def require_finished(store, where, allow_partial: bool, partial_action: str) -> list[str]:
    """Why the output is not a finished run (empty when it is), refused in one line unless
    `allow_partial`; `partial_action` says what --allow-partial then does."""
    reasons = unfinished(store)
    if reasons and not allow_partial:
        raise UserError(f"{where} is not a finished generate run: {'; '.join(reasons)}; let generate finish "
                        f"(or rerun it), or pass --allow-partial to {partial_action}")
    return reasons


def unfinished(store) -> list[str]:
    """Why an output is not a finished `generate` run (empty when it is): what `train`
    refuses without --allow-partial."""
    reasons = []
    lease = read_lease(store)
    if is_live(lease):
        reasons.append(f"a generate run is writing it ({describe(lease)})")
    try:
        run = read_run_file(store)
    except UserError as exc:
        return reasons + [str(exc)]
    if run is None:
        reasons.append(f"it has no {RUN_FILE} (generate did not finish)")
    else:
        planned, committed = run.get("units_planned"), len(committed_units(store))
        if run.get("failed_units"):
            reasons.append(f"{len(run['failed_units'])} unit(s) failed: {', '.join(sorted(run['failed_units']))}")
        if isinstance(planned, int) and committed < planned:
            reasons.append(f"{committed} of {planned} units are committed")
    left = leftovers(store)
    if left:
        reasons.append(f"{len(left)} uncommitted file(s) of an interrupted write, e.g. {left[0]}")
    return reasons


def read_lease(store) -> dict | None:
    """The lease file's content, or None when there is none (or it is unreadable)."""
    try:
        info = json.loads(store.read_bytes(LEASE_FILE))
    except (FileNotFoundError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def is_live(info: dict | None, now: float | None = None) -> bool:
    """Whether a lease is held by a running process (see the module docstring)."""
    if not info:
        return False
    now = time.time() if now is None else now
    if now - float(info.get("heartbeat", 0)) > float(info.get("ttl", TTL_S)):
        return False
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        return _alive(info["pid"], info.get("pid_start"))
    return True


def describe(info: dict, now: float | None = None) -> str:
    """One line naming a lease's holder."""
    age = (now or time.time()) - float(info.get("heartbeat", 0))
    return (f"host {info.get('host')}, pid {info.get('pid')}, started {info.get('started')}, "
            f"last heartbeat {age:.0f} s ago")


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = process_start(pid)
    return start is None or now is None or now == start


def process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), so a reused pid is not mistaken
    for the holder; None where /proc is not available."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def recorded_attn_layer(store) -> int | None:
    """The saliency block the committed units of an output were made with (their ok rows'
    attn_layer), or None when none is committed: what `--attn-layer auto` keeps on a resume."""
    import pyarrow.parquet as pq

    for stats in committed_units(store).values():
        name = shard(stats["parquet"]["file"]) if isinstance(stats.get("parquet"), dict) else None
        if name is None:
            continue
        table = pq.read_table(store.open_read(name), columns=["status", "attn_layer"]).to_pylist()
        layers = {r["attn_layer"] for r in table if r["status"] == "ok" and r["attn_layer"] is not None}
        if layers:
            return min(layers)
    return None
