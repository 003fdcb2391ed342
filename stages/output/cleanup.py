"""The driver's cleanup of an output: the leftovers of interrupted writes before a resume, and our
files on --overwrite. Only names of schemas.layout are ever touched: other files in OUT (someone's
notes, a `999999.tar` outside the plan, subfolders) are left alone."""
from __future__ import annotations

from schemas.layout import CARD_FILE, INDEX_FILE, RUN_FILE, unit_files
from stages.readers.output_state import card_owner, committed_units, leftovers, shard


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
