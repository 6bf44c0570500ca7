"""The OpenAPI document tells the truth: schemathesis (a third-party fuzzer) runs its coverage and fuzzing
phases with every check against a real `stillroom serve` and finds no failure.

The service runs on the shared Ray with ``STILLROOM_JOB_PYTHON=/bin/true``: the fuzzer's jobs are real
Ray jobs whose entry point ends at once, so that a fuzzed spec never trains anything.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from serving import TOKEN, Server

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]  # schemathesis.toml lives there


def test_schemathesis_finds_no_failure(tmp_path, ray_dashboard):
    pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra: pip install -e '.[dev]'")
    (tmp_path / "data").mkdir()
    server = Server(tmp_path, ray_dashboard, STILLROOM_JOB_PYTHON="/bin/true").start()
    try:
        cli = Path(sys.executable).with_name("schemathesis")
        run = subprocess.run(
            [str(cli), "run", f"{server.url}/openapi.json", "--checks", "all", "--phases", "coverage,fuzzing",
             "--max-examples", "5", "--seed", "1", "--workers", "1", "--request-timeout", "180",
             "-H", f"Authorization: Bearer {TOKEN}", "--no-color"],
            cwd=REPO, capture_output=True, text=True, timeout=540)
    finally:
        server.stop()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "13 selected / 13 total" in run.stdout  # every operation was tested
