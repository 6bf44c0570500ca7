"""The job service: ``create_app(settings, jobs)`` assembles the routers over one ``Service``.

``jobs`` is a ``RayJobs`` (tests pass one for their own cluster); ``owns_cluster`` says the service started
that Ray cluster itself, so that stopping the service cancels its jobs (they would not outlive the cluster).
A background thread follows every active job's Ray state, progress and result into the database; at start
it reconciles records whose Ray job is gone.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from stillroom.services import page
from stillroom.services.config import Settings
from stillroom.services.launcher import RayJobs
from stillroom.services.routes import health, jobs, stores
from stillroom.services.service import Service

STOP_REASON = "the service stopped, and the local Ray cluster it started stops with it"


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


def create_app(settings: Settings, ray_jobs: RayJobs, owns_cluster: bool = False) -> FastAPI:
    settings.prepare()
    service = Service(settings, ray_jobs, owns_cluster=owns_cluster)
    _ = settings.token  # made now, not on the first request

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.stores.scan()
        service.refresh(reconcile=True)
        thread = threading.Thread(target=service.follow, name="stillroom-follow", daemon=True)
        thread.start()
        yield
        service.stop.set()
        thread.join(timeout=10)
        if service.owns_cluster:
            cancelled = service.cancel_all(STOP_REASON)
            if cancelled:
                print(f"stillroom: cancelled {len(cancelled)} running job(s): {STOP_REASON}", file=sys.stderr,
                      flush=True)
        service.db.close()

    # Swagger UI and ReDoc from the files fastapi-offline installs, not a CDN: /docs works offline
    app = FastAPIOffline(title="stillroom", version="0.1.0", lifespan=lifespan,
                  description="Label and training jobs for knowledge distillation from a label store.")
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    for router in (jobs.router, stores.router, health.router, page.router):
        app.include_router(router)
    _text_answers_are_only_text(app)
    return app


def _text_answers_are_only_text(app: FastAPI) -> None:
    """FastAPI documents every 200 as JSON too; where a route answers text (logs), say only text."""
    make = app.openapi

    def openapi() -> dict[str, Any]:
        schema = make()
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                content = op.get("responses", {}).get("200", {}).get("content", {})
                if "text/plain" in content and content.get("application/json") == {"schema": {}}:
                    del content["application/json"]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
