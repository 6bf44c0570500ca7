"""The page a person looks at: ``/`` renders the jobs, the label stores and the cached teachers as HTML.

Server-rendered from the Jinja2 template shipped in the package (``templates/page.html``); a few lines of
JavaScript reload the lists every few seconds. Reading needs no token (``/`` and ``/page/jobs/{id}/log``, the
job's log as text); the actions (cancel, resume) call the REST API with the bearer token the person types,
kept in the browser's session storage.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, PlainTextResponse
from fastapi.templating import Jinja2Templates

from stillroom.services.db import ACTIVE, Job, JobKind, JobState
from stillroom.services.deps import JobDep, ServiceDep
from stillroom.services.service import Service

TEMPLATES = Jinja2Templates(directory=Path(__file__).parent / "templates")
JOBS_SHOWN = 50

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def page(request: Request, service: ServiceDep) -> HTMLResponse:
    rows, _ = service.db.list(None, None, JOBS_SHOWN, None)
    return TEMPLATES.TemplateResponse(request, "page.html", {
        "jobs": [job_row(service, j) for j in rows], "stores": store_rows(service),
        "teachers": teacher_rows(service), "dashboard": service.jobs.info().get("dashboard"),
        "now": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()),
    })


@router.get("/page/jobs/{job_id}/log", response_class=PlainTextResponse)
def job_log(job: JobDep, service: ServiceDep) -> str:
    """The job's log on Ray, as text (what ``/v1/jobs/{id}/logs`` answers, readable without the token)."""
    if not job.ray_job_id:
        return f"job {job.id} ran nothing (cache hit)\n"
    return service.jobs.logs(job.ray_job_id) or f"Ray has no log of {job.ray_job_id} (yet)\n"


def job_row(service: Service, job: Job) -> dict[str, Any]:
    """What the page shows of one job: the fraction done, the throughput, what it works on, its links."""
    progress = job.progress or {}
    fraction = progress.get("fraction")
    if job.state == JobState.SUCCEEDED:
        fraction = 1.0
    spec = job.spec or {}
    if job.kind == JobKind.train:
        what = f"{spec.get('student', '?')} from store {str(spec.get('store', '?'))[:12]}"
    elif job.kind == JobKind.label:
        what = f"{spec.get('dataset', '?')} with {', '.join(map(_short, spec.get('teachers') or []))}"
    else:
        what = f"{spec.get('model', '?')} on {spec.get('dataset', '?')}"
    return {
        "id": job.id, "kind": job.kind, "state": job.state, "what": what, "desc": progress.get("desc") or "",
        "percent": None if fraction is None else round(100 * float(fraction), 1),
        "throughput": _throughput(job, progress), "error": job.error, "cache_hit": job.cache_hit,
        "dashboard_url": service.jobs.job_link(job.ray_job_id) if job.ray_job_id else None,
        "log_url": f"/page/jobs/{job.id}/log" if job.ray_job_id else None,
        "active": job.state in ACTIVE, "resumable": job.kind == JobKind.train and job.state in (
            JobState.FAILED, JobState.CANCELLED),
        "age": _age(job.created_at),
    }


def _throughput(job: Job, progress: dict[str, Any]) -> str | None:
    """Items a second: the job's own figure when its progress has one, else its bar's count over the time run."""
    rate = progress.get("rate")
    unit = progress.get("unit") or ("views" if job.kind == JobKind.label else "samples")
    if rate is None and job.started_at and progress.get("at") and progress.get("done"):
        elapsed = float(progress["at"]) - job.started_at
        rate = float(progress["done"]) / elapsed if elapsed > 0 else None
    return None if rate is None else f"{float(rate):,.0f} {unit}/s"


def store_rows(service: Service) -> list[dict[str, Any]]:
    """Every store under the store root: its seeds, data set, teachers, recipe and the labels' quality."""
    from stillroom.pipelines.store import StoreError, list_stores

    try:
        stores = list_stores(service.settings.store_root)
    except (OSError, StoreError):
        return []
    rows = []
    for s in stores:
        seeds = s.seeds()
        quality = s.quality(seeds[0]).get("all", {}) if seeds else {}
        prov = s.provenance
        rows.append({"cache_key": s.cache_key, "seeds": seeds, "samples": s.schema.num_samples,
                     "dataset": prov.get("dataset", {}).get("spec"), "split": prov.get("dataset", {}).get("split"),
                     "recipe": (prov.get("recipe") or {}).get("name"),
                     "teachers": [_short(t.get("name") or "?") for t in prov.get("teachers", [])],
                     "top1": quality.get("top1_agreement"), "in_topk": quality.get("true_in_topk"),
                     "entropy": quality.get("mean_entropy"), "top_k": s.schema.top_k})
    return rows


def teacher_rows(service: Service) -> list[dict[str, Any]]:
    """The teachers the service trained and keeps (``teachers/<key>.pt`` with its summary ``<key>.json``)."""
    where = service.settings.work / "teachers"
    try:
        names = sorted(n for n in where.children() if n.endswith(".json") and not n.endswith(".config.json"))
    except OSError:
        return []
    rows = []
    for name in names:
        try:
            summary = (where / name).read_json()
        except (OSError, ValueError):
            continue
        rows.append({"key": name.removesuffix(".json"), "model": summary.get("model"),
                     "dataset": summary.get("dataset"), "top1": summary.get("top1"),
                     "epochs": summary.get("epochs"), "out": summary.get("out")})
    return rows


def _short(teacher: str) -> str:
    """A teacher spec as a person reads it: the name, and the checkpoint's file name rather than its path."""
    name, _, where = teacher.partition("@")
    return f"{name}@{where.rsplit('/', 1)[-1]}" if where else name


def _age(t: float) -> str:
    s = max(0, int(time.time() - t))
    return f"{s} s ago" if s < 120 else f"{s // 60} min ago" if s < 7200 else f"{s // 3600} h ago"
