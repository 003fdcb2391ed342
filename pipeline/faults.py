"""TEST-ONLY fault injection for the reliability tests (tests/test_faults.py, tests/test_object_store.py):
the encoder actor calls `injected_fault` before each unit; it is inert unless MERGEMIX_TEST_FAULTS is set."""
from __future__ import annotations

import os
import time
from pathlib import Path

# MERGEMIX_TEST_FAULTS names a directory; for unit N a file there named "raise-N" makes every
# attempt raise, "kill-N" makes the actor SIGKILL itself once (the file is claimed by rename),
# "hold-N" parks every attempt while the file exists (at most 120 s), "stall-N" parks the
# first attempt for 300 s (claimed by rename, so the retry goes through). Each attempt
# appends "N pid" to attempts.log.
FAULTS_ENV = "MERGEMIX_TEST_FAULTS"


def injected_fault(unit_id: int) -> None:
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
    if _claim(folder, "stall", unit_id):
        time.sleep(300)
    if (folder / f"raise-{unit_id}").exists():
        raise RuntimeError(f"injected fault in unit {unit_id}")
    if _claim(folder, "kill", unit_id):
        os.kill(os.getpid(), signal.SIGKILL)


def _claim(folder: Path, what: str, unit_id: int) -> bool:
    try:
        os.rename(folder / f"{what}-{unit_id}", folder / f"{what}ed-{unit_id}")
        return True
    except FileNotFoundError:
        return False
