"""The routes' dependencies as ``Annotated`` aliases; a test swaps one with ``app.dependency_overrides``."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from stillroom.services.db import Job
from stillroom.services.service import Service


class Message(BaseModel):
    """An error that is not about one field: ``{"detail": "what was wrong"}``."""

    detail: str


# dependencies that do no I/O are `async def`: FastAPI runs them on the event loop, where a plain `def`
# would cost a trip through the thread pool on every request

async def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]

_bearer = HTTPBearer(auto_error=False, description="the service's API token (STILLROOM_API_TOKEN or its token file)")


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def authorized(service: ServiceDep, creds: Credentials) -> None:
    token = service.settings.token
    if creds is None or not secrets.compare_digest(creds.credentials.encode(), token.encode()):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


Auth = Annotated[None, Depends(authorized)]
IdemKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200,
                                       description="the same key with the same body answers the first job again")]


def get_job(service: ServiceDep, job_id: Annotated[str, Path(max_length=40)]) -> Job:
    job = service.db.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job


JobDep = Annotated[Job, Depends(get_job)]

Responses = dict[int | str, dict[str, Any]]
UNAUTHORIZED: Responses = {401: {"model": Message, "description": "missing or wrong bearer token"}}
NOT_FOUND: Responses = {404: {"model": Message, "description": "no such job or store"}}
