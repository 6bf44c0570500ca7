"""The per-seed lease: one writer per seed at a time; a second run waits and reuses the seed; a lease left by
a killed process, or by one silent past the timeout, is taken over; two label runs of overlapping seeds at
once both succeed, each seed computed once, and the store verifies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import make_teacher

from stillroom.pipelines.core import Location
from stillroom.pipelines.store import LabelStore, SeedLease, StoreError, StoreSchema

STILLROOM = str(Path(sys.executable).parent / "stillroom")


def test_one_holder_at_a_time_and_release_frees_it(tmp_path):
    first, second = SeedLease(Location(tmp_path / "l")), SeedLease(Location(tmp_path / "l"))
    assert first.acquire()
    try:
        assert not second.acquire()  # its holder (this process) is alive and renewing
        record = second.holder()
        assert record is not None and record["pid"] == os.getpid() and record["host"] and record["taken_at"] > 0
        first.check()
    finally:
        first.release()
    assert second.holder() is None and second.acquire() and second.generation == 1  # generations only grow
    second.release()


def test_store_commands_name_the_holder_of_a_partial_seed(tmp_path):
    from stillroom.services.cli.store import _partial

    schema = StoreSchema(num_samples=300, num_classes=12, top_k=3, chunk_rows=128)
    store = LabelStore.create(tmp_path, {"dataset": {"spec": "synthetic"}}, schema)
    store.begin_seed(4)
    assert _partial(store) == "seed 4 partial: 0 of 3 pieces done"  # begun, nobody on it: a rerun finishes it
    lease = store.lease(4)
    assert lease.acquire()
    try:
        assert _partial(store).startswith(f"seed 4 partial: 0 of 3 pieces done (being labeled by pid {os.getpid()} on ")
    finally:
        lease.release()


def test_renewal_keeps_a_lease_and_silence_loses_it(tmp_path):
    holder = SeedLease(Location(tmp_path / "l"), timeout_s=0.6)
    assert holder.acquire()
    first_renewal = holder.holder()["renewed_at"]
    time.sleep(1.0)  # past the timeout, but renewed every 0.15 s
    taker = SeedLease(Location(tmp_path / "l"), timeout_s=0.6)
    assert not taker.acquire() and holder.holder()["renewed_at"] > first_renewal

    holder._stop.set()  # the holder goes silent (a hung process, a partitioned node)
    holder._thread.join()
    time.sleep(0.8)
    assert taker.acquire() and taker.generation == 1
    assert taker.taken_over is not None and taker.taken_over["pid"] == os.getpid()
    with pytest.raises(StoreError, match="taken over"):
        holder.check()  # what commit_seed asks before it writes COMPLETE
    holder.release()  # removes nothing of the taker's
    assert taker.holder()["generation"] == 1
    taker.release()
    assert taker.holder() is None


def test_lease_of_a_killed_process_is_taken_over_at_once(tmp_path):
    where = tmp_path / "l"
    script = textwrap.dedent(f"""
        import os, signal
        from stillroom.pipelines.core import Location
        from stillroom.pipelines.store import SeedLease
        assert SeedLease(Location({str(where)!r})).acquire()
        print(os.getpid(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    dead_pid = int(proc.stdout)
    lease = SeedLease(Location(where))  # the default timeout (minutes): only the holder's death frees it now
    assert lease.holder()["pid"] == dead_pid
    assert lease.acquire() and lease.taken_over["pid"] == dead_pid
    lease.release()


def _label_cmd(teacher: str, seeds: str, root: Path) -> list[str]:
    return [STILLROOM, "label", "--no-ray", "--dataset", "synthetic:n=1024,classes=4,size=16", "--teacher", teacher,
            "--seeds", seeds, "--top-k", "3", "--chunk-rows", "64", "--batch-size", "64", "--store-root", str(root)]


@pytest.mark.slow
def test_two_runs_of_overlapping_seeds_compute_each_seed_once(tmp_path):
    teacher = make_teacher(tmp_path / "t.pt", resolution=48)
    root = tmp_path / "stores"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(_label_cmd(teacher, "0,1", root), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    second = None
    try:
        deadline = time.monotonic() + 120
        while not list(root.glob("*/leases/1/*.json")):  # the first run holds seeds 0 and 1
            if first.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the first run took no lease: {first.communicate()[1][-2000:]}")
            time.sleep(0.05)
        # the first run is held still until the second has seen seed 1 taken (however slowly it starts here)
        os.kill(first.pid, signal.SIGSTOP)
        try:
            second = subprocess.Popen(_label_cmd(teacher, "1,2", root), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env)
            err_lines: list[str] = []
            reader = threading.Thread(target=lambda: err_lines.extend(second.stderr), daemon=True)
            reader.start()
            waiting = f"seed 1 is being labeled by pid {first.pid}"
            while not any(waiting in line for line in err_lines):
                if second.poll() is not None or time.monotonic() > deadline + 240:
                    raise AssertionError(f"the second run did not wait for seed 1: {''.join(err_lines)[-2000:]}")
                time.sleep(0.05)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=600)
        second_out = second.stdout.read()
        second.wait(timeout=600)
        reader.join(timeout=30)
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.kill()
                proc.wait()
    assert first.returncode == 0 and second.returncode == 0, (err[-2000:], "".join(err_lines)[-2000:])
    a, b = json.loads(out.splitlines()[-1]), json.loads(second_out.splitlines()[-1])
    assert a["seeds_computed"] == [0, 1] and a["seeds_reused"] == []
    assert b["seeds_computed"] == [2] and b["seeds_reused"] == [1]  # waited for seed 1, did not label it
    assert a["views"] == 2 * 1024 and b["views"] == 1024  # each seed computed once
    store = LabelStore(a["store"])
    assert store.seeds() == [0, 1, 2] and store.partial_seeds() == {} and store.verify() == []
    assert not list(root.glob("*/leases/*/*.json"))  # every lease released
    verify = subprocess.run([STILLROOM, "store", "verify", a["store"]], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and "every checksum matches" in verify.stdout
