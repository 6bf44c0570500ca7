"""A small REST client for the job service, used by ``stillroom jobs`` and ``stillroom demo``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from stillroom.pipelines.core import StillroomError

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


class ServiceError(StillroomError):
    pass


def default_token(state_dir: str | os.PathLike = ".stillroom") -> str:
    token = os.environ.get("STILLROOM_API_TOKEN")
    if token:
        return token
    path = Path(state_dir) / "api_token"
    if path.exists():
        return path.read_text().strip()
    raise ServiceError(f"no API token in {path}: pass the service's --state-dir (`stillroom serve` prints where its "
                       "token is), --token, or set STILLROOM_API_TOKEN")


class StillroomClient:
    def __init__(self, url: str, token: str, timeout: float = 30.0):
        self.http = httpx.Client(base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {token}"},
                                 timeout=timeout)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise ServiceError(f"cannot reach the service at {self.http.base_url}: {e}") from None
        if r.status_code >= 400:
            raise ServiceError(f"{method} {path}: HTTP {r.status_code}: {_detail(r)}")
        return r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text

    def submit(self, kind: str, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", f"/v1/{kind}-jobs", json=spec, headers=headers)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def jobs(self, **params: Any) -> dict[str, Any]:
        return self._call("GET", "/v1/jobs", params={k: v for k, v in params.items() if v is not None})

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")

    def resume(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/resume")

    def logs(self, job_id: str) -> str:
        return self._call("GET", f"/v1/jobs/{job_id}/logs")

    def follow_logs(self, job_id: str) -> Iterator[str]:
        """The job's output as it comes; a ServiceError (not a traceback, not an error body as output) when
        the service is not there, refuses the token or has no such job."""
        path = f"/v1/jobs/{job_id}/logs"
        try:
            with self.http.stream("GET", path, params={"follow": 1}, timeout=httpx.Timeout(30, read=None)) as r:
                if r.status_code >= 400:
                    r.read()
                    raise ServiceError(f"GET {path}: HTTP {r.status_code}: {_detail(r)}")
                yield from r.iter_text()
        except httpx.HTTPError as e:
            raise ServiceError(f"cannot reach the service at {self.http.base_url}: {e}") from None

    def metrics(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}/metrics")

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/healthz")

    def wait(self, job_id: str, on_update: Callable[[dict[str, Any]], None] | None = None,
             timeout: float = 3600, interval: float = 1.0) -> dict[str, Any]:
        """Poll until the job ends; ``on_update`` sees every state."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_update:
                on_update(job)
            if job["state"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise ServiceError(f"job {job_id} still {job['state']} after {timeout:.0f} s")
            time.sleep(interval)


def _detail(r: httpx.Response) -> str:
    """An error answer's message: FastAPI's ``detail`` (a string, or a list of field errors), else the body."""
    try:
        detail = r.json().get("detail")
    except (ValueError, AttributeError):
        return r.text[:500]
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(str(x) for x in e.get('loc', [])[1:])}: {e.get('msg')}" for e in detail)
    return str(detail)
