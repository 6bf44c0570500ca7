"""The service's Ray job client against the shared Ray in token mode (Ray 2.60's default for a local cluster):
with no ``RAY_AUTH_MODE`` set it finds the token (~/.ray/auth_token) and sends it; without any token the
dashboard refuses it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ray

LIST_JOBS = ("import sys; from stillroom.services.launcher import RayJobs; "
             "print('jobs:', len(RayJobs(sys.argv[1]).client.list_jobs()))")


def run(dashboard: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}  # as a fresh shell has it
    return subprocess.run([sys.executable, "-c", LIST_JOBS, dashboard], env={**clean, **env}, capture_output=True,
                          text=True, timeout=120)


def test_the_job_client_sends_the_token_it_finds(ray_dashboard, tmp_path):
    found = run(ray_dashboard)
    assert found.returncode == 0 and found.stdout.startswith("jobs:"), found.stderr[-2000:]
    refused = run(ray_dashboard, HOME=str(tmp_path))  # no ~/.ray/auth_token there, none in the environment
    line = refused.stderr.strip().splitlines()[-1]  # the exception: one line, the cause first
    assert refused.returncode != 0 and "UsageError: the Ray dashboard at" in line, line
    assert "refused us (Authentication required: Unauthorized" in line, line
