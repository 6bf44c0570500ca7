"""The job service for real: `stillroom serve` on uvicorn at 127.0.0.1, jobs on the shared local Ray,
records in a SQLite file and, for the database tests (submit, dedup, idempotency, reconcile, paging), in a
real PostgreSQL server too. Every server process is started here and ended here, by its pid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import make_teacher
from postgres_server import postgres  # noqa: F401  (a fixture)
from serving import DATA, TOKEN, Server, wait

from stillroom.services.launcher import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]

def database_url(backend: str, request: pytest.FixtureRequest) -> str:
    """"" (the default SQLite file in the state dir) or a fresh database on the test PostgreSQL server."""
    return request.getfixturevalue("postgres").new_database() if backend == "postgresql" else ""


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory, ray_dashboard):
    """The module's service, once per database backend; a test that needs one backend only says so with
    ``@pytest.mark.parametrize("server", ["sqlite"], indirect=True)``."""
    root = tmp_path_factory.mktemp(f"service-{request.param}")
    (root / "data").mkdir()
    s = Server(root, ray_dashboard, database_url(request.param, request)).start()
    yield s
    s.stop()


SQLITE_ONLY = pytest.mark.parametrize("server", ["sqlite"], indirect=True)


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
        labeled = next(d for d in done if not d["cache_hit"] and not d["attached_to"])["result"]
        assert labeled["views"] == 512 and labeled["images"] == 256  # two seeds of 256 images
        assert again["result"]["views"] == 0 and again["result"]["images"] == 256
        stores = http.get("/v1/stores").json()
        assert [s["cache_key"] for s in stores] == [key] and stores[0]["seeds"] == [0, 1]
        assert http.get(f"/v1/stores/{key}").json()["samples"] == 256
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "stillroom_cache_hits_total 1" in metrics and "stillroom_labels_written_total 512" in metrics
        logs = http.get(f"/v1/jobs/{done[0]['attached_to'] or done[0]['id']}/logs").text
        assert "stillroom job" in logs


@SQLITE_ONLY
def test_label_jobs_of_overlapping_seeds_share_a_seed_through_its_lease(server):
    """Jobs for seeds [20, 21] and [21, 22]: not one the other's subset, so both run; seed 21's lease makes one of
    them label it and the other wait and reuse it. Each seed is computed once and the store verifies."""
    from stillroom.pipelines.store import LabelStore

    teacher = make_teacher(server.root / "state" / "teachers" / "overlap.pt", seed=7)
    with server.client() as http:
        jobs = [http.post("/v1/label-jobs", json=label_spec(teacher, seeds)).json()
                for seeds in ([20, 21], [21, 22])]
        assert len({j["ray_job_id"] for j in jobs}) == 2  # two runs
        done = [wait(http, j["id"]) for j in jobs]
    assert [d["state"] for d in done] == ["SUCCEEDED"] * 2, done
    computed = [set(d["result"]["seeds_computed"]) for d in done]
    assert not computed[0] & computed[1] and computed[0] | computed[1] == {20, 21, 22}
    assert 21 in set(done[0]["result"]["seeds_reused"]) | set(done[1]["result"]["seeds_reused"])
    store = LabelStore(server.root / "stores" / done[0]["cache_key"])
    assert {20, 21, 22} <= set(store.seeds()) and store.verify([20, 21, 22]) == []


@SQLITE_ONLY
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
        spec = {"store": label["cache_key"], "student": "test_resnet", "loss": "kd", "epochs": 1, "batch_size": 64}
        for field, wrong in (("store", {"store": "0123abcd"}), ("dataset", {"dataset": "fashion-mnist"})):
            r = http.post("/v1/train-jobs", json={**spec, **wrong})
            assert r.status_code == 422 and [e["loc"] for e in r.json()["detail"]] == [["body", field]], r.text
        train = http.post("/v1/train-jobs", json=spec).json()  # no dataset: the store's
        store = http.get(f"/v1/stores/{label['cache_key']}").json()
        assert train["spec"]["dataset"] == store["provenance"]["dataset"]["spec"]
        done = wait(http, train["id"])
        assert done["state"] == "SUCCEEDED", done["error"]
        metrics = http.get(f"/v1/jobs/{train['id']}/metrics").json()
        assert len(metrics["epochs"]) == 1 and metrics["final"] is not None
        assert http.get(f"/v1/jobs/{t['id']}/metrics").status_code == 404  # not a train job
        listed = http.get("/v1/jobs", params={"kind": "train"}).json()["jobs"]
        assert [j["id"] for j in listed] == [train["id"]]


@SQLITE_ONLY
def test_jobs_ask_ray_for_the_resources_their_process_uses(server, teacher_ckpt, ray_dashboard):
    from ray.job_submission import JobStatus, JobSubmissionClient

    ray = JobSubmissionClient(ray_dashboard)
    teacher = {"dataset": DATA, "model": "test_resnet", "epochs": 1}
    with server.client() as http:
        # more CPUs than the 2-CPU cluster has, or a GPU it lacks: Ray holds the job back (it never trains on
        # whatever is there)
        held = [http.post("/v1/teacher-jobs", json={**teacher, "seed": 11, "resources": r}).json()
                for r in ({"cpus": 64}, {"gpus": 1})]
        assert held[0]["id"] != held[1]["id"] and not held[0]["cache_hit"]
        time.sleep(5)
        for job in held:
            assert ray.get_job_status(job["ray_job_id"]) == JobStatus.PENDING
            assert http.get(f"/v1/jobs/{job['id']}").json()["state"] == "PENDING"
            assert http.post(f"/v1/jobs/{job['id']}/cancel").json()["state"] == "CANCELLED"
        # what the cluster has: it runs; where a job runs does not change what it computes (one checkpoint)
        small = wait(http, http.post("/v1/teacher-jobs", json={**teacher, "seed": 7,
                                                              "resources": {"cpus": 2}}).json()["id"])
        assert small["state"] == "SUCCEEDED", small["error"]
        again = http.post("/v1/teacher-jobs", json={**teacher, "seed": 7}).json()
        assert again["cache_hit"] and again["result"]["out"] == small["result"]["out"]
        # a label job's process only coordinates (asks for no CPU): its one worker asks for both CPUs, and runs
        label = http.post("/v1/label-jobs", json=label_spec(teacher_ckpt, seeds=[5])).json()
        assert wait(http, label["id"])["state"] == "SUCCEEDED"
        bad = http.post("/v1/teacher-jobs", json={**teacher, "resources": {"cpus": -1}})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "resources", "cpus"]


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


@SQLITE_ONLY
def test_identical_teacher_jobs_in_flight_share_one_run_and_outlive_a_cancel(server):
    spec = {"dataset": DATA, "model": "test_resnet", "epochs": 2, "seed": 21}
    with server.client() as http:
        first, second = (http.post("/v1/teacher-jobs", json=spec).json() for _ in range(2))
        assert second["attached_to"] == first["id"] and second["ray_job_id"] == first["ray_job_id"]
        assert not second["cache_hit"]
        # the first is cancelled; the run goes on for the second, which now follows it
        assert http.post(f"/v1/jobs/{first['id']}/cancel").json()["state"] == "CANCELLED"
        done = wait(http, second["id"])
        assert done["state"] == "SUCCEEDED", done["error"]
        assert done["attached_to"] is None and done["result"]["out"].endswith(".pt")
        assert http.get(f"/v1/jobs/{first['id']}").json()["state"] == "CANCELLED"
        third = http.post("/v1/teacher-jobs", json=spec).json()
        assert third["cache_hit"] and third["result"]["out"] == done["result"]["out"]


@SQLITE_ONLY
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


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_restart_reconciles_records(tmp_path, ray_dashboard, backend, request):
    from stillroom.services.db import Database, Job

    (tmp_path / "data").mkdir()
    db = database_url(backend, request)
    first = Server(tmp_path, ray_dashboard, db).start()
    try:
        with first.client() as http:
            job = http.post("/v1/teacher-jobs", json={"dataset": DATA, "model": "test_resnet", "epochs": 3}).json()
            wait(http, job["id"], states=("RUNNING",), timeout=60)
    finally:
        first.stop(signal.SIGKILL)  # the service dies mid-job; the Ray job goes on
    # a record whose Ray job no longer exists (as after a cluster restart)
    records = Database(db or f"sqlite:///{tmp_path / 'state' / 'jobs.db'}")
    records.add(Job(id="job_lost", kind="label", state="RUNNING", spec={}, spec_hash="x", cache_hit=False,
                    ray_job_id="stillroom-job_lost", created_at=time.time()))
    records.close()
    second = Server(tmp_path, ray_dashboard, db)
    second.port, second.url = first.port, first.url
    second.start()
    try:
        with second.client() as http:
            lost = http.get("/v1/jobs/job_lost").json()
            assert lost["state"] == "FAILED" and "no longer exists" in lost["error"]
            assert wait(http, job["id"])["state"] == "SUCCEEDED"
    finally:
        second.stop()


@SQLITE_ONLY  # validation, roots and limits: nothing of it is the database's
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
            assert r.status_code == 403 and "outside the configured roots" in r.json()["detail"]
        r = http.post("/v1/label-jobs", json=label_spec("no_such_model@teachers/given.pt"))
        assert r.status_code == 422
        [error] = r.json()["detail"]  # FastAPI's validation-error shape, naming the field
        assert error["loc"] == ["body", "teachers"] and "no_such_model" in error["msg"]
        big = json.dumps({"dataset": DATA, "teachers": ["x" * (1 << 20)]})
        assert http.post("/v1/label-jobs", content=big, headers={"Content-Type": "application/json"}).status_code == 413
        assert http.get("/v1/jobs", params={"page_token": "garbage"}).status_code == 422
    with server.client(token=None) as anon, server.client(token="wrong") as wrong:
        assert anon.get("/v1/jobs").status_code == 401
        assert wrong.post("/v1/teacher-jobs", json={}).status_code == 401
        assert anon.get("/healthz").status_code == 200


@SQLITE_ONLY
def test_jobs_cli_says_what_is_wrong_in_one_line(server):
    """`jobs logs --follow` with a wrong token, an unknown job or no service; a second `serve` on a port in
    use: one `stillroom: error:` line and a non-zero exit, never a traceback or an error body as output."""
    import socket

    from serving import STILLROOM

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([STILLROOM, *args], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "STILLROOM_API_TOKEN": TOKEN})

    with server.client() as http:
        job = http.post("/v1/teacher-jobs", json={"dataset": DATA, "model": "test_resnet", "epochs": 1}).json()
    cases = {
        "HTTP 401": ("jobs", "--url", server.url, "--token", "wrong", "logs", job["id"], "--follow"),
        "HTTP 404": ("jobs", "--url", server.url, "logs", "job_0000000000000000", "--follow"),
        "cannot reach the service": ("jobs", "--url", f"http://127.0.0.1:{free_port()}", "logs", job["id"],
                                     "--follow"),
        "--port": ("serve", "--port", str(server.port), "--ray-address", server.dashboard,
                   "--state-dir", str(server.root / "state2")),
    }
    for expected, args in cases.items():
        r = run(*args)
        assert r.returncode != 0 and r.stdout == "", (args, r.stdout)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("stillroom: error:") and expected in lines[0], r.stderr
    with socket.socket() as held:  # a dashboard port in use: the local head is not even tried
        held.bind(("127.0.0.1", 0))
        held.listen()
        r = run("serve", "--port", str(free_port()), "--dashboard-port", str(held.getsockname()[1]),
                "--state-dir", str(server.root / "state2"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--dashboard-port" in r.stderr


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
