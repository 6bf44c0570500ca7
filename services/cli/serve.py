"""CLI commands ``stillroom serve`` and ``stillroom jobs ...``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

from stillroom.pipelines.core import UsageError, json_object


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from stillroom.services.app import create_app
    from stillroom.services.config import Settings
    from stillroom.services.launcher import LocalRayHead, RayJobs, port_free

    overrides = {k: v for k, v in {
        "host": args.host, "port": args.port, "ray_address": args.ray_address, "db": args.db,
        "store_root": args.store_root, "data_root": args.data_root, "state_dir": args.state_dir,
        "work_root": args.work_root, "dashboard_port": args.dashboard_port}.items() if v is not None}
    settings = Settings(**overrides)
    if not port_free(settings.host, settings.port):  # before anything is made on disk
        raise UsageError(f"port {settings.port} on {settings.host} is in use: another `stillroom serve`? "
                         "pass --port with a free port")
    settings.prepare()
    head = None if settings.ray_address else LocalRayHead(settings.dashboard_port,
                                                           log_path=settings.state_dir / "ray-head.log")
    # SIGTERM and Ctrl-C: uvicorn stops serving, the lifespan cancels the jobs of an owned cluster, uvicorn
    # re-raises the signal to this handler when done, and `finally` stops the head; exit 128 + the signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_on_signal)
    try:
        dashboard = head.start() if head else settings.ray_address
        app = create_app(settings, RayJobs(dashboard), owns_cluster=head is not None)
        api = f"http://{settings.host}:{settings.port}"
        print(f"stillroom service: {api}  (docs {api}/docs)", flush=True)
        print(f"Ray dashboard:     {dashboard}{'  (a local head, stopped with the service)' if head else ''}",
              flush=True)
        print(f"API token:         {settings.token_source}", flush=True)
        # a client following a job's logs holds its connection open: stop waiting for it after 10 s
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=10)
    finally:
        if head is not None:
            head.stop()
    return 0


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _client(args: argparse.Namespace):
    from stillroom.services.client import StillroomClient, default_token

    return StillroomClient(args.url, args.token or default_token(args.state_dir))



def cmd_jobs(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.jobs_cmd == "submit":
        spec = json_object(args.spec, "--spec", file=True, example='{"dataset": "fashion-mnist"}')
        job = client.submit(args.kind, spec, args.idempotency_key)
        if args.wait:
            job = client.wait(job["id"])
        print(json.dumps(job, indent=2))
        return 0 if job["state"] != "FAILED" else 1
    if args.jobs_cmd == "ls":
        page = client.jobs(state=args.state, kind=args.kind, limit=args.limit)
        for j in page["jobs"]:
            print(f"{j['id']}  {j['kind']:7}  {j['state']:9}  {describe_progress(j):40}  "
                  f"{'cache-hit' if j['cache_hit'] else ''}"
                  f"  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(j['created_at']))}")
        if page["next_page_token"]:
            print(f"(more: --page-token {page['next_page_token']})")
        return 0
    if args.jobs_cmd == "watch":
        return _watch(client, args.id, args.interval)
    if args.jobs_cmd == "resume":
        print(json.dumps(client.resume(args.id), indent=2))
        return 0
    if args.jobs_cmd == "show":
        print(json.dumps(client.job(args.id), indent=2))
        return 0
    if args.jobs_cmd == "logs":
        if args.follow:
            for chunk in client.follow_logs(args.id):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        else:
            sys.stdout.write(client.logs(args.id))
        return 0
    print(json.dumps(client.cancel(args.id), indent=2))
    return 0


def describe_progress(job: dict[str, Any]) -> str:
    """A job's progress over the whole job in a few words: ``41.7%  120.5 img/s  ETA 3m05s`` (what is known)."""
    p = job.get("progress") or {}
    frac = p.get("fraction")
    words = [f"{100 * frac:5.1f}%" if isinstance(frac, int | float) else "    -"]
    if isinstance(p.get("rate"), int | float) and job["state"] == "RUNNING":
        words.append(f"{p['rate']:.1f} {p.get('unit') or 'it'}/s")
        if isinstance(p.get("eta_s"), int | float):
            minutes, seconds = divmod(int(p["eta_s"]), 60)
            words.append(f"ETA {minutes}m{seconds:02d}s")
    return "  ".join(words)


def _watch(client, job_id: str, interval: float) -> int:
    """``jobs watch``: a line each time the job's state or progress changes, until it ends; exit 0 when it
    succeeded, 1 otherwise."""
    last = ""

    def show(j: dict[str, Any]) -> None:
        nonlocal last
        line = f"{j['id']}  {j['state']:9}  {describe_progress(j)}  {(j.get('progress') or {}).get('desc', '')}"
        if line != last:
            print(line, flush=True)
            last = line

    done = client.wait(job_id, on_update=show, interval=interval)
    if done.get("error"):
        print(f"{done['id']} {done['state']}: {done['error']}", file=sys.stderr)
    return 0 if done["state"] == "SUCCEEDED" else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="the job service: FastAPI on uvicorn, jobs on Ray")
    p.add_argument("--host", default=None, help="the address to listen on (default: 127.0.0.1; "
                                                "STILLROOM_HOST)")
    p.add_argument("--port", type=int, default=None, help="the port to listen on (default: 8000; STILLROOM_PORT)")
    p.add_argument("--ray-address", default=None, help="a Ray dashboard URL (default: start a local Ray head)")
    p.add_argument("--dashboard-port", type=int, default=None,
                   help="the dashboard port of the local Ray head it starts (default: 8265)")
    p.add_argument("--db", default=None, help="an SQLAlchemy URL (default: SQLite in the state dir)")
    p.add_argument("--store-root", default=None,
                   help="where label stores are kept, a path or a URL; job paths are confined to it "
                        "(default: stores)")
    p.add_argument("--data-root", default=None,
                   help="where data sets are read from, a path or a URL; job paths are confined to it "
                        "(default: /usr/share/datasets)")
    p.add_argument("--state-dir", default=None, help="the token and the default SQLite file (default: .stillroom)")
    p.add_argument("--work-root", default=None,
                   help="job directories and service-trained teachers: a path or a URL (s3://bucket/prefix), "
                        "which every Ray node reaches (default: the state dir)")
    p.set_defaults(func=cmd_serve)

    jobs = sub.add_parser("jobs", help="talk to the job service")
    jobs.add_argument("--url", default=os.environ.get("STILLROOM_URL", "http://127.0.0.1:8000"))
    jobs.add_argument("--token", default=None, help="default: STILLROOM_API_TOKEN or the state dir's token file")
    jobs.add_argument("--state-dir", default=os.environ.get("STILLROOM_STATE_DIR", ".stillroom"))
    jsub = jobs.add_subparsers(dest="jobs_cmd", required=True)
    p = jsub.add_parser("submit")
    p.add_argument("kind", choices=("teacher", "label", "train"))
    p.add_argument("--spec", required=True, help="a JSON object or a JSON file")
    p.add_argument("--idempotency-key", default=None)
    p.add_argument("--wait", action="store_true")
    p = jsub.add_parser("ls")
    p.add_argument("--state", default=None)
    p.add_argument("--kind", default=None)
    p.add_argument("--limit", type=int, default=50)
    for name, help_text in (("show", "the job's record"), ("cancel", "stop a pending or running job"),
                            ("resume", "continue a cancelled or failed train job from its last.pt")):
        jsub.add_parser(name, help=help_text).add_argument("id")
    p = jsub.add_parser("watch", help="a line each time the job's state or progress changes, until it ends")
    p.add_argument("id")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between two looks (default 2)")
    p = jsub.add_parser("logs")
    p.add_argument("id")
    p.add_argument("--follow", action="store_true")
    jobs.set_defaults(func=cmd_jobs)
