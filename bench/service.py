"""Job service latency: 200 POSTs of cache-hit label jobs from 8 concurrent clients, then status reads.

Labels a small synthetic store in-process first (so every POST is a cache hit), starts a real
`stillroom serve` (uvicorn on 127.0.0.1, a local Ray, a SQLite file), and measures from 8 client threads.
The first POST, which computes the cache key (dataset fingerprint, teacher digest), is timed apart. POSTs
alternate with rounds of GET /healthz (no database, file or Ray behind it) from the same clients: the floor
that the machine and the HTTP stack set, measured under the same load.
A cache-hit POST is answered from the service's in-memory store index (no file read, no Ray call); concurrent
submissions are recorded by group commit (one SQLite transaction for the records queued together).
Prints one JSON line. Target: p99 submission latency < 20 ms with 8 clients.

    python bench/service.py [--posts 200] [--clients 8] [--read-seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from stillroom.services.launcher import free_port

DATA = "synthetic:n=1024,classes=10,size=16"


def make_store(root: Path) -> str:
    import timm

    from stillroom.pipelines.labeling import LabelConfig, run_labeling
    from stillroom.pipelines.teachers import Preprocess, save_checkpoint

    ckpt = root / "state" / "teachers" / "bench.pt"
    ckpt.parent.mkdir(parents=True)
    kwargs: dict[str, Any] = {"num_classes": 10, "in_chans": 1}
    save_checkpoint(ckpt, "test_resnet", timm.create_model("test_resnet", **kwargs), kwargs,
                    Preprocess(16, (0.5,), (0.25,), 1), extra={})
    run_labeling(LabelConfig(dataset=DATA, teachers=(f"test_resnet@{ckpt}",), seeds=(0, 1), top_k=5,
                             store_root=str(root / "stores")), backend="local", progress=False)
    return f"test_resnet@{ckpt}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--posts", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--read-seconds", type=float, default=5.0)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="stillroom-bench-service-"))
    token = "bench-token"
    port = free_port()
    server = None
    try:
        teacher = make_store(root)
        env = {**os.environ, "STILLROOM_API_TOKEN": token}
        server = subprocess.Popen(
            [sys.executable, "-m", "stillroom.services.cli", "serve", "--port", str(port),
             "--dashboard-port", str(free_port()), "--state-dir", str(root / "state"),
             "--store-root", str(root / "stores")],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        spec = {"dataset": DATA, "teachers": [teacher], "seeds": [0, 1], "top_k": 5}
        headers = {"Authorization": f"Bearer {token}"}
        clients = [httpx.Client(base_url=url, headers=headers, timeout=30) for _ in range(args.clients)]

        t = time.perf_counter()
        first = clients[0].post("/v1/label-jobs", json=spec).json()
        first_ms = (time.perf_counter() - t) * 1000
        if not first.get("cache_hit"):
            raise SystemExit(f"the bench's label job is not a cache hit: {first}")

        def post(i: int) -> float:
            t0 = time.perf_counter()
            r = clients[i % args.clients].post("/v1/label-jobs", json=spec)
            if r.status_code != 202 or not r.json()["cache_hit"]:
                raise SystemExit(f"unexpected answer {r.status_code}: {r.text[:200]}")
            return (time.perf_counter() - t0) * 1000

        def ping(i: int) -> float:  # the floor: an answer with no database, file or Ray behind it
            t0 = time.perf_counter()
            if clients[i % args.clients].get("/healthz").status_code != 200:
                raise SystemExit("healthz failed")
            return (time.perf_counter() - t0) * 1000

        # POSTs and /healthz GETs in alternating rounds, so that both see the same machine (other processes
        # on a shared machine move the absolute figures; the ratio to the floor is what the service adds)
        posted, floor, post_s = [], [], 0.0
        rounds = 4
        with ThreadPoolExecutor(args.clients) as pool:
            for _ in range(rounds):
                n = args.posts // rounds
                t = time.perf_counter()
                posted += list(pool.map(post, range(n)))
                post_s += time.perf_counter() - t
                floor += list(pool.map(ping, range(n)))
        latencies, floor_ms = np.array(posted), np.array(floor)

        def read(i: int) -> int:
            n, deadline = 0, time.perf_counter() + args.read_seconds
            while time.perf_counter() < deadline:
                if clients[i].get(f"/v1/jobs/{first['id']}").status_code != 200:
                    raise SystemExit("status read failed")
                n += 1
            return n

        with ThreadPoolExecutor(args.clients) as pool:
            reads = sum(pool.map(read, range(args.clients)))
        p50, p99 = np.percentile(latencies, [50, 99])
        f50, f99 = np.percentile(floor_ms, [50, 99])
        print(json.dumps({
            "bench": "service", "posts": len(latencies), "clients": args.clients,
            "submit_p50_ms": round(float(p50), 2), "submit_p99_ms": round(float(p99), 2),
            "submit_max_ms": round(float(latencies.max()), 2), "posts_per_s": round(len(latencies) / post_s, 1),
            "healthz_p50_ms": round(float(f50), 2), "healthz_p99_ms": round(float(f99), 2),
            "submit_p50_over_healthz": round(float(p50 / f50), 2),
            "first_submit_ms": round(first_ms, 1), "status_reads_per_s": round(reads / args.read_seconds, 1),
            "target_ms": 20, "target_met": bool(p99 < 20),
        }))
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)  # the service stops its Ray head itself
            server.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
