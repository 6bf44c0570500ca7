"""The page at ``/`` in a real browser: `stillroom serve` on 127.0.0.1 with jobs on the shared local Ray,
opened by Debian's headless chromium, which dumps the DOM it built (checked here) and takes a screenshot
(written under the test's temporary directory). ``/docs`` and ``/redoc`` load from the service's own files."""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import httpx
import pytest
from serving import DATA, Server, wait

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (infra/setup.sh installs "
                                                             "Debian's: apt-get install -y chromium)")


def browse(url: str, *args: str, budget_ms: int = 4000) -> str:
    """What headless chromium makes of ``url`` once its scripts ran (``--dump-dom``), or with ``--screenshot``."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", f"--virtual-time-budget={budget_ms}", "--window-size=1500,900", *args, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def text_of(dom: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


TIMEOUT = 600  # seconds a job may take on a busy 2-core machine (Ray actors start slowly there)
pytestmark = [needs_chromium, pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory, ray_dashboard):
    root = tmp_path_factory.mktemp("page")
    (root / "data").mkdir()
    s = Server(root, ray_dashboard).start()
    yield s
    s.stop()


def test_page_shows_a_running_label_job_a_finished_train_job_stores_and_teachers(server, tmp_path, ray_dashboard):
    with server.client() as http:
        http.timeout = httpx.Timeout(TIMEOUT)  # a Ray job submission on a busy machine may take minutes
        posted = http.post("/v1/teacher-jobs", json={
            "dataset": DATA, "model": "test_resnet", "epochs": 1, "batch_size": 64, "bn_samples": 0})
        teacher = wait(http, posted.json()["id"], timeout=TIMEOUT)
        assert teacher["state"] == "SUCCEEDED", teacher["error"]
        ckpt = f"test_resnet@{teacher['result']['out']}"
        posted = http.post("/v1/label-jobs", json={
            "dataset": DATA, "teachers": [ckpt], "seeds": [0], "top_k": 3, "batch_size": 64})
        label = wait(http, posted.json()["id"], timeout=TIMEOUT)
        assert label["state"] == "SUCCEEDED", label["error"]
        train = wait(http, http.post("/v1/train-jobs", json={
            "store": label["cache_key"], "student": "test_resnet", "loss": "kd", "epochs": 1, "batch_size": 64,
            "max_steps": 2, "eval_limit": 64}).json()["id"], timeout=TIMEOUT)
        assert train["state"] == "SUCCEEDED", train["error"]
        # a label job long enough to be seen running, with its progress
        running = http.post("/v1/label-jobs", json={
            "dataset": "synthetic:n=20000,classes=4,size=16", "teachers": [ckpt], "seeds": list(range(4)),
            "top_k": 3, "batch_size": 128, "chunk_rows": 128}).json()  # small pieces: its progress shows soon
        deadline = time.monotonic() + TIMEOUT
        while (job := http.get(f"/v1/jobs/{running['id']}").json())["progress"] is None:
            assert job["state"] in ("PENDING", "RUNNING") and time.monotonic() < deadline, job
            time.sleep(0.3)

        # reading needs no token; the log the page links to is there without one too
        assert httpx.get(f"{server.url}/v1/jobs").status_code == 401
        page = httpx.get(f"{server.url}/", timeout=TIMEOUT)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        log = httpx.get(f"{server.url}/page/jobs/{train['id']}/log", timeout=TIMEOUT)
        assert log.status_code == 200 and f"stillroom job {train['id']}" in log.text

        dom = browse(f"{server.url}/", "--dump-dom")
        shot = tmp_path / "page.png"
        browse(f"{server.url}/", f"--screenshot={shot}")
        assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        http.post(f"/v1/jobs/{running['id']}/cancel")

    rows = {m.group(1): m.group(2) for m in re.finditer(r'<tr data-job="(job_\w+)">(.*?)</tr>', dom, re.S)}
    assert set(rows) == {teacher["id"], label["id"], train["id"], running["id"]}
    run_row, train_row = text_of(rows[running["id"]]), text_of(rows[train["id"]])
    assert "RUNNING" in run_row and "label" in run_row and re.search(r"\d[\d,]* views/s", run_row), run_row
    percent = float(re.search(r"([\d.]+)%", run_row).group(1))
    assert 0 <= percent < 100
    assert f'href="{ray_dashboard}/#/jobs/{running["id"]}"' in rows[running["id"]]  # submission id = job id
    assert "cancel" in run_row  # an action for an active job
    assert "SUCCEEDED" in train_row and "100.0%" in train_row and "test_resnet" in train_row
    assert f'href="/page/jobs/{train["id"]}/log"' in rows[train["id"]]
    stores = re.findall(r'<tr data-store="(\w+)">(.*?)</tr>', dom, re.S)
    assert label["cache_key"] in [k for k, _ in stores]
    store_row = text_of(dict(stores)[label["cache_key"]])
    assert DATA in store_row and "(train)" in store_row and "256 images" in store_row and "test_resnet" in store_row
    assert re.search(r"teacher top-1 = truth [\d.]+%", store_row), store_row
    teachers = text_of(re.search(r'<table id="teachers">(.*?)</table>', dom, re.S).group(1))
    assert teacher["cache_key"] in teachers and "test_resnet" in teachers


def test_docs_and_redoc_render_from_the_service_own_files(server):
    """Swagger UI and ReDoc come from files the package installs: the pages name no other host, and chromium
    renders the API's operations from them."""
    for path in ("/docs", "/redoc"):
        html = httpx.get(f"{server.url}{path}").text
        hosts = set(re.findall(r'(?:src|href)="(https?://[^/"]+)', html))
        assert hosts <= {server.url}, hosts  # nothing from a CDN
        for asset in re.findall(r'(?:src|href)="(/static-offline-docs/[^"]+)"', html):
            assert httpx.get(f"{server.url}{asset}").status_code == 200, asset
    swagger = text_of(browse(f"{server.url}/docs", "--dump-dom", budget_ms=8000))
    assert "Label a data set with teachers" in swagger and "Train a student from a store" in swagger, swagger[:500]
    redoc = text_of(browse(f"{server.url}/redoc", "--dump-dom", budget_ms=8000))
    assert "Label a data set with teachers" in redoc, redoc[:500]
