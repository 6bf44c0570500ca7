"""The job service for real: `stillroom serve` on uvicorn at 127.0.0.1, jobs on the shared local Ray,
records in a SQLite file. Every server process is started here and ended here, by its pid."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import free_port, make_teacher

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TOKEN = "test-token-0123456789"
DATA = "synthetic:n=256,classes=4,size=16"
STILLROOM = str(Path(sys.executable).parent / "stillroom")


class Server:
    """One `stillroom serve` process on a free port, sharing the state dir across restarts."""

    def __init__(self, root: Path, dashboard: str):
        self.root, self.dashboard = root, dashboard
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        env = {**os.environ, "STILLROOM_API_TOKEN": TOKEN, "STILLROOM_DATA_ROOT": str(self.root / "data"),
               "STILLROOM_POLL_INTERVAL_S": "0.3"}
        with open(self.root / "serve.log", "ab") as log:
            self.proc = subprocess.Popen(
                [STILLROOM, "serve", "--port", str(self.port), "--ray-address", self.dashboard,
                 "--state-dir", str(self.root / "state"), "--store-root", str(self.root / "stores")],
                env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"service did not start: {(self.root / 'serve.log').read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


def wait(http: httpx.Client, job_id: str, states=("SUCCEEDED", "FAILED", "CANCELLED"), timeout=180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s: {job}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, ray_dashboard):
    root = tmp_path_factory.mktemp("service")
    (root / "data").mkdir()
    s = Server(root, ray_dashboard).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def teacher_ckpt(server) -> str:
    path = server.root / "state" / "teachers" / "given.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    return make_teacher(path)


def label_spec(teacher: str, seeds=(0, 1)) -> dict:
    return {"dataset": DATA, "teachers": [teacher], "seeds": list(seeds), "top_k": 3, "batch_size": 64}


def test_concurrent_identical_label_jobs_run_once_then_hit_the_cache(server, teacher_ckpt):
    spec = label_spec(teacher_ckpt)
    with server.client() as http, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: http.post("/v1/label-jobs", json=spec), range(50)))
        assert [a.status_code for a in answers] == [202] * 50
        jobs = [a.json() for a in answers]
        assert len({j["id"] for j in jobs}) == 50
        assert len({j["ray_job_id"] for j in jobs if not j["cache_hit"]}) == 1  # one labeling run
        done = [wait(http, j["id"]) for j in jobs]
        assert {d["state"] for d in done} == {"SUCCEEDED"}
        key = done[0]["cache_key"]
        assert key and all(d["cache_key"] == key for d in done)
        assert (server.root / "stores" / key / "seeds" / "1" / "COMPLETE").exists()
        # the same spec again: a cache hit, SUCCEEDED at once, no Ray job
        again = http.post("/v1/label-jobs", json=spec).json()
        assert again["state"] == "SUCCEEDED" and again["cache_hit"] and again["ray_job_id"] is None
        stores = http.get("/v1/stores").json()
        assert [s["cache_key"] for s in stores] == [key] and stores[0]["seeds"] == [0, 1]
        assert http.get(f"/v1/stores/{key}").json()["samples"] == 256
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "stillroom_cache_hits_total 1" in metrics and "stillroom_labels_written_total 512" in metrics
        logs = http.get(f"/v1/jobs/{done[0]['attached_to'] or done[0]['id']}/logs").text
        assert "stillroom job" in logs


def test_teacher_then_train_jobs_over_http(server):
    with server.client() as http:
        t = http.post("/v1/teacher-jobs", json={"dataset": DATA, "model": "test_resnet", "epochs": 1}).json()
        teacher = wait(http, t["id"])
        assert teacher["state"] == "SUCCEEDED", teacher["error"]
        assert teacher["progress"]["fraction"] == 1.0 and 0 <= teacher["result"]["top1"] <= 1
        assert teacher["dashboard_url"].endswith(teacher["ray_job_id"])
        # the same teacher spec again: the checkpoint is reused
        again = http.post("/v1/teacher-jobs", json={"dataset": DATA, "model": "test_resnet", "epochs": 1}).json()
        assert again["cache_hit"] and again["result"]["out"] == teacher["result"]["out"]

        label = wait(http, http.post("/v1/label-jobs", json=label_spec(
            f"test_resnet@{teacher['result']['out']}", seeds=[0])).json()["id"])
        assert label["state"] == "SUCCEEDED", label["error"]
        train = http.post("/v1/train-jobs", json={"store": label["cache_key"], "dataset": DATA,
                                                  "student": "test_resnet", "loss": "kd", "epochs": 1,
                                                  "batch_size": 64}).json()
        done = wait(http, train["id"])
        assert done["state"] == "SUCCEEDED", done["error"]
        metrics = http.get(f"/v1/jobs/{train['id']}/metrics").json()
        assert len(metrics["epochs"]) == 1 and metrics["final"] is not None
        assert http.get(f"/v1/jobs/{t['id']}/metrics").status_code == 404  # not a train job
        listed = http.get("/v1/jobs", params={"kind": "train"}).json()["jobs"]
        assert [j["id"] for j in listed] == [train["id"]]


def test_idempotency_keys(server):
    spec = {"dataset": DATA, "model": "test_resnet", "epochs": 1}
    with server.client() as http:
        first = http.post("/v1/teacher-jobs", json=spec, headers={"Idempotency-Key": "k-1"})
        second = http.post("/v1/teacher-jobs", json=spec, headers={"Idempotency-Key": "k-1"})
        assert first.status_code == 202 and second.status_code == 200
        assert first.json()["id"] == second.json()["id"]
        other = http.post("/v1/teacher-jobs", json={**spec, "epochs": 2}, headers={"Idempotency-Key": "k-1"})
        assert other.status_code == 409
        wait(http, first.json()["id"])


def test_cancel_a_running_job(server):
    spec = {"dataset": "synthetic:n=4096,classes=4,size=16", "model": "test_resnet", "epochs": 50}
    with server.client() as http:
        job = http.post("/v1/teacher-jobs", json=spec).json()
        wait(http, job["id"], states=("RUNNING",), timeout=60)
        cancelled = http.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "CANCELLED"
        assert wait(http, job["id"])["state"] == "CANCELLED"
        assert http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409  # ended already
        from ray.job_submission import JobStatus, JobSubmissionClient

        ray_jobs = JobSubmissionClient(server.dashboard)
        deadline = time.monotonic() + 30
        while ray_jobs.get_job_status(job["ray_job_id"]) != JobStatus.STOPPED and time.monotonic() < deadline:
            time.sleep(0.3)
        assert ray_jobs.get_job_status(job["ray_job_id"]) == JobStatus.STOPPED


def test_restart_reconciles_records(tmp_path, ray_dashboard):
    (tmp_path / "data").mkdir()
    first = Server(tmp_path, ray_dashboard).start()
    try:
        with first.client() as http:
            job = http.post("/v1/teacher-jobs", json={"dataset": DATA, "model": "test_resnet", "epochs": 3}).json()
            wait(http, job["id"], states=("RUNNING",), timeout=60)
    finally:
        first.stop(signal.SIGKILL)  # the service dies mid-job; the Ray job goes on
    # a record whose Ray job no longer exists (as after a cluster restart)
    db = sqlite3.connect(tmp_path / "state" / "jobs.db")
    with db:
        db.execute("INSERT INTO jobs (id, kind, state, spec, spec_hash, cache_hit, ray_job_id, created_at) "
                   "VALUES ('job_lost', 'label', 'RUNNING', '{}', 'x', 0, 'stillroom-job_lost', ?)", (time.time(),))
    db.close()
    second = Server(tmp_path, ray_dashboard)
    second.port, second.url = first.port, first.url
    second.start()
    try:
        with second.client() as http:
            lost = http.get("/v1/jobs/job_lost").json()
            assert lost["state"] == "FAILED" and "no longer exists" in lost["error"]
            assert wait(http, job["id"])["state"] == "SUCCEEDED"
    finally:
        second.stop()


def test_bad_requests(server, tmp_path):
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"x")
    link = server.root / "state" / "link.pt"
    link.symlink_to(outside)
    with server.client() as http:
        assert http.get("/v1/jobs/job_nope").status_code == 404
        bad = http.post("/v1/label-jobs", json={"dataset": DATA, "teachers": [], "top_k": "many"})
        assert bad.status_code == 422
        fields = {tuple(e["loc"]) for e in bad.json()["detail"]}
        assert ("body", "teachers") in fields and ("body", "top_k") in fields
        assert http.post("/v1/teacher-jobs", json={"model": "x; rm -rf /"}).status_code == 422
        assert http.post("/v1/teacher-jobs", json={"modle": "resnet18"}).status_code == 422  # unknown field
        for path in (str(outside), "../../etc/passwd", str(link)):
            r = http.post("/v1/label-jobs", json=label_spec(f"test_resnet@{path}"))
            assert r.status_code == 400 and "outside the configured roots" in r.json()["detail"]
        r = http.post("/v1/label-jobs", json=label_spec("no_such_model@teachers/given.pt"))
        assert r.status_code == 422 and "no_such_model" in r.json()["detail"]
        big = json.dumps({"dataset": DATA, "teachers": ["x" * (1 << 20)]})
        assert http.post("/v1/label-jobs", content=big, headers={"Content-Type": "application/json"}).status_code == 413
        assert http.get("/v1/jobs", params={"page_token": "garbage"}).status_code == 422
    with server.client(token=None) as anon, server.client(token="wrong") as wrong:
        assert anon.get("/v1/jobs").status_code == 401
        assert wrong.post("/v1/teacher-jobs", json={}).status_code == 401
        assert anon.get("/healthz").status_code == 200


def test_paging(server):
    with server.client() as http:
        seen, token = [], None
        while True:
            page = http.get("/v1/jobs", params={"limit": 3, **({"page_token": token} if token else {})}).json()
            seen += [j["id"] for j in page["jobs"]]
            token = page["next_page_token"]
            if not token:
                break
        everything = http.get("/v1/jobs", params={"limit": 500}).json()["jobs"]
        assert seen == [j["id"] for j in everything] and len(seen) == len(set(seen)) > 3
