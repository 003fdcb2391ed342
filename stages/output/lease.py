"""The output lease: one `generate` run writes an output at a time.

A run holds `OUT/.mergemix-lease.json` (who: host, pid, start time; a random token; a
heartbeat time) and rewrites it every `interval` seconds from a background thread. A second
run that finds a live lease refuses in one line naming the holder. A lease is stale when its
heartbeat is older than its `ttl`, or at once when its holder ran on this host and that
process is gone (a killed driver); a stale lease is taken over: the new holder writes its
own and reads it back after a settle delay, so of two runs taking over at once exactly one
keeps it. Only the store's basic operations are used (create-if-absent, atomic write,
read), so the same protocol works wherever the store does.

If the heartbeat finds another token in the file (its run was so stalled that another run
took over), `lost` is set and the run stops feeding units.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from schemas.layout import LEASE_FILE, PRODUCER
from stages.errors import UserError
from stages.readers.output_state import TTL_S, describe, is_live, process_start, read_lease

INTERVAL_S = 10.0  # heartbeat period
SETTLE_S = 1.0  # wait before reading back a lease written over a stale one


@dataclass
class Lease:
    store: object
    what: str  # e.g. "generate": named in the refusal another run prints
    ttl: float = TTL_S
    interval: float = INTERVAL_S
    settle: float = SETTLE_S
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    lost: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _started: str = ""

    def _content(self) -> bytes:
        pid = os.getpid()
        info = {"producer": PRODUCER, "what": self.what, "token": self.token, "host": socket.gethostname(),
                "pid": pid, "pid_start": process_start(pid), "started": self._started,
                "heartbeat": time.time(), "ttl": self.ttl}
        return (json.dumps(info, indent=1) + "\n").encode()

    def acquire(self) -> "Lease":
        """Take the lease or raise UserError naming its holder."""
        self._started = time.strftime("%Y-%m-%d %H:%M:%S")
        for _ in range(5):  # each round either decides or saw the file change under it
            current = read_lease(self.store)
            if current is None:
                if self.store.create_exclusive(LEASE_FILE, self._content()):
                    break
                continue  # another run created it in between: look at it
            if is_live(current):
                raise UserError(f"{self.store.url} is being written by another {current.get('what', 'run')} "
                                f"({describe(current)}); wait for it to end, or use another --output")
            self.store.write_bytes(LEASE_FILE, self._content())  # take over the stale lease
            time.sleep(self.settle)
            if (read_lease(self.store) or {}).get("token") == self.token:
                break
        else:
            raise UserError(f"could not take the lease on {self.store.url}: other runs keep changing it")
        self._thread = threading.Thread(target=self._beat, name="mergemix-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                if (read_lease(self.store) or {}).get("token") != self.token:
                    self.lost.set()
                    return
                self.store.write_bytes(LEASE_FILE, self._content())
                last_ok = time.monotonic()
            except OSError:
                if time.monotonic() - last_ok > self.ttl:  # others may take it over now
                    self.lost.set()
                    return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if (read_lease(self.store) or {}).get("token") == self.token:
                self.store.delete(LEASE_FILE)
        except OSError:  # a lease left behind goes stale on its own
            pass

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
