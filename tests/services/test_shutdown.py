"""A service that started its own Ray head: no secret of it reaches Ray, and stopping it (SIGTERM) cancels
its running jobs, records them CANCELLED with the reason, and leaves no process of theirs (or of the head).

The database is the test PostgreSQL server, named on the command line with its password, as people do
(where there is no PostgreSQL, the SQLite default, and only the API token is looked for).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from postgres_server import postgres  # noqa: F401  (a fixture)
from serving import TOKEN, Server, wait

pytestmark = [pytest.mark.ray, pytest.mark.slow]

LONG_TEACHER = {"dataset": "synthetic:n=4096,classes=4,size=16", "model": "test_resnet", "epochs": 50}


def processes() -> list[dict]:
    """Every process: pid, parent, process group, session and command line (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if fields[0] == "Z":  # a zombie has ended; only its parent has not reaped it yet
            continue
        out.append({"pid": int(d.name), "ppid": int(fields[1]), "pgid": int(fields[2]), "sid": int(fields[3]),
                    "cmd": cmd})
    return out


def environ(pid: int) -> str:
    return (Path("/proc") / str(pid) / "environ").read_bytes().replace(b"\0", b"\n").decode(errors="replace")


def start_with_a_running_job(root: Path, db: str = "", password: str | None = None) -> dict:
    """The service on its own Ray head with a long teacher job RUNNING; what the job and the head run as."""
    (root / "data").mkdir()
    server = Server(root, None, db).start()
    try:
        with server.client() as http:
            job = http.post("/v1/teacher-jobs", json=LONG_TEACHER).json()
            wait(http, job["id"], states=("RUNNING",), timeout=120)
            process_file = root / "state" / "jobs" / job["id"] / "process.json"
            deadline = time.monotonic() + 60
            while not process_file.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            job_process = json.loads(process_file.read_text())
    except BaseException:
        server.stop()
        raise
    head = [p for p in processes() if p["ppid"] == server.proc.pid and " start --head" in p["cmd"]]
    return {"server": server, "job": job, "process": job_process, "db": db, "password": password, "head": head}


@pytest.fixture(scope="module")
def running(tmp_path_factory, request):
    try:
        pg = request.getfixturevalue("postgres")
        db, password = pg.new_database(), pg.password
    except pytest.skip.Exception:
        db, password = "", None
    started = start_with_a_running_job(tmp_path_factory.mktemp("own-ray"), db, password)
    yield started
    started["server"].stop()


def test_no_secret_reaches_ray(running):
    from ray.job_submission import JobSubmissionClient

    server, job = running["server"], running["job"]
    secrets = {"API token": TOKEN, **({"database password": running["password"]} if running["password"] else {})}
    ray_token_file = Path.home() / ".ray" / "auth_token"
    headers = {"Authorization": f"Bearer {ray_token_file.read_text().strip()}"} if ray_token_file.exists() else {}
    ray_jobs = JobSubmissionClient(server.client().get("/healthz").json()["dashboard"], headers=headers)
    listed = ray_jobs.list_jobs()  # what the dashboard's job table shows: submitted jobs and drivers
    assert any(j.submission_id == job["ray_job_id"] for j in listed)
    assert not [j for j in listed if j.type.value == "DRIVER"]  # the service is no Ray driver
    seen = {
        "Ray's job list": json.dumps([j.model_dump() for j in listed], default=str),
        "the job's Ray log": ray_jobs.get_job_logs(job["ray_job_id"]),
        "the job's environment": environ(running["process"]["pid"]),
        "the job's record": server.client().get(f"/v1/jobs/{job['id']}").text,
        "the service's log": (server.root / "serve.log").read_text(),
        "the Ray head's log": (server.root / "state" / "ray-head.log").read_text(),
    }
    for where, text in seen.items():
        for what, secret in secrets.items():
            assert secret not in text, f"the {what} is in {where}"
    assert "job_entry" in seen["Ray's job list"]  # the check looked at the real table


def test_sigterm_cancels_running_jobs_and_leaves_nothing_alive(running):
    stop_and_check(running, signal.SIGTERM, 128 + signal.SIGTERM)


def test_ctrl_c_does_the_same(tmp_path):
    started = start_with_a_running_job(tmp_path)
    try:
        stop_and_check(started, signal.SIGINT, 130)  # `stillroom: interrupted`
    finally:
        started["server"].stop(signal.SIGKILL)


def stop_and_check(running: dict, sig: int, exit_code: int) -> None:
    """``sig`` to the service: it exits with ``exit_code``, nothing of the job or the head is left, and the
    job's record is CANCELLED with the reason."""
    from stillroom.services.db import Database

    server, job, proc = running["server"], running["job"], running["process"]
    assert running["head"], "the service's own Ray head was not found among its children"
    head_pid = running["head"][0]["pid"]
    assert any(p["pid"] == proc["pid"] for p in processes())  # the job runs
    assert server.stop(sig) == exit_code
    left = [p for p in processes() if p["pgid"] == proc["pgid"] or p["pid"] == proc["pid"]
            or p["sid"] == head_pid or p["pgid"] == head_pid]
    assert not left, f"still alive after the service stopped: {left}"
    records = Database(running["db"] or f"sqlite:///{server.root / 'state' / 'jobs.db'}")
    record = records.get(job["id"])
    records.close()
    assert record is not None and record.state == "CANCELLED"
    assert "the service stopped" in (record.error or "")
    assert "cancelled 1 running job" in (server.root / "serve.log").read_text()
