"""The per-seed lease (``SeedLease``): one run writes a seed at a time; another waits for it, or takes the lease
over when its holder died (a pid gone on this host) or stopped renewing it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from stillroom.pipelines.core import Location, StoreError

# A holder renews its lease every LEASE_TIMEOUT_S / 4; one not renewed for LEASE_TIMEOUT_S is taken over. A holder
# on this host whose process is gone is taken over at once. Hosts' clocks are assumed to agree to well within it.
LEASE_TIMEOUT_S = 120.0


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``; None elsewhere): with the pid, it
    tells a live holder from a new process that reuses its pid."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_namespace() -> str | None:
    """This process's pid namespace and boot (Linux): two containers on one host network share a host name, not
    their pids; a holder's pid means something here only when both match."""
    try:
        return f"{os.readlink('/proc/self/ns/pid')}@{Path('/proc/sys/kernel/random/boot_id').read_text().strip()}"
    except OSError:
        return None


def _alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # there, but another user's
    return start is None or _process_start(pid) in (None, start)


class SeedLease:
    """The right to write one seed: at most one run holds it at a time (``LabelStore.lease``).

    Why our own lease rather than a lock library's: it must work alike on a local disk and on object storage,
    where a lock is a conditional create and nothing else (no flock, no rename). The lease is a directory of
    generations, ``<g>.json``, each made by an exclusive create (``Location.create``: link(2) locally, a PUT
    with ``If-None-Match: *`` on S3). The highest generation is the lease. Its record names the holder (host,
    pid, process start, when it was taken) and when it was last renewed; the holder rewrites it every
    ``timeout_s / 4`` from a thread. Another run takes the lease over by creating generation ``g + 1``, which
    only one of several takers can do, when the holder is dead (same host, its pid gone or reused) or silent
    for ``timeout_s``; the old holder finds the higher generation at its next renewal, or at ``check`` before
    it commits, and stops. Where the storage has no atomic create (a server that ignores ``If-None-Match``,
    fsspec's check-then-write elsewhere), the taker reads its record back and keeps the lease only if it holds
    its own token: two takers within one round trip could still both hold it, so point a cluster at storage
    with conditional writes (AWS S3, MinIO, GCS, local disks and NFS all have them).
    """

    def __init__(self, where: Location, timeout_s: float = LEASE_TIMEOUT_S):
        self.dir, self.timeout_s = where, float(timeout_s)
        self.generation: int | None = None
        self.taken_over: dict[str, Any] | None = None  # the record of the holder this lease was taken from
        self.record: dict[str, Any] = {}
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _generations(self) -> list[int]:
        names = self.dir.children()
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def _record(self, gen: int) -> dict[str, Any]:
        try:
            return dict((self.dir / f"{gen}.json").read_json())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def holder(self) -> dict[str, Any] | None:
        """The current holder's record (None: nobody holds the lease; ``{}``: one that cannot be read yet)."""
        gens = self._generations()
        if not gens:
            return None
        record = self._record(gens[-1])
        return None if record.get("released") else record

    def _lapsed(self, record: dict[str, Any], gen: int) -> bool:
        """The holder of ``record`` is dead or has been silent past the timeout. Dead at once only where its pid
        means the same process here: this host, pid namespace and boot (``_pid_namespace``)."""
        if record.get("released"):
            return True
        if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int) \
                and record.get("pid_namespace") is not None and record.get("pid_namespace") == _pid_namespace() \
                and not _alive(record["pid"], record.get("process_start")):
            return True
        try:
            renewed = float(record.get("renewed_at") or (self.dir / f"{gen}.json").modified())
        except FileNotFoundError:
            return False  # released meanwhile: try again
        return time.time() - renewed > self.timeout_s

    def acquire(self) -> bool:
        """Take the lease if nobody holds it or its holder lapsed; True when this process holds it now."""
        if self.generation is not None:
            raise StoreError("this lease is held already")
        gens = self._generations()
        previous = None
        if gens:
            previous = self._record(gens[-1])
            if not self._lapsed(previous, gens[-1]):
                return False
            if previous.get("released"):
                previous = None  # released: nobody's lease is taken over
        gen = gens[-1] + 1 if gens else 0
        now = time.time()
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                       "pid_namespace": _pid_namespace(),
                       "taken_at": now, "renewed_at": now, "generation": gen, "token": uuid.uuid4().hex,
                       **({"took_over": {k: previous.get(k) for k in ("host", "pid", "taken_at", "renewed_at")}}
                          if previous is not None else {})}
        mine = self.dir / f"{gen}.json"
        if not mine.create(json.dumps(self.record).encode()):
            return False
        try:  # storage without an atomic create may have let another taker in: it holds the lease if it wrote last
            if mine.read_json().get("token") != self.record["token"]:
                return False
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        self.generation, self.taken_over = gen, previous
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.dir.name}", daemon=True)
        self._thread.start()
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            try:
                self.renew()
            except StoreError:
                return
            except OSError:
                continue  # storage briefly unreachable: try again; silent past the timeout, the lease lapses

    def renew(self) -> None:
        """Say the holder is alive; a StoreError if the lease was taken over meanwhile."""
        self.check()
        self.record["renewed_at"] = time.time()
        (self.dir / f"{self.generation}.json").write_json(self.record, indent=None)

    def check(self) -> None:
        """Refuse (StoreError) if this process does not hold the lease, or another run took it over."""
        if self.generation is None:
            raise StoreError(f"lease {self.dir} is not held")
        if self._lost.is_set() or not fence_open(self.dir, self.generation):
            self._lost.set()
            raise StoreError(f"lease {self.dir} was taken over by another run (it was silent for over "
                             f"{self.timeout_s:g} s); that run finishes the seed")

    def release(self, final: bool = False) -> None:
        """Stop renewing; mark this generation released (its file stays, so generations only grow and a holder
        that was paused and taken over finds a higher one, even after its taker released) and remove the older
        generations (a lease taken over: nothing). ``final``: the seed is complete, nothing will write it again:
        remove every generation (a superseded holder then finds none, which ``fence_open`` refuses too)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.generation is None:
            return
        gens = self._generations()
        if not self._lost.is_set() and not any(g > self.generation for g in gens):
            if final:
                (self.dir / f"{self.generation}.json").remove()
            else:
                (self.dir / f"{self.generation}.json").write_json({**self.record, "released": time.time()},
                                                                  indent=None)
            for g in gens:
                if g < self.generation:
                    (self.dir / f"{g}.json").remove()
        self.generation = None

    def describe(self) -> str:
        """``host 1234 since 12:01:02 UTC`` for the current holder."""
        record = self.holder()
        if not record:
            return "nobody" if record is None else "a run that is taking it now"
        when = time.strftime("%H:%M:%S UTC", time.gmtime(float(record.get("taken_at", 0))))
        return f"pid {record.get('pid')} on {record.get('host')} since {when}"
def fence_open(lease_dir: Location, generation: int) -> bool:
    """Whether generation ``generation`` of the lease in ``lease_dir`` still holds it: no higher generation
    exists and its own is not released. A write made under a lease asks this first (the fence)."""
    names = lease_dir.children()
    gens = sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())
    if not gens or gens[-1] != generation:
        return False
    try:
        return not (lease_dir / f"{generation}.json").read_json().get("released")
    except (FileNotFoundError, json.JSONDecodeError):
        return False
