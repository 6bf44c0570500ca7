"""The job service: FastAPI routes over job records (the database) and Ray jobs (the work).

``create_app(settings, jobs)`` builds the app; ``jobs`` is a ``RayJobs`` (tests pass one for their own
cluster). A background thread follows every active job's Ray state, progress and result into the
database; at start it reconciles records whose Ray job is gone.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from services.config import Settings
from services.db import ACTIVE, KINDS, STATES, Database, Job, new_job_id, now
from services.launcher import RayJobs
from services.specs import (
    LabelJobSpec,
    PathOutsideRoots,
    TeacherJobSpec,
    TrainJobSpec,
    _Spec,
    confined_spec,
)


class JobPublic(BaseModel):
    id: str
    kind: str
    state: str
    spec: dict[str, Any]
    cache_key: str | None
    cache_hit: bool
    ray_job_id: str | None
    attached_to: str | None
    progress: dict[str, Any] | None
    result: dict[str, Any] | None
    error: str | None
    created_at: float
    started_at: float | None
    ended_at: float | None
    dashboard_url: str | None


class JobList(BaseModel):
    jobs: list[JobPublic]
    next_page_token: str | None


class Service:
    """What the routes share: settings, database, Ray jobs, and the lock that makes dedup decisions atomic."""

    def __init__(self, settings: Settings, jobs: RayJobs):
        self.settings, self.jobs = settings, jobs
        self.db = Database(settings.db_url)
        self.submit_lock = threading.Lock()
        self.key_lock = threading.Lock()
        self.label_keys: dict[str, str] = {}  # label spec fingerprint -> cache key
        self.stop = threading.Event()

    # -- presenting ------------------------------------------------------------------------

    def public(self, job: Job) -> JobPublic:
        link = self.jobs.job_link(job.ray_job_id) if job.ray_job_id else None
        return JobPublic(id=job.id, kind=job.kind, state=job.state, spec=job.spec, cache_key=job.cache_key,
                         cache_hit=job.cache_hit, ray_job_id=job.ray_job_id, attached_to=job.attached_to,
                         progress=job.progress, result=job.result, error=job.error, created_at=job.created_at,
                         started_at=job.started_at, ended_at=job.ended_at, dashboard_url=link)

    # -- submitting ------------------------------------------------------------------------

    def submit(self, kind: str, spec: _Spec, idempotency_key: str | None) -> tuple[Job, int]:
        digest = spec.digest()
        if idempotency_key:
            existing = self.db.by_idempotency_key(idempotency_key)
            if existing is not None:
                return self._same_or_conflict(existing, kind, digest)
        base = self.settings.state_dir
        try:
            resolved = confined_spec(kind, spec, self.settings.allowed_roots, base)
        except PathOutsideRoots as e:
            raise HTTPException(400, str(e)) from None
        job = Job(id=new_job_id(), kind=kind, state="PENDING", spec=spec.model_dump(mode="json"),
                  spec_hash=digest, idempotency_key=idempotency_key, created_at=now())
        if kind == "label":
            job.cache_key = self._label_cache_key(resolved)
            if self._seeds_complete(job.cache_key, resolved["seeds"]) and not idempotency_key:
                return self._cache_hit_label(job, resolved), 202  # a read and an insert: no lock needed
        with self.submit_lock:  # dedup and idempotency decisions are made one at a time
            if idempotency_key and (existing := self.db.by_idempotency_key(idempotency_key)) is not None:
                return self._same_or_conflict(existing, kind, digest)
            if kind == "teacher":
                return self._submit_teacher(job, resolved), 202
            if kind == "label":
                return self._submit_label(job, resolved), 202
            return self._launch(job, resolved, {"out": str(self._job_dir(job) / "run")}), 202

    def _same_or_conflict(self, existing: Job, kind: str, digest: str) -> tuple[Job, int]:
        if existing.kind != kind or existing.spec_hash != digest:
            raise HTTPException(409, "this Idempotency-Key was used with another request body")
        return existing, 200

    def _job_dir(self, job: Job) -> Path:
        return self.settings.state_dir / "jobs" / job.id

    def _submit_teacher(self, job: Job, resolved: dict[str, Any]) -> Job:
        out = self.settings.state_dir / "teachers" / f"{job.spec_hash[:24]}.pt"
        summary = out.with_suffix(".json")
        if out.exists() and summary.exists():
            job.state, job.cache_hit, job.ended_at = "SUCCEEDED", True, now()
            job.result = {**json.loads(summary.read_text()), "cache_hit": True}
            return self.db.add(job)
        return self._launch(job, resolved, {"out": str(out)})

    def _seeds_complete(self, key: str, seeds: list[int]) -> bool:
        seeds_dir = self.settings.store_root / key / "seeds"
        return all((seeds_dir / str(int(s)) / "COMPLETE").exists() for s in seeds)

    def _cache_hit_label(self, job: Job, resolved: dict[str, Any]) -> Job:
        job.state, job.cache_hit, job.ended_at = "SUCCEEDED", True, now()
        job.result = {"cache_key": job.cache_key, "store": str(self.settings.store_root / str(job.cache_key)),
                      "seeds_computed": [], "seeds_reused": sorted(resolved["seeds"]), "samples": 0, "cache_hit": True}
        return self.db.add(job)

    def _submit_label(self, job: Job, resolved: dict[str, Any]) -> Job:
        key = str(job.cache_key)
        if self._seeds_complete(key, resolved["seeds"]):
            return self._cache_hit_label(job, resolved)
        have = {s for s in resolved["seeds"] if self._seeds_complete(key, [s])}
        for primary in self.db.active_label_jobs(key):
            if set(resolved["seeds"]) <= set(primary.spec["seeds"]) | have:
                job.attached_to, job.ray_job_id, job.state = primary.id, primary.ray_job_id, primary.state
                job.started_at = primary.started_at
                return self.db.add(job)
        return self._launch(job, resolved, {})

    def _label_cache_key(self, resolved: dict[str, Any]) -> str:
        """The store key of a label spec; computed once (it loads the dataset and teachers), then remembered
        for as long as the teacher checkpoints are unchanged."""
        from pipelines.errors import StillroomError
        from pipelines.labeling import LabelConfig, prepare_store

        stats = []
        for t in resolved["teachers"]:
            path = Path(t.partition("@")[2])
            stats.append((str(path), path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else (t,))
        fields = {k: v for k, v in resolved.items() if k not in ("seeds", "batch_size", "num_workers",
                                                                 "gpus_per_worker")}
        fingerprint = json.dumps([fields, stats], sort_keys=True)
        if fingerprint not in self.label_keys:
            with self.key_lock:  # the first submission of a spec computes it; the others wait for it
                if fingerprint not in self.label_keys:
                    config = LabelConfig(**{**resolved, "teachers": tuple(resolved["teachers"]),
                                            "seeds": tuple(resolved["seeds"]),
                                            "store_root": str(self.settings.store_root)})
                    try:
                        self.label_keys[fingerprint] = prepare_store(config).cache_key
                    except StillroomError as e:
                        raise HTTPException(422, str(e)) from None
        return self.label_keys[fingerprint]

    def _launch(self, job: Job, resolved: dict[str, Any], extra: dict[str, Any]) -> Job:
        job_dir = self._job_dir(job)
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "spec.json").write_text(json.dumps({
            "job_id": job.id, "kind": job.kind, "spec": resolved, "store_root": str(self.settings.store_root),
            **extra}))
        job.job_dir = str(job_dir)
        job.ray_job_id = f"stillroom-{job.id}"
        self.db.add(job)  # recorded first: the database is the record even if Ray refuses the job
        try:
            self.jobs.submit(job.ray_job_id, str(job_dir), self.settings.job_python,
                             {"stillroom_job_id": job.id, "kind": job.kind, "cache_key": job.cache_key or ""})
        except Exception as e:
            return self.db.update(job.id, state="FAILED", error=f"Ray refused the job: {e}", ended_at=now()) or job
        return job

    # -- following -------------------------------------------------------------------------

    def refresh(self, reconcile: bool = False) -> None:
        """Bring every active record up to date with Ray; ``reconcile``: at start, fail those Ray lost."""
        active = self.db.active()
        primaries = [j for j in active if j.attached_to is None and j.ray_job_id]
        for job in primaries:
            status = self.jobs.status(job.ray_job_id or "")
            if status is None:
                if reconcile or job.state == "RUNNING" or now() - job.created_at > 60:
                    self._finish(job, "FAILED", error=f"Ray job {job.ray_job_id} no longer exists "
                                                      "(the Ray cluster was restarted or the job was lost)")
                continue
            state, message = status
            fields: dict[str, Any] = {}
            progress = self._read_json(job, "progress.json")
            if progress and progress != job.progress:
                fields["progress"] = progress
            if state == "RUNNING" and job.state == "PENDING":
                fields.update(state="RUNNING", started_at=now())
            if fields:
                self.db.update(job.id, **fields)
                self._mirror(job.id, fields)
            if state in ("SUCCEEDED", "FAILED", "CANCELLED"):
                outcome = self._read_json(job, "result.json") or {}
                if state == "SUCCEEDED" and not outcome.get("ok", False):
                    state = "FAILED"
                error = outcome.get("error") or (message if state == "FAILED" else None)
                self._finish(job, state, result=outcome.get("result"), error=error)

    def _finish(self, job: Job, state: str, result: dict[str, Any] | None = None, error: str | None = None) -> None:
        fields: dict[str, Any] = {"state": state, "ended_at": now(), "error": error}
        if result is not None:
            fields["result"] = result
            if result.get("cache_key"):
                fields["cache_key"] = result["cache_key"]
        self.db.update(job.id, **fields)
        self._mirror(job.id, fields)

    def _mirror(self, primary_id: str, fields: dict[str, Any]) -> None:
        """Records attached to a primary follow its state."""
        for job in self.db.active():
            if job.attached_to == primary_id:
                self.db.update(job.id, **fields)

    def _read_json(self, job: Job, name: str) -> dict[str, Any] | None:
        if not job.job_dir:
            return None
        try:
            return json.loads((Path(job.job_dir) / name).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def follow(self) -> None:
        while not self.stop.wait(self.settings.poll_interval_s):
            try:
                self.refresh()
            except Exception as e:  # a passing Ray or database hiccup: try again next round
                print(f"stillroom: job refresh failed: {type(e).__name__}: {e}", flush=True)

    def cancel(self, job: Job) -> Job:
        if job.state not in ACTIVE:
            raise HTTPException(409, f"job {job.id} has ended already ({job.state})")
        if job.attached_to is None and job.ray_job_id:
            others = [j for j in self.db.active() if j.attached_to == job.id]
            if not others:
                self.jobs.stop(job.ray_job_id)
        return self.db.update(job.id, state="CANCELLED", ended_at=now(), error="cancelled by request") or job


class BodyLimit:
    """413 for a request body over ``max_bytes``, by its Content-Length or, without one, as it streams in."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send)
        seen = 0

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps({"detail": f"request body over {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


_bearer = HTTPBearer(auto_error=False)


def authorized(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    token: str = request.app.state.service.settings.token
    if creds is None or not secrets.compare_digest(creds.credentials.encode(), token.encode()):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


Auth = Annotated[None, Depends(authorized)]
IdemKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]


def create_app(settings: Settings, jobs: RayJobs) -> FastAPI:
    settings.prepare()
    service = Service(settings, jobs)
    _ = settings.token  # made (and printed) now, not on the first request

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.refresh(reconcile=True)
        thread = threading.Thread(target=service.follow, name="stillroom-follow", daemon=True)
        thread.start()
        yield
        service.stop.set()
        thread.join(timeout=5)

    app = FastAPI(title="stillroom", version="0.1.0", lifespan=lifespan,
                  description="Label and training jobs for knowledge distillation from a label store.")
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    def get_job(job_id: str) -> Job:
        job = service.db.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    def answer(job: Job, status: int) -> JSONResponse:
        return JSONResponse(service.public(job).model_dump(mode="json"), status_code=status)

    @app.post("/v1/teacher-jobs", response_model=JobPublic, status_code=202)
    def post_teacher(spec: TeacherJobSpec, _: Auth, key: IdemKey = None) -> JSONResponse:
        return answer(*service.submit("teacher", spec, key))

    @app.post("/v1/label-jobs", response_model=JobPublic, status_code=202)
    def post_label(spec: LabelJobSpec, _: Auth, key: IdemKey = None) -> JSONResponse:
        return answer(*service.submit("label", spec, key))

    @app.post("/v1/train-jobs", response_model=JobPublic, status_code=202)
    def post_train(spec: TrainJobSpec, _: Auth, key: IdemKey = None) -> JSONResponse:
        if not (settings.store_root / spec.store / "manifest.json").exists():
            raise HTTPException(422, f"no store {spec.store} under the store root")
        return answer(*service.submit("train", spec, key))

    @app.get("/v1/jobs", response_model=JobList)
    def list_jobs(_: Auth, state: str | None = None, kind: str | None = None,
                  limit: Annotated[int, Query(ge=1, le=500)] = 50, page_token: str | None = None) -> JobList:
        if state is not None and state not in STATES:
            raise HTTPException(422, f"state must be one of {', '.join(STATES)}")
        if kind is not None and kind not in KINDS:
            raise HTTPException(422, f"kind must be one of {', '.join(KINDS)}")
        try:
            rows, token_out = service.db.list(state, kind, limit, page_token)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return JobList(jobs=[service.public(j) for j in rows], next_page_token=token_out)

    @app.get("/v1/jobs/{job_id}", response_model=JobPublic)
    def show_job(job_id: str, _: Auth) -> JobPublic:
        return service.public(get_job(job_id))

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobPublic)
    def cancel_job(job_id: str, _: Auth) -> JobPublic:
        return service.public(service.cancel(get_job(job_id)))

    @app.get("/v1/jobs/{job_id}/logs")
    def job_logs(job_id: str, _: Auth, follow: bool = False):
        job = get_job(job_id)
        ray_id = job.ray_job_id
        if not ray_id:
            return PlainTextResponse(f"job {job_id} ran nothing (cache hit)\n")
        if not follow:
            return PlainTextResponse(service.jobs.logs(ray_id))
        return StreamingResponse(service.jobs.tail(ray_id), media_type="text/plain")

    @app.get("/v1/jobs/{job_id}/metrics")
    def job_metrics(job_id: str, _: Auth) -> dict[str, Any]:
        job = get_job(job_id)
        if job.kind != "train":
            raise HTTPException(404, f"job {job_id} is a {job.kind} job: only train jobs have metrics")
        run = Path(job.job_dir or "") / "run"
        epochs = []
        if (run / "metrics.jsonl").exists():
            epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        final = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else None
        return {"job_id": job_id, "state": job.state, "epochs": epochs, "final": final}

    @app.get("/v1/stores")
    def stores(_: Auth) -> list[dict[str, Any]]:
        from pipelines.store import list_stores

        return [{"cache_key": s.cache_key, "seeds": s.seeds(), "samples": s.schema.num_samples,
                 "dataset": s.provenance.get("dataset", {}).get("spec"),
                 "recipe": s.provenance.get("recipe", {}).get("name"),
                 "teachers": [t.get("name") for t in s.provenance.get("teachers", [])],
                 "size_on_disk": s.size_on_disk()} for s in list_stores(settings.store_root)]

    @app.get("/v1/stores/{cache_key}")
    def store(cache_key: str, _: Auth) -> dict[str, Any]:
        from pipelines.store import LabelStore, StoreError

        if not cache_key.isalnum():
            raise HTTPException(400, "a cache key is letters and digits")
        try:
            return LabelStore(settings.store_root / cache_key).describe()
        except StoreError:
            raise HTTPException(404, f"no store {cache_key}") from None

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True, "time": time.time(), **service.jobs.info()}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        c = service.db.counts()
        lines = ["# HELP stillroom_jobs Jobs by state.", "# TYPE stillroom_jobs gauge"]
        lines += [f'stillroom_jobs{{state="{s}"}} {n}' for s, n in c["by_state"].items()]
        lines += ["# HELP stillroom_cache_hits_total Jobs answered from the cache.",
                  "# TYPE stillroom_cache_hits_total counter", f"stillroom_cache_hits_total {c['cache_hits']}",
                  "# HELP stillroom_labels_written_total Views labeled by finished label jobs.",
                  "# TYPE stillroom_labels_written_total counter",
                  f"stillroom_labels_written_total {c['labels_written']}"]
        return "\n".join(lines) + "\n"

    return app
