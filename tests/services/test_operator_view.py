"""Jobs as an operator sees them, on the real service (uvicorn on 127.0.0.1, SQLite) and the shared Ray (token
authentication on): the Ray job's submission id and metadata, progress over the whole job that a cancelled job
keeps, `stillroom jobs ls / watch / resume`, and a cancelled train job resumed from its last.pt."""

from __future__ import annotations

import json
import time

import pytest
from conftest import make_teacher
from serving import DATA, TOKEN, Server, wait

from stillroom.services.cli import main as cli_main

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def ray_metadata(dashboard: str, submission_id: str) -> dict[str, str]:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(dashboard).get_job_info(submission_id).metadata or {}


def wait_ray_ended(dashboard: str, submission_id: str, timeout_s: float = 60.0) -> None:
    from ray.job_submission import JobSubmissionClient

    client, deadline = JobSubmissionClient(dashboard), time.monotonic() + timeout_s
    while not client.get_job_status(submission_id).is_terminal():
        assert time.monotonic() < deadline, f"Ray job {submission_id} still running after {timeout_s:g} s"
        time.sleep(0.3)


def cli(server: Server, capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = cli_main(["jobs", "--url", server.url, "--token", TOKEN, *args])
    return code, capsys.readouterr().out


def test_metadata_progress_cancel_and_resume(tmp_path, ray_dashboard, capsys):
    (tmp_path / "data").mkdir()
    server = Server(tmp_path, ray_dashboard).start()
    try:
        teacher = make_teacher(tmp_path / "state" / "teachers" / "t.pt")
        with server.client() as http:
            label = http.post("/v1/label-jobs", json={"dataset": DATA, "teachers": [teacher], "seeds": [0, 1],
                                                      "top_k": 3, "batch_size": 64}).json()
            assert label["ray_job_id"] == label["id"]  # the submission id is the job's id
            label = wait(http, label["id"])
            assert label["state"] == "SUCCEEDED", label["error"]
            assert label["progress"]["fraction"] == 1.0 and label["progress"]["done"] == 256 * 2  # all seeds
            key = label["cache_key"]
            meta = ray_metadata(ray_dashboard, label["id"])
            wanted = {"stillroom_job_id": label["id"], "kind": "label", "store": key, "dataset": DATA, "split": "train",
                      "teachers": teacher, "recipe": "fmnist-rrc", "seeds": "0,1", "top_k": "3"}
            assert {k: meta.get(k) for k in wanted} == wanted

            spec = {"store": key, "student": "test_resnet", "loss": "kd", "epochs": 24, "batch_size": 64,
                    "eval_interval": 100, "tracker": "none", "loader_workers": 0}
            train = http.post("/v1/train-jobs", json=spec).json()
            meta = ray_metadata(ray_dashboard, train["id"])
            assert {k: meta.get(k) for k in ("kind", "store", "student", "loss", "epochs")} == {
                "kind": "train", "store": key, "student": "test_resnet", "loss": "kd", "epochs": "24"}
            assert meta["dataset"].startswith(DATA)  # the store's data set, as its manifest spells it
            deadline = time.monotonic() + 120
            while ((train := http.get(f"/v1/jobs/{train['id']}").json())["progress"] or {}).get("fraction", 0) < 0.2:
                assert train["state"] in ("PENDING", "RUNNING") and time.monotonic() < deadline, train
                time.sleep(0.3)
            assert http.post(f"/v1/jobs/{train['id']}/resume").status_code == 409  # running: nothing to resume
            http.post(f"/v1/jobs/{train['id']}/cancel")
            cancelled = wait(http, train["id"])
            wait_ray_ended(ray_dashboard, train["id"])
            reached = cancelled["progress"]["fraction"]
            assert cancelled["state"] == "CANCELLED" and 0.2 <= reached < 1.0, cancelled["progress"]
            assert cancelled["progress"]["unit"] == "batch" and cancelled["progress"]["total"] == 24 * 4

            code, out = cli(server, capsys, "ls")
            [row] = [line for line in out.splitlines() if line.startswith(train["id"])]
            assert code == 0 and "CANCELLED" in row and f"{100 * reached:5.1f}%" in row

            assert http.post(f"/v1/jobs/{label['id']}/resume").status_code == 409  # a label job: not resumed
            code, out = cli(server, capsys, "resume", train["id"])
            resumed = json.loads(out)
            assert code == 0 and resumed["state"] == "PENDING" and resumed["ray_job_id"] == f"{train['id']}-2"
            assert [a["state"] for a in resumed["attempts"]] == ["CANCELLED"]
            assert resumed["attempts"][0]["ray_job_id"] == train["id"]
            assert ray_metadata(ray_dashboard, f"{train['id']}-2")["attempt"] == "2"
            code, out = cli(server, capsys, "watch", train["id"], "--interval", "0.5")
            assert code == 0 and out.splitlines()[-1].split()[1:3] == ["SUCCEEDED", "100.0%"], out
            done = http.get(f"/v1/jobs/{train['id']}").json()
            # the run went on from the epochs it had: every epoch once in its metrics
            run = tmp_path / "state" / "jobs" / train["id"] / "run"
            epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
            assert epochs == list(range(24)) and done["result"]["epochs"] == 24
    finally:
        server.stop()
