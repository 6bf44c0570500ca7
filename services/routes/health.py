"""``/healthz`` (no token: a readiness probe) and ``/metrics`` (Prometheus text)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from stillroom.services.deps import ServiceDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The service answers; where its Ray dashboard is")
def healthz(service: ServiceDep) -> dict[str, Any]:
    return {"ok": True, "time": time.time(), **service.jobs.info()}


@router.get("/metrics", response_class=PlainTextResponse, summary="Job counts in Prometheus text format",
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics(service: ServiceDep) -> str:
    c = service.db.counts()
    lines = ["# HELP stillroom_jobs Jobs by state.", "# TYPE stillroom_jobs gauge"]
    lines += [f'stillroom_jobs{{state="{s}"}} {n}' for s, n in c["by_state"].items()]
    lines += ["# HELP stillroom_cache_hits_total Jobs answered from the cache.",
              "# TYPE stillroom_cache_hits_total counter", f"stillroom_cache_hits_total {c['cache_hits']}",
              "# HELP stillroom_labels_written_total Views labeled by finished label jobs.",
              "# TYPE stillroom_labels_written_total counter",
              f"stillroom_labels_written_total {c['labels_written']}"]
    return "\n".join(lines) + "\n"
