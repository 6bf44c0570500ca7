"""``/v1/{teacher,label,train}-jobs`` (submit) and ``/v1/jobs`` (list, show, cancel, logs, metrics)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from stillroom.pipelines.core import Location
from stillroom.services.db import Job, JobKind, JobList, JobPublic, JobState
from stillroom.services.deps import NOT_FOUND, UNAUTHORIZED, Auth, IdemKey, JobDep, Message, ServiceDep
from stillroom.services.service import Service
from stillroom.services.specs import LabelJobSpec, TeacherJobSpec, TrainJobSpec, _Spec

router = APIRouter(prefix="/v1", tags=["jobs"], responses=UNAUTHORIZED)

SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": JobPublic, "description": "a replay: this Idempotency-Key made this job before"},
    202: {"model": JobPublic, "description": "the job is recorded (and, unless a cache hit, submitted to Ray)"},
    400: {"model": Message, "description": "the body is not JSON"},
    403: {"model": Message, "description": "a path in the spec is outside the configured roots"},
    409: {"model": Message, "description": "this Idempotency-Key was used with another body"},
    413: {"model": Message, "description": "the request body is too large"},
}


def _submitted(service: Service, kind: JobKind, spec: _Spec, key: str | None) -> JSONResponse:
    job, status = service.submit(kind, spec, key)
    return JSONResponse(service.public(job).model_dump(mode="json"), status_code=status)


@router.post("/teacher-jobs", status_code=202, response_model=JobPublic, responses=SUBMIT_RESPONSES,
             summary="Train a teacher (reused when the same spec trained one before)")
def post_teacher(spec: TeacherJobSpec, service: ServiceDep, _: Auth, key: IdemKey = None) -> JSONResponse:
    return _submitted(service, JobKind.teacher, spec, key)


@router.post("/label-jobs", status_code=202, response_model=JobPublic, responses=SUBMIT_RESPONSES,
             summary="Label a data set with teachers into the store (a cache hit when its seeds are there)")
def post_label(spec: LabelJobSpec, service: ServiceDep, _: Auth, key: IdemKey = None) -> JSONResponse:
    # a known cache hit is a lookup and one INSERT; anything else may load a data set or call Ray. Both run
    # in the thread pool: a database that waits must never hold up the event loop
    if key is None and (job := service.cached_label(spec)) is not None:
        return JSONResponse(service.public(job).model_dump(mode="json"), status_code=202)
    return _submitted(service, JobKind.label, spec, key)


@router.post("/train-jobs", status_code=202, response_model=JobPublic, responses=SUBMIT_RESPONSES,
             summary="Train a student from a store (the data set is the store's unless named)")
def post_train(spec: TrainJobSpec, service: ServiceDep, _: Auth, key: IdemKey = None) -> JSONResponse:
    return _submitted(service, JobKind.train, spec, key)


@router.get("/jobs", response_model=JobList, summary="Jobs, newest first, a page at a time")
def list_jobs(service: ServiceDep, _: Auth, state: JobState | None = None, kind: JobKind | None = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 50,
              page_token: Annotated[str | None, Query(max_length=400)] = None) -> JobList:
    try:
        rows, token_out = service.db.list(state, kind, limit, page_token)
    except ValueError as e:
        raise RequestValidationError([{"type": "value_error", "loc": ("query", "page_token"), "msg": str(e)}]) \
            from None
    return JobList(jobs=[service.public(j) for j in rows], next_page_token=token_out)


@router.get("/jobs/{job_id}", response_model=JobPublic, responses=NOT_FOUND)
def show_job(job: JobDep, service: ServiceDep, _: Auth) -> JobPublic:
    return service.public(job)


@router.post("/jobs/{job_id}/resume", response_model=JobPublic,
             responses={**NOT_FOUND, 409: {"model": Message, "description": "not a cancelled or failed train job "
                                                                            "with a last.pt"}},
             summary="Continue a cancelled or failed train job from its last.pt (a new attempt of the same job)")
def resume_job(job: JobDep, service: ServiceDep, _: Auth) -> JobPublic:
    return service.public(service.resume(job))


@router.post("/jobs/{job_id}/cancel", response_model=JobPublic,
             responses={**NOT_FOUND, 409: {"model": Message, "description": "the job has ended already"}})
def cancel_job(job: JobDep, service: ServiceDep, _: Auth) -> JobPublic:
    return service.public(service.cancel(job))


@router.get("/jobs/{job_id}/logs", response_model=None, responses={
    **NOT_FOUND, 200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                       "description": "the job's output on Ray (streamed while it runs with follow=true)"}})
def job_logs(job: JobDep, service: ServiceDep, _: Auth, follow: bool = False) -> Any:
    ray_id = job.ray_job_id
    if not ray_id:
        return PlainTextResponse(f"job {job.id} ran nothing (cache hit)\n")
    if not follow:
        return PlainTextResponse(service.jobs.logs(ray_id))
    return StreamingResponse(_tail(service, ray_id), media_type="text/plain")


async def _tail(service: Service, ray_id: str) -> AsyncIterator[str]:
    """The job's output as Ray streams it; a stream that breaks ends with a line saying so, not a cut-off
    response (Ray's log tail fails e.g. for a job it has not started yet or stopped meanwhile)."""
    try:
        async for chunk in service.jobs.tail(ray_id):
            yield chunk
    except Exception as e:
        yield f"\n[stillroom: the log stream of {ray_id} ended: {type(e).__name__}: {e}]\n"


@router.get("/jobs/{job_id}/metrics", responses={**NOT_FOUND},
            summary="A train job's per-epoch and final metrics (404 for other kinds)")
def job_metrics(job: JobDep, _: Auth) -> dict[str, Any]:
    if job.kind != JobKind.train:
        raise HTTPException(404, f"job {job.id} is a {job.kind} job: only train jobs have metrics")
    return _metrics(job)


def _metrics(job: Job) -> dict[str, Any]:
    run = Location(job.job_dir or "") / "run"  # a path or a URL under the work root
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        lines = []
    epochs = [json.loads(line) for line in lines if line.strip()]
    try:
        final = (run / "metrics.json").read_json()
    except FileNotFoundError:
        final = None
    return {"job_id": job.id, "state": job.state, "epochs": epochs, "final": final}
