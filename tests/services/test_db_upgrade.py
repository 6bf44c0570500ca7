"""A job database made before a column was added (``attempts``) gains it when the service opens it, its rows kept."""

from __future__ import annotations

import sqlite3

from stillroom.services.db import Database, Job, JobState, now


def test_an_old_database_gains_the_attempts_column(tmp_path):
    path = tmp_path / "jobs.db"
    db = Database(f"sqlite:///{path}")
    db.add(Job(id="job_old", kind="train", state=JobState.FAILED.value, spec={}, spec_hash="h", created_at=now()))
    db.engine.dispose()
    with sqlite3.connect(path) as conn:  # as the earlier version made it
        conn.execute("ALTER TABLE jobs DROP COLUMN attempts")
    db = Database(f"sqlite:///{path}")
    old = db.get("job_old")
    assert old is not None and old.attempts is None and old.state == "FAILED"
    db.update("job_old", attempts=[{"ray_job_id": "job_old", "state": "FAILED"}])
    assert Database(f"sqlite:///{path}").get("job_old").attempts == [{"ray_job_id": "job_old", "state": "FAILED"}]
