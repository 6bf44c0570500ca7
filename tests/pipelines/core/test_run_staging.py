"""The local staging directory of a run on a URL (``RunDirectory``): named with its process's pid, locked for its
life; one left by a SIGKILLed run is removed by the next run directory made on the node, a live run's never."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from stillroom.pipelines.core import RunDirectory

HOLD = ("from stillroom.pipelines.core import RunDirectory\n"
        "import sys, time\n"
        "d = RunDirectory('memory://bucket/runs/r1', last=('last.pt',))\n"
        "(d.local / 'metrics.jsonl').write_text('{}')\n"
        "print(d.local, flush=True)\n"
        "time.sleep(120)\n")


def _run_holding(tmp: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_a_killed_runs_staging_directory_is_removed_by_the_next_run(tmp_path, monkeypatch):
    killed, killed_dir = _run_holding(tmp_path)
    alive, alive_dir = _run_holding(tmp_path)
    try:
        assert killed_dir.name.startswith(f"stillroom-run-{killed.pid}-") and killed_dir.parent == tmp_path
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        assert (killed_dir / "metrics.jsonl").exists()  # what SIGKILL leaves

        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        run = RunDirectory("memory://bucket/runs/r2")
        try:
            assert not killed_dir.exists()  # swept: its process is gone
            assert (alive_dir / "metrics.jsonl").exists()  # a live run's is left to it
            assert run.local.is_dir() and run.local.name.startswith(f"stillroom-run-{os.getpid()}-")
        finally:
            run.close()
        assert not run.local.exists()
    finally:
        alive.kill()
        alive.wait(30)
        killed.kill()
        for proc in (alive, killed):
            proc.stdout.close()
