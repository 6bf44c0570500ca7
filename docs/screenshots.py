"""Take the pictures the README shows, from a real service: ``python docs/screenshots.py [--out docs]``.

It starts a local Ray head of its own (``ray start --head``, its files under a temporary directory), Debian's
``prometheus`` scraping that head's metrics agent (when ``prometheus`` is on PATH: ``apt-get install -y
prometheus``), and ``stillroom serve`` on that cluster; it runs a teacher, a label and a train job on a small
synthetic data set, then starts a longer label job and, while it runs, has headless ``chromium`` take:

- ``page.png``: the service's page at ``/``, a label job running and the train job done;
- ``metrics-prometheus.png``: Prometheus's own graph page, views labeled a second by job;
- ``metrics.png``: stillroom's metrics of those jobs read back from Prometheus's HTTP API (views labeled a second,
  a worker's views/s, training samples/s and loss terms, by job), drawn with matplotlib;
- ``ray-metrics-view.png``: the Ray dashboard's Metrics view as a browser first meets it: the token prompt, and
  Ray's note that it found no Grafana.

Grafana, which draws the panels of Ray's Metrics view (and ``infra/grafana/stillroom_dashboard.json``), is not
a Debian package and cannot be installed without its own download site; where it is installed, point it at the
Prometheus this script starts. Everything it starts is stopped at the end. About five minutes on two cores.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import httpx

DATA = "synthetic:n=512,classes=4,size=16"
TOKEN = "screenshots-token-0123456789"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float = 120.0, **kw) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2, **kw).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"nothing answered at {url} in {timeout_s:g} s")


def wait_job(http: httpx.Client, job_id: str, timeout_s: float = 900.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
            if job["state"] != "SUCCEEDED":
                raise RuntimeError(f"job {job_id} ended {job['state']}: {job.get('error')}")
            return job
        time.sleep(1)
    raise RuntimeError(f"job {job_id} did not end in {timeout_s:g} s")


def screenshot(url: str, out: Path, size: str = "1500,900", budget_ms: int = 8000) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH: apt-get install -y chromium")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--hide-scrollbars", f"--virtual-time-budget={budget_ms}",
                    f"--window-size={size}", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=300)
    print(f"wrote {out}", file=sys.stderr)


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=f, env=env, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to ``proc``, then whatever is left of its own process group (started with a session of its own)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        time.sleep(3)


PROMETHEUS_CONFIG = """\
global: {{scrape_interval: 2s}}
scrape_configs:
  - job_name: ray
    honor_labels: true  # keep the metrics' own job tag (the stillroom job id), not the scrape job's name
    static_configs: [{{targets: ["127.0.0.1:{port}"]}}]
"""

# what metrics.png draws from Prometheus (title, PromQL by job), the first also on Prometheus's own graph page
GRAPHS = (
    ("label: views labeled / s", "sum by (job) (rate(ray_stillroom_label_views_labeled_total[30s]))"),
    ("label: a worker's views / s (last piece)", "max by (job) (ray_stillroom_label_images_per_s)"),
    ("train: samples / s (last epoch)", "max by (job) (ray_stillroom_train_samples_per_s)"),
    ("train: loss terms (last step)", "max by (job, term) (ray_stillroom_train_loss)"),
)


def plot_metrics(prometheus: str, start: float, out: Path) -> None:
    """The GRAPHS over ``[start, now]`` from Prometheus's HTTP API (``query_range``), one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = time.time()
    fig, axes = plt.subplots(2, 2, figsize=(13, 7), constrained_layout=True)
    for ax, (title, expr) in zip(axes.flat, GRAPHS, strict=True):
        got = httpx.get(f"{prometheus}/api/v1/query_range",
                        params={"query": expr, "start": start, "end": end, "step": 2}, timeout=30).json()
        for series in got["data"]["result"]:
            t = [float(v[0]) - start for v in series["values"]]
            y = [float(v[1]) for v in series["values"]]
            tags = series["metric"]
            ax.plot(t, y, ".-", ms=3, label=" ".join(tags[k] for k in ("job", "term") if k in tags))
        ax.set_title(f"{title}\n{expr}", fontsize=9)
        ax.set_xlabel("seconds")
        ax.legend(fontsize=7)
    fig.suptitle("stillroom's Ray metrics of a teacher, label and train job, read back from Prometheus")
    fig.savefig(out, dpi=90)
    print(f"wrote {out}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent), help="where the pictures go (default: docs/)")
    args = parser.parse_args()
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="stillroom-shots-"))
    (work / "data").mkdir()
    ray_port, dash_port, metrics_port = free_port(), free_port(), free_port()
    prom_port, port = free_port(), free_port()
    prometheus = shutil.which("prometheus")
    env = {**os.environ, "RAY_PROMETHEUS_HOST": f"http://127.0.0.1:{prom_port}"}
    procs: list[subprocess.Popen] = []
    ray = [str(BIN / "ray")]
    try:
        # --block: the head is this child, stopped by its process group alone (never `ray stop`, which would
        # stop every Ray on the machine)
        procs.append(start([*ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={ray_port}",
                            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
                            f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
                            f"--metrics-export-port={metrics_port}", f"--temp-dir={work / 'ray'}",
                            "--disable-usage-stats"], work / "ray.log", env))
        dashboard = f"http://127.0.0.1:{dash_port}"
        wait_http(f"{dashboard}/api/version", timeout_s=300)
        if prometheus:
            (work / "prometheus.yml").write_text(PROMETHEUS_CONFIG.format(port=metrics_port))
            procs.append(start([prometheus, f"--config.file={work / 'prometheus.yml'}",
                                f"--web.listen-address=127.0.0.1:{prom_port}",
                                f"--storage.tsdb.path={work / 'prometheus'}"], work / "prometheus.log"))
        service_env = {**os.environ, "STILLROOM_API_TOKEN": TOKEN, "STILLROOM_DATA_ROOT": str(work / "data")}
        procs.append(start([str(BIN / "stillroom"), "serve", "--port", str(port), "--ray-address", dashboard,
                            "--state-dir", str(work / "state"), "--store-root", str(work / "stores")],
                           work / "serve.log", service_env))
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/healthz", timeout_s=300)
        except RuntimeError:
            raise RuntimeError(f"stillroom serve did not start: {(work / 'serve.log').read_text()[-2000:]}") from None
        t_jobs = time.time()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=600) as http:
            teacher = wait_job(http, http.post("/v1/teacher-jobs", json={
                "dataset": DATA, "model": "test_resnet", "epochs": 1, "batch_size": 64,
                "bn_samples": 0}).json()["id"])
            ckpt = f"test_resnet@{teacher['result']['out']}"
            label = wait_job(http, http.post("/v1/label-jobs", json={
                "dataset": DATA, "teachers": [ckpt], "seeds": [0, 1, 2], "top_k": 3, "batch_size": 64,
                "chunk_rows": 64}).json()["id"])
            wait_job(http, http.post("/v1/train-jobs", json={
                "store": label["cache_key"], "student": "test_resnet", "loss": "kd", "epochs": 3,
                "batch_size": 32, "eval_limit": 128}).json()["id"])
            running = http.post("/v1/label-jobs", json={
                "dataset": "synthetic:n=20000,classes=4,size=16", "teachers": [ckpt], "seeds": [0, 1, 2, 3],
                "top_k": 3, "batch_size": 128, "chunk_rows": 128}).json()
            deadline = time.monotonic() + 600
            while http.get(f"/v1/jobs/{running['id']}").json()["progress"] is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"job {running['id']} showed no progress in 600 s")
                time.sleep(1)
            time.sleep(20)  # a few of its pieces done: its throughput and its metrics have points
            screenshot(f"{url}/", out / "page.png", size="1500,760")
            if prometheus:
                query = {"g0.expr": GRAPHS[0][1], "g0.tab": "0", "g0.range_input": "15m"}
                screenshot(f"http://127.0.0.1:{prom_port}/graph?{urllib.parse.urlencode(query)}",
                           out / "metrics-prometheus.png", size="1500,800", budget_ms=15000)
                plot_metrics(f"http://127.0.0.1:{prom_port}", t_jobs, out / "metrics.png")
            # Ray's Metrics view: its note on Prometheus and Grafana, behind the token prompt a browser first meets
            screenshot(f"{dashboard}/#/metrics", out / "ray-metrics-view.png", size="1500,700")
            http.post(f"/v1/jobs/{running['id']}/cancel")
    finally:
        for proc in reversed(procs):  # the service, Prometheus, then the Ray head and what it started
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
