"""An output directory as a whole: its committed units, the leftovers of interrupted writes,
its run files, and whether it is finished. Only names of schemas.layout are ever touched:
other files in OUT (someone's notes, a `999999.tar` outside the plan, subfolders) are left
alone by the cleanup and by `--overwrite`.
"""
from __future__ import annotations

import json

from schemas.layout import (
    CARD_FILE,
    INDEX_FILE,
    RUN_FILE,
    SHARDS_DIR,
    STATS_SUFFIX,
    is_our_card,
    is_ours,
    is_root_tmp_file,
    parse_tmp_file,
    parse_unit_file,
    stats_name,
    unit_files,
)
from stages.errors import UserError
from stages.lease import describe, is_live, read_lease


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


def remove_leftovers(store, units: range | None = None) -> list[str]:
    """Delete what `leftovers` lists (before a resume); returns the names."""
    names = leftovers(store, units)
    for name in names:
        store.delete(name)
    return names


def remove_output(store, units: range | None = None) -> None:
    """--overwrite: delete our run files, our card, every committed unit and our leftovers; nothing else."""
    for unit in committed_units(store):
        for name in reversed(unit_files(unit)):  # stats first: a crash midway leaves leftovers, not a broken unit
            store.delete(shard(name))
    remove_leftovers(store, units)
    for name in (RUN_FILE, INDEX_FILE):
        store.delete(name)
    if card_owner(store) == "ours":
        store.delete(CARD_FILE)


def card_owner(store) -> str:
    """Who OUT/README.md belongs to: 'absent', 'ours' (it carries our marker) or 'foreign'."""
    try:
        data = store.read_bytes(CARD_FILE)
    except FileNotFoundError:
        return "absent"
    except OSError:  # a folder of that name, unreadable: not ours to touch
        return "foreign"
    return "ours" if is_our_card(data) else "foreign"


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
