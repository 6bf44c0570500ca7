"""Jobs run as Ray jobs through the Ray Jobs API, so they show in the Ray dashboard.

The entry point is always ``<python> -m services.job_entry <job dir>``: the job dir is made by the service
from a generated job id, and the spec travels as a file in it, never through a shell or a runtime_env.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import AsyncIterator
from typing import Any

from services.config import Settings

RAY_TO_STATE = {"PENDING": "PENDING", "RUNNING": "RUNNING", "SUCCEEDED": "SUCCEEDED", "FAILED": "FAILED",
                "STOPPED": "CANCELLED"}


def start_local_ray(settings: Settings) -> str:
    """Start a local Ray head with its dashboard in this process; return the dashboard URL."""
    import ray

    ctx = ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=settings.dashboard_port,
                   num_cpus=os.cpu_count(), log_to_driver=False)
    url = ctx.dashboard_url or f"127.0.0.1:{settings.dashboard_port}"
    return url if url.startswith("http") else f"http://{url}"


class RayJobs:
    """A thin wrapper of ``JobSubmissionClient`` that speaks in service states."""

    def __init__(self, dashboard_url: str):
        from ray.job_submission import JobSubmissionClient

        self.dashboard_url = dashboard_url if dashboard_url.startswith("http") else f"http://{dashboard_url}"
        self.client = JobSubmissionClient(self.dashboard_url)

    def submit(self, submission_id: str, job_dir: str, python: str, metadata: dict[str, str],
               agent_wait_s: float = 60.0) -> str:
        """Submit; while the cluster's job agent is still starting (a fresh head), wait for it."""
        entrypoint = " ".join(shlex.quote(a) for a in (python, "-m", "services.job_entry", job_dir))
        deadline = time.monotonic() + agent_wait_s
        while True:
            try:
                return self.client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                                              metadata=metadata, entrypoint_num_cpus=0)
            except Exception as e:  # the SDK raises RuntimeError; other errors come from requests
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def status(self, submission_id: str) -> tuple[str, str] | None:
        """``(state, message)``, or None when Ray has no such job (e.g. the cluster was restarted)."""
        try:
            info = self.client.get_job_info(submission_id)
        except RuntimeError as e:
            if "does not exist" in str(e) or "404" in str(e) or "not found" in str(e).lower():
                return None
            raise
        return RAY_TO_STATE.get(str(info.status.value), "RUNNING"), info.message or ""

    def stop(self, submission_id: str) -> bool:
        try:
            return bool(self.client.stop_job(submission_id))
        except RuntimeError:
            return False

    def logs(self, submission_id: str) -> str:
        try:
            return self.client.get_job_logs(submission_id)
        except RuntimeError:
            return ""

    async def tail(self, submission_id: str) -> AsyncIterator[str]:
        async for chunk in self.client.tail_job_logs(submission_id):
            yield chunk

    def job_link(self, submission_id: str) -> str:
        return f"{self.dashboard_url}/#/jobs/{submission_id}"

    def info(self) -> dict[str, Any]:
        return {"dashboard": self.dashboard_url}
