"""The job database on a real SQLite file: concurrent submissions are inserted in groups (one transaction
for the records queued together), every one of them is recorded, and a bad record fails only its own."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError

from stillroom.services.db import Database, Job, new_job_id


def record(key: str | None = None, **fields) -> Job:
    return Job(id=new_job_id(), kind="label", state="SUCCEEDED", spec={"n": 1}, spec_hash="h",
               idempotency_key=key, created_at=time.time(), **{"cache_hit": True, **fields})


def test_concurrent_inserts_all_land_in_fewer_transactions(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
    commits = []
    event.listen(db.engine, "commit", lambda conn: commits.append(threading.get_ident()))
    start = threading.Barrier(16)

    def add(i: int) -> str:
        start.wait()
        # records with and without optional columns: the group inserts each set of columns apart
        return db.add(record(result={"i": i}) if i % 2 else record(cache_key=f"k{i}")).id

    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(add, range(16 * 20)))
    transactions = len(commits)
    assert len(set(ids)) == 320
    assert all(db.get(i) is not None for i in ids)
    assert db.get(ids[1]).result == {"i": 1} and db.get(ids[0]).cache_key == "k0"
    assert transactions < 320  # grouped: fewer transactions than records (each waiting thread's record joins)
    db.close()


def test_a_bad_record_in_a_group_fails_only_its_own_submission(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
    db.add(record(key="taken"))
    start = threading.Barrier(8)
    outcomes: dict[int, str] = {}

    def add(i: int) -> None:
        start.wait()
        try:
            db.add(record(key="taken" if i == 3 else f"free-{i}"))
            outcomes[i] = "ok"
        except IntegrityError:
            outcomes[i] = "refused"

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(add, range(8)))
    assert outcomes == {i: "refused" if i == 3 else "ok" for i in range(8)}
    assert all(db.by_idempotency_key(f"free-{i}") is not None for i in range(8) if i != 3)
    with pytest.raises(IntegrityError):
        db.add(record(key="taken"))  # alone, too
    db.close()


def test_labels_written_counts_the_views_of_finished_label_jobs(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
    db.add(record(result={"views": 512, "images": 256}, cache_hit=False))
    db.add(record(result={"samples": 64}, cache_hit=False))  # a result written before the key was named views
    db.add(record(result={"views": 1000}))  # a cache hit labels nothing
    assert db.counts()["labels_written"] == 512 + 64
    db.close()
