"""``stillroom demo``: the main job on the embedded default, over the job service on a local Ray.

It starts ``stillroom serve`` (FastAPI, a local Ray head, a SQLite job database), then over HTTP: trains a
teacher, labels the images under two augmentation seeds into a store, trains from that store a supervised and a
cached-KD student per student seed and an online-KD student (the teacher in the loop, the same views), resubmits
the teacher and label jobs (cache hits), and prints a table of test top-1, epoch times and labeling cost, with
``demo.png`` (``demo_report``) beside it.

The setting (``DemoSetting``) is chosen for a gain that stands out of the run-to-run noise: a student narrowed to
43 k parameters (a teacher well above it) on 10,000 images for 2 epochs of mixed crops, the views on which the
teacher's labels carry what the ground truth does not; a teacher of 2 epochs and 10,000 images keep the whole demo
within 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stillroom.pipelines.core import UsageError, write_atomically
from stillroom.services.cli.demo_report import plot, summarize, table


@dataclass(frozen=True)
class DemoSetting:
    """What the demo trains; the defaults are the embedded demo, a test runs it tiny."""

    dataset: str = "fashion-mnist:n=10000"
    images: int = 10000
    teacher: str = "resnet10t"
    teacher_epochs: int = 2
    recipe: str = "fmnist-rrc-mix"  # crops, flips, mixup and cutmix: the views the students replay
    label_seeds: tuple[int, ...] = (0, 1)
    student: str = "test_resnet"
    student_kwargs: dict[str, Any] = field(default_factory=lambda: {"channels": [8, 16, 16, 32], "stem_width": 8})
    epochs: int = 2
    student_seeds: tuple[int, ...] = (0, 1)
    online_seeds: tuple[int, ...] = (0,)
    batch_size: int = 128
    lr: float = 3e-3

    def teacher_spec(self) -> dict[str, Any]:
        # the teacher trains alone: it asks Ray for every core
        return {"dataset": self.dataset, "model": self.teacher, "epochs": self.teacher_epochs,
                "batch_size": self.batch_size, "lr": self.lr, "resources": {"cpus": os.cpu_count() or 1}}

    def label_spec(self, checkpoint: str) -> dict[str, Any]:
        return {"dataset": self.dataset, "teachers": [f"{self.teacher}@{checkpoint}"], "recipe": self.recipe,
                "seeds": list(self.label_seeds), "top_k": 10,
                "num_workers": 2}  # alone on the cores, as the teacher was

    def student_spec(self, store: str, loss: str, seed: int, online: bool = False) -> dict[str, Any]:
        spec = {"dataset": self.dataset, "store": store, "student": self.student,
                "student_kwargs": self.student_kwargs, "loss": loss, "epochs": self.epochs,
                "batch_size": self.batch_size, "lr": self.lr, "seed": seed}
        return {**spec, "online": True, "online_targets": "full"} if online else spec


def cmd_demo(args: argparse.Namespace) -> int:
    setting = DemoSetting(**({"dataset": f"fashion-mnist:n={args.images}", "images": args.images}
                             if args.images else {}))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # SIGTERM as Ctrl-C: the service and its Ray head are stopped on the way out, not left running
    signal.signal(signal.SIGTERM, _exit_on_signal)
    with ServiceProcess(Path(args.state_dir).resolve(), Path(args.store_root).resolve()) as service:
        summary = run_demo(service.client, setting)
    summary["minutes"] = round((time.time() - t0) / 60, 2)
    summary["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    summary["setting"] = asdict(setting)
    text = table(summary)
    write_atomically(out / "demo.md", lambda tmp: tmp.write_text(text + "\n"))
    write_atomically(out / "demo.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n"))
    plot(summary, out / "demo.png")
    print()
    print(text)
    print(f"\n{out / 'demo.png'}: test top-1 against compute; {out / 'demo.json'}: every figure")
    print(f"Ray dashboard (while the service ran): {service.dashboard}")
    print(json.dumps({"gain": summary["gain"], "online_over_cached_epoch": summary["online_over_cached_epoch"],
                      **{k: v["mean"] for k, v in summary["students"].items()},
                      "teacher_top1": summary["teacher"]["top1"], "labels_s": summary["labels"]["seconds"],
                      "minutes": summary["minutes"]}))
    return 0


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def run_demo(client: Any, setting: DemoSetting) -> dict[str, Any]:
    """The demo's jobs over ``client`` (a ``StillroomClient``); their figures (``demo_report.summarize``)."""
    teacher = follow(client, client.submit("teacher", setting.teacher_spec()), f"teacher ({setting.teacher})")
    label = follow(client, client.submit("label", setting.label_spec(teacher["result"]["out"])),
                   f"labels ({len(setting.label_seeds)} seeds)")
    key = label["cache_key"]
    # two jobs at a time on two cores (each asks Ray for one): online KD beside a cached one, so their epoch
    # times are taken under the same load
    submitted: list[tuple[str, str, dict[str, Any]]] = []
    for seed in setting.student_seeds:
        submitted.append(("cached_kd", f"student cached KD, seed {seed}",
                          client.submit("train", setting.student_spec(key, "kd", seed))))
        if seed in setting.online_seeds:
            submitted.append(("online_kd", f"student online KD, seed {seed}",
                              client.submit("train", setting.student_spec(key, "kd", seed, online=True))))
        submitted.append(("supervised", f"student supervised, seed {seed}",
                          client.submit("train", setting.student_spec(key, "ce", seed))))
    students: dict[str, list[dict[str, Any]]] = {}
    for row, words, job in submitted:
        students.setdefault(row, []).append(follow(client, job, words))
    second_run = {"teacher": _timed_submit(client, "teacher", setting.teacher_spec()),
                  "label": _timed_submit(client, "label", setting.label_spec(teacher["result"]["out"]))}
    return summarize(first_run(client, teacher), first_run(client, label), students, setting.images,
                     setting.epochs, second_run)


def _timed_submit(client: Any, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Resubmit a job as a second run would: the seconds until it has ended, and whether it was a cache hit."""
    t = time.perf_counter()
    job = client.wait(client.submit(kind, spec)["id"], interval=0.05)
    return {"job": job["id"], "state": job["state"], "cache_hit": bool(job.get("cache_hit")),
            "seconds": round(time.perf_counter() - t, 3)}


def first_run(client: Any, job: dict[str, Any]) -> dict[str, Any]:
    """The job that computed what ``job`` reused: itself, or for a cache hit the earlier job of the same kind
    and cache key that ran (its cost is what the demo reports as paid once)."""
    if not job.get("cache_hit") and not job.get("attached_to"):
        return job
    if job.get("attached_to"):
        return client.job(job["attached_to"])
    for earlier in client.jobs(kind=job["kind"], state="SUCCEEDED", limit=200)["jobs"]:
        if earlier["cache_key"] == job["cache_key"] and not earlier["cache_hit"] and not earlier["attached_to"]:
            return earlier
    raise UsageError(f"{job['kind']} job {job['id']} was a cache hit, but the service's records hold no job that "
                     f"computed {job['cache_key']}: remove the state dir and the store root to start afresh")


def follow(client: Any, job: dict[str, Any], label: str) -> dict[str, Any]:
    """Wait for a job, drawing its progress; return the finished record."""
    from stillroom.pipelines.core import progress_bar

    if job.get("cache_hit"):
        print(f"{label}: cache hit, nothing to run ({job['id']})", file=sys.stderr)
        return job
    bar = progress_bar(1000, label, unit="")
    bar.bar_format = "{desc}: {percentage:3.0f}%|{bar}| {postfix}"

    def update(j: dict[str, Any]) -> None:
        frac = (j.get("progress") or {}).get("fraction")
        if isinstance(frac, int | float):
            bar.update(int(frac * 1000) - bar.n)
        bar.set_postfix_str(f"{j['state']} {(j.get('progress') or {}).get('desc', '')}")

    done = client.wait(job["id"], on_update=update)
    bar.close()
    if done["state"] != "SUCCEEDED":
        raise UsageError(f"{label} job {done['id']} ended {done['state']}: {done.get('error')}")
    return done


class ServiceProcess:
    """``stillroom serve`` in a process of its own on free ports, its token fresh; stopped (its process group
    signalled) when the block ends."""

    def __init__(self, state_dir: Path, store_root: Path):
        from stillroom.services.launcher import free_port

        self.port = free_port()
        self.env = {**os.environ, "STILLROOM_STATE_DIR": str(state_dir), "STILLROOM_STORE_ROOT": str(store_root),
                    "STILLROOM_PORT": str(self.port), "STILLROOM_DASHBOARD_PORT": str(free_port())}
        self.env.setdefault("STILLROOM_API_TOKEN", os.urandom(16).hex())
        self.dashboard = ""

    def __enter__(self) -> ServiceProcess:
        from stillroom.services.client import StillroomClient

        self.proc = subprocess.Popen([sys.executable, "-m", "stillroom.services.cli", "serve"], env=self.env,
                                     start_new_session=True)
        try:
            self.client = StillroomClient(f"http://127.0.0.1:{self.port}", self.env["STILLROOM_API_TOKEN"])
            for _ in range(240):
                if self.proc.poll() is not None:
                    raise UsageError(f"the service exited with code {self.proc.returncode} before it answered")
                try:
                    self.dashboard = self.client.health()["dashboard"]
                    break
                except Exception:
                    time.sleep(0.5)
            else:
                raise UsageError("the service did not answer within 120 s")
        except BaseException:
            self._stop()
            raise
        print(f"service http://127.0.0.1:{self.port}/docs  Ray dashboard {self.dashboard}", file=sys.stderr)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job: teacher, labels and students over the service, on a local Ray; "
                                    "a table and demo.png")
    p.add_argument("--state-dir", default=".stillroom",
                   help="the service's token, SQLite job records and teachers (default: .stillroom)")
    p.add_argument("--store-root", default="stores", help="where the label stores go (default: stores)")
    p.add_argument("--out", default="demo", help="where demo.md, demo.json and demo.png go (default: demo)")
    p.add_argument("--images", type=int, default=None,
                   help="the first N Fashion-MNIST training images (default: 10000)")
    p.set_defaults(func=cmd_demo)
