"""The output lease (stages.output.lease) on local disk: one holder, refusal naming it, heartbeat,
takeover of a stale lease (dead process on this host, or an old heartbeat from another
host), exactly one winner when several take over at once, and loss detection."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from schemas.layout import LEASE_FILE
from stages.errors import UserError
from stages.output.lease import Lease
from stages.readers.output_state import is_live, read_lease
from stages.storage import LocalStore

pytestmark = pytest.mark.timeout(120)


def foreign_lease(store, **fields) -> dict:
    info = {"producer": "mergemix-pipeline", "what": "generate", "token": "t-other", "host": "other-host", "pid": 4242,
            "pid_start": None, "started": "2026-01-01 00:00:00", "heartbeat": time.time(), "ttl": 60.0} | fields
    store.write_bytes(LEASE_FILE, json.dumps(info).encode())
    return info


def test_one_holder_refusal_names_it_and_release(tmp_path):
    store = LocalStore(tmp_path)
    first = Lease(store, "generate", interval=0.1).acquire()
    try:
        with pytest.raises(UserError) as err:
            Lease(store, "generate").acquire()
        msg = str(err.value)
        assert "\n" not in msg and f"host {socket.gethostname()}" in msg and "pid" in msg and "another generate" in msg
        before = read_lease(store)["heartbeat"]
        time.sleep(0.35)
        assert read_lease(store)["heartbeat"] > before  # the heartbeat keeps it fresh
        assert not first.lost.is_set()
    finally:
        first.release()
    assert not store.exists(LEASE_FILE)
    Lease(store, "generate").acquire().release()  # free again


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    store = LocalStore(tmp_path)
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    foreign_lease(store, host=socket.gethostname(), pid=dead)
    assert not is_live(read_lease(store))
    lease = Lease(store, "generate", settle=0.05).acquire()
    assert read_lease(store)["token"] == lease.token
    lease.release()


def test_another_hosts_lease_is_live_until_its_heartbeat_is_old(tmp_path):
    store = LocalStore(tmp_path)
    foreign_lease(store)
    with pytest.raises(UserError, match="host other-host, pid 4242"):
        Lease(store, "generate").acquire()
    foreign_lease(store, heartbeat=time.time() - 61)
    lease = Lease(store, "generate", settle=0.05).acquire()
    assert read_lease(store)["token"] == lease.token
    lease.release()


def test_of_runs_taking_over_a_stale_lease_at_once_exactly_one_wins(tmp_path):
    store = LocalStore(tmp_path)
    foreign_lease(store, heartbeat=time.time() - 600)
    winners, refused, start = [], [], threading.Barrier(4)

    def take():
        lease = Lease(store, "generate", settle=0.3, interval=60)
        start.wait()
        try:
            winners.append(lease.acquire())
        except UserError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(refused) == 3, (winners, refused)
    assert read_lease(store)["token"] == winners[0].token
    winners[0].release()


def test_losing_the_lease_is_noticed(tmp_path):
    store = LocalStore(tmp_path)
    lease = Lease(store, "generate", interval=0.05).acquire()
    foreign_lease(store)  # another run wrote over it (as after a takeover)
    deadline = time.monotonic() + 5
    while not lease.lost.is_set() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lease.lost.is_set()
    lease.release()
    assert read_lease(store)["token"] == "t-other"  # release never removes somebody else's lease
