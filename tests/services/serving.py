"""A real `stillroom serve` for the service tests: a process on a free port of 127.0.0.1, ended by its pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from stillroom.services.launcher import free_port

TOKEN = "test-token-0123456789"
DATA = "synthetic:n=256,classes=4,size=16"
STILLROOM = str(Path(sys.executable).parent / "stillroom")


class Server:
    """One `stillroom serve` process on a free port, sharing the state dir across restarts."""

    def __init__(self, root: Path, dashboard: str | None, db: str = "", store_root: str = "", **env: str):
        """``dashboard``: the Ray cluster's (``--ray-address``); None: the service starts its own Ray head.
        ``store_root``: a path or URL (default: ``root/stores``)."""
        self.root, self.dashboard, self.db, self.env = root, dashboard, db, env
        self.store_root = store_root or str(root / "stores")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        env = {**os.environ, "STILLROOM_API_TOKEN": TOKEN, "STILLROOM_DATA_ROOT": str(self.root / "data"),
               "STILLROOM_POLL_INTERVAL_S": "0.3", **self.env}
        where = ["--ray-address", self.dashboard] if self.dashboard else ["--dashboard-port", str(free_port())]
        if self.db:
            where += ["--db", self.db]  # on the command line, as people do: it must not leak from there
        with open(self.root / "serve.log", "ab") as log:
            self.proc = subprocess.Popen(
                [STILLROOM, "serve", "--port", str(self.port), *where,
                 "--state-dir", str(self.root / "state"), "--store-root", self.store_root],
                env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
            if self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"service did not start: {(self.root / 'serve.log').read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int | None:
        """``sig`` to the service's process (not its group: the service stops what it started); its exit code."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise
        return self.proc.returncode if self.proc else None

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
