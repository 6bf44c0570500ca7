"""Progress bars that a person sees in the terminal and the job service reads from a file.

When ``STILLROOM_PROGRESS_FILE`` is set (the service sets it for every job it runs), each bar also writes
``{"desc", "done", "total", "fraction", "unit", "rate", "eta_s"}`` there (``rate``: units a second since the bar
opened, its ``initial`` left out; ``eta_s``: the seconds left at that rate), at most once a second and when it
closes: a path (replaced atomically) or a URL (``s3://...``: one whole object a write).

A bar writing to a terminal redraws its line in place (tqdm). A bar writing to anything else (a file, a Ray
job's or worker's log) prints whole lines, one at most every ``STILLROOM_PROGRESS_INTERVAL`` seconds (default
10) plus the last when it closes: tqdm's carriage-return redraws would put one update a second into the log.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any

from tqdm import tqdm

from stillroom.pipelines.core.storage import Location

PROGRESS_ENV = "STILLROOM_PROGRESS_FILE"
INTERVAL_ENV = "STILLROOM_PROGRESS_INTERVAL"
LOG_INTERVAL_S = 10.0  # a bar that writes to a log prints a line at most this often


def log_interval() -> float:
    """Seconds between two lines of a bar that writes to a log (``STILLROOM_PROGRESS_INTERVAL``, default 10)."""
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, LOG_INTERVAL_S)))
    except ValueError:
        return LOG_INTERVAL_S


class ProgressBar(tqdm):
    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("file", sys.stderr)
        isatty = getattr(kwargs["file"], "isatty", None)
        self._lines = not (callable(isatty) and isatty())  # a log, not a terminal: whole lines, throttled
        self._line_open = False
        kwargs.setdefault("mininterval", log_interval() if self._lines else 1.0)
        if self._lines:
            kwargs.setdefault("miniters", 1)
            kwargs.setdefault("dynamic_ncols", False)
            kwargs.setdefault("ncols", 100)
        super().__init__(*args, **kwargs)
        where = os.environ.get(PROGRESS_ENV)
        self._progress_path = Location(where) if where else None
        self._last_write = 0.0

    def display(self, msg: str | None = None, pos: int | None = None) -> bool | None:
        if not self._lines:
            return super().display(msg, pos)
        text = self.__str__() if msg is None else msg
        if text:  # the previous line is ended now, this one by the next line or by close's newline
            self.fp.write(("\n" if self._line_open else "") + text)
            self.fp.flush()
            self._line_open = True
        return True

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
        if self._progress_path is None:
            return
        self._last_write = time.monotonic()
        total = float(self.total or 0)
        elapsed = time.time() - getattr(self, "start_t", time.time())  # a disabled bar has no start
        done_here = self.n - getattr(self, "initial", 0)
        rate = done_here / elapsed if elapsed > 0 and done_here > 0 else None
        # a disabled bar (tqdm's early return) has neither desc nor unit
        record = {"desc": getattr(self, "desc", ""), "done": self.n, "total": total,
                  "fraction": round(self.n / total, 4) if total else None, "unit": getattr(self, "unit", ""),
                  "rate": round(rate, 3) if rate else None,
                  "eta_s": round(max(total - self.n, 0) / rate, 1) if rate and total else None, "at": time.time()}
        with contextlib.suppress(OSError):  # progress is a courtesy; the job goes on without it
            self._progress_path.write_json(record)


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "img", initial: int = 0) -> ProgressBar:
    return ProgressBar(total=total, desc=desc, unit=unit, disable=not enabled, initial=initial)
