"""Progress bars that a person sees in the terminal and the job service reads from a file.

When ``STILLROOM_PROGRESS_FILE`` is set (the service sets it for every job it runs), each bar also writes
``{"desc", "done", "total", "fraction"}`` there, atomically, at most once a second and when it closes.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any

from tqdm import tqdm

from pipelines.atomic import write_json

PROGRESS_ENV = "STILLROOM_PROGRESS_FILE"


class ProgressBar(tqdm):
    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("file", sys.stderr)
        kwargs.setdefault("mininterval", 1.0)
        super().__init__(*args, **kwargs)
        self._progress_path = os.environ.get(PROGRESS_ENV)
        self._last_write = 0.0

    def update(self, n: float | None = 1) -> bool | None:
        out = super().update(n)
        if self._progress_path and time.monotonic() - self._last_write >= 1.0:
            self._write_progress()
        return out

    def close(self) -> None:
        if self._progress_path and not getattr(self, "_closed_progress", False):
            self._closed_progress = True
            self._write_progress()
        super().close()

    def _write_progress(self) -> None:
        self._last_write = time.monotonic()
        total = float(self.total or 0)
        record = {"desc": self.desc, "done": self.n, "total": total,
                  "fraction": round(self.n / total, 4) if total else None, "at": time.time()}
        with contextlib.suppress(OSError):  # progress is a courtesy; the job goes on without it
            write_json(str(self._progress_path), record)


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "img") -> ProgressBar:
    return ProgressBar(total=total, desc=desc, unit=unit, disable=not enabled)
