"""The service with its store, data and work roots on object storage: a real `stillroom serve` (uvicorn on
127.0.0.1, on the session's shared Ray, whose processes inherit the standard chain's credentials from the
environment as a cluster's nodes would: conftest starts the S3 server before it) against the moto S3 server of
tests/s3_server.py. A label job into an s3:// store root over REST, a cache hit answered while the S3 server is
stopped (SIGSTOP: a request to it would hang), a train job reading the store, the teacher rewritten at its URL
taken for another teacher, both jobs' files (spec, progress, result, the run directory) in the bucket and nothing
of them in the local state dir, and the secret key in no response, log, record or Ray job."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest
from conftest import make_teacher
from s3_server import S3Server
from serving import DATA, Server, wait

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_label_cache_hit_and_train_on_an_s3_store_root(s3: S3Server, tmp_path, ray_dashboard):
    local = make_teacher(tmp_path / "t.pt").partition("@")[2]
    s3.fs().put_file(local, f"{s3.bucket}/svc/data/teacher.pt")
    teacher = f"test_resnet@{s3.url('svc', 'data', 'teacher.pt')}"
    server = Server(tmp_path, ray_dashboard, store_root=s3.url("svc", "stores"),
                    STILLROOM_DATA_ROOT=s3.url("svc", "data"), STILLROOM_WORK_ROOT=s3.url("svc", "work"))
    answers: list[str] = []
    server.start()
    try:
        with server.client() as http:
            spec = {"dataset": DATA, "teachers": [teacher], "seeds": [0], "top_k": 3, "batch_size": 64}
            for bad, status in ((s3.url("svc", "stores2", "t.pt"), 403), (f"s3://k:{s3.secret}@{s3.bucket}/t", 422)):
                r = http.post("/v1/label-jobs", json={**spec, "teachers": [f"test_resnet@{bad}"]})
                answers.append(r.text)
                assert r.status_code == status, r.text
            first = http.post("/v1/label-jobs", json=spec).json()
            label = wait(http, first["id"], timeout=120)
            assert label["state"] == "SUCCEEDED", label["error"]
            key = label["cache_key"]
            assert label["result"]["store"] == s3.url("svc", "stores", key)
            assert s3.fs().exists(f"{s3.bucket}/svc/stores/{key}/seeds/0/COMPLETE")

            os.kill(s3.pid, signal.SIGSTOP)  # any request to the S3 server now waits until SIGCONT
            try:
                hit = httpx.post(f"{server.url}/v1/label-jobs", json=spec, headers=http.headers, timeout=10)
            finally:
                os.kill(s3.pid, signal.SIGCONT)
            assert hit.status_code == 202, hit.text
            assert hit.json()["cache_hit"] and hit.json()["state"] == "SUCCEEDED" and hit.json()["ray_job_id"] is None

            train = http.post("/v1/train-jobs", json={"store": key, "student": "test_resnet", "loss": "kd",
                                                      "epochs": 1, "batch_size": 64, "max_steps": 2,
                                                      "eval_limit": 64}).json()
            done = wait(http, train["id"], timeout=120)
            assert done["state"] == "SUCCEEDED", done["error"]
            assert done["result"]["store_cache_key"] == key
            # the job files went to the bucket, and the service read progress, result and metrics from it
            fs, work = s3.fs(), f"{s3.bucket}/svc/work/jobs"
            for job, names in ((label, ("spec.json", "progress.json", "result.json")),
                               (done, ("spec.json", "result.json", "run/metrics.json", "run/last.pt"))):
                assert all(fs.exists(f"{work}/{job['id']}/{n}") for n in names), fs.find(f"{work}/{job['id']}")
                assert not fs.exists(f"{work}/{job['id']}/process.json")  # a local pid: only for a local job dir
                assert job["progress"] and job["progress"]["total"] > 0, job
            assert fs.cat_file(f"{work}/{label['id']}/progress.json") and label["progress"]["fraction"] == 1.0
            assert json.loads(fs.cat_file(f"{work}/{done['id']}/result.json"))["result"] == done["result"]
            metrics = http.get(f"/v1/jobs/{train['id']}/metrics").json()
            assert metrics["final"] == json.loads(fs.cat_file(f"{work}/{done['id']}/run/metrics.json"))
            assert not (tmp_path / "state" / "jobs").exists()

            # the teacher rewritten at its URL: another teacher, so another store, once the service has seen its
            # new ETag (a cache hit asks the object store nothing: the background thread looks every 10 s)
            other = make_teacher(tmp_path / "t2.pt", seed=1).partition("@")[2]
            s3.fs().put_file(other, f"{s3.bucket}/svc/data/teacher.pt")
            deadline = time.monotonic() + 60
            while (again := http.post("/v1/label-jobs", json=spec).json())["cache_hit"]:
                assert again["cache_key"] == key and time.monotonic() < deadline, again
                time.sleep(1)
            assert again["cache_key"] != key, again
            http.post(f"/v1/jobs/{again['id']}/cancel")
            answers.append(json.dumps(again))
            answers += [http.get(f"/v1/jobs/{j}").text for j in (first["id"], train["id"])]
            answers += [http.get(f"/v1/jobs/{j}/logs").text for j in (first["id"], train["id"])]
            answers += [hit.text, http.get("/v1/jobs").text, http.get("/v1/stores").text,
                        http.get(f"/v1/stores/{key}").text, httpx.get(f"{server.url}/healthz").text]
            assert key in answers[-2]
            from ray.job_submission import JobSubmissionClient

            ray_jobs = repr(JobSubmissionClient(ray_dashboard).list_jobs())
            assert f"submission_id='{first['id']}'" in ray_jobs  # the job id is the submission id
    finally:
        server.stop()
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "t.pt")
    for text in (*answers, ray_jobs):
        assert s3.secret not in text
    assert s3.secret.encode() not in written + s3.everything()
