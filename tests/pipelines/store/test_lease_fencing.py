"""Seed leases fence their writers (issue 32 item 5): a holder paused with SIGSTOP and taken over writes nothing
more when it runs again, and does not hold the lease again after its taker released it; a live holder in another
pid namespace of the same host is not taken over at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from stillroom.pipelines.core import Location
from stillroom.pipelines.store import LabelStore, SeedLease, StoreError, StoreSchema

SCHEMA = StoreSchema(num_samples=64, num_classes=4, top_k=2, chunk_rows=32)


def _piece(value: float, start: int, stop: int) -> dict[str, np.ndarray]:
    n = stop - start
    out = {}
    for name, (shape, dtype) in SCHEMA.arrays().items():
        out[name] = np.full((n, *shape[1:]), value, dtype=dtype)
    return out


CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from stillroom.pipelines.store import LabelStore, StoreError
    sys.path.insert(0, sys.argv[2])
    from test_lease_fencing import _piece

    store = LabelStore(sys.argv[1])
    lease = store.lease(0, timeout_s=1.0)
    assert lease.acquire()
    print(lease.generation, flush=True)
    for line in sys.stdin:
        try:
            if line.strip() == "write":
                store.write_piece(0, 0, 0, _piece(7.0, 0, 32), generation=lease.generation)
            else:
                lease.check()
            print(json.dumps("ok"), flush=True)
        except StoreError as e:
            print(json.dumps(str(e)), flush=True)
    lease.release()
""")


def test_a_paused_holder_taken_over_writes_nothing_and_stays_out_after_the_taker_released(tmp_path):
    store = LabelStore.create(tmp_path, {"test": "fencing"}, SCHEMA)
    store.begin_seed(0)
    here = os.path.dirname(__file__)
    old = subprocess.Popen([sys.executable, "-c", CHILD, str(store.path), here], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        assert old.stdout is not None and old.stdin is not None
        assert old.stdout.readline().strip() == "0"
        os.kill(old.pid, signal.SIGSTOP)  # a long GC, a frozen VM: no renewal
        time.sleep(1.6)
        new = store.lease(0, timeout_s=1.0)
        assert new.acquire() and new.generation == 1 and new.taken_over["pid"] == old.pid
        for i, (a, b) in enumerate(SCHEMA.pieces()):
            store.write_piece(0, i, a, _piece(1.0 + i, a, b), generation=new.generation)
        os.kill(old.pid, signal.SIGCONT)

        def ask(what: str) -> str:
            old.stdin.write(what + "\n")
            old.stdin.flush()
            return str(json.loads(old.stdout.readline()))

        assert "superseded" in ask("write")  # its piece 0 over the new holder's: refused
        store.commit_seed(0, new)
        new.release(final=True)  # the seed is complete: no generation file is left
        time.sleep(0.5)  # the old holder's renew thread runs meanwhile
        assert "taken over" in ask("check")  # before: the taker's release deleted every generation: held again
        assert "complete already" in ask("write")
        assert store.lease(0).holder() is None
    finally:
        if old.poll() is None:
            os.kill(old.pid, signal.SIGCONT)
            old.stdin.close()  # type: ignore[union-attr]
            old.wait(timeout=30)
    assert store.verify() == []  # COMPLETE's checksums are those of the arrays
    np.testing.assert_array_equal(store.load(0).arrays["lse"], np.repeat([1.0, 2.0], 32))


def test_a_write_without_the_lease_generation_is_refused(tmp_path):
    store = LabelStore.create(tmp_path, {"test": "fencing"}, SCHEMA)
    store.begin_seed(0)
    lease = store.lease(0)
    assert lease.acquire()
    with pytest.raises(StoreError, match="generation 5 was superseded"):
        store.write_piece(0, 0, 0, _piece(1.0, 0, 32), generation=5)
    lease.release()
    with pytest.raises(StoreError, match="superseded"):  # released: its own generation is fenced too
        store.write_piece(0, 0, 0, _piece(1.0, 0, 32), generation=lease.generation or 0)
    again = store.lease(0)
    assert again.acquire() and again.generation == 1 and again.taken_over is None  # generations only grow
    again.release()


def test_a_holder_in_another_pid_namespace_is_not_taken_over_at_once(tmp_path):
    import socket

    where = Location(tmp_path / "l")
    where.makedirs()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # gone here; in another container of this host network, a live process may have it
    now = time.time()
    record = {"host": socket.gethostname(), "pid": pid, "process_start": None, "taken_at": now, "renewed_at": now,
              "generation": 0, "token": "x", "pid_namespace": "pid:[1]@another-container"}
    (where / "0.json").write_json(record)
    assert not SeedLease(where).acquire()  # renewed just now, its pid is not ours to judge
    mine = SeedLease(Location(tmp_path / "mine"))
    assert mine.acquire()
    ours = mine.record["pid_namespace"]  # this process's, as a lease records it
    mine.release()
    assert ours and ours != record["pid_namespace"]
    (where / "0.json").write_json({**record, "pid_namespace": ours})
    lease = SeedLease(where)
    assert lease.acquire() and lease.taken_over["pid"] == pid  # this namespace, pid gone: dead, taken at once
    lease.release()
