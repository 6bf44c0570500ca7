"""Errors a user can act on. The CLI prints their message on one line, with no traceback; an error raised in a
Ray actor or worker keeps that process's traceback beside its message (``from_worker``), for the job's log."""

from __future__ import annotations

import re


class StillroomError(Exception):
    """An expected failure (a corrupt store, a missing file): exit code 1."""

    exit_code = 1
    worker_traceback: str | None = None  # where it was raised, when that was another process (from_worker)


class UsageError(StillroomError):
    """Bad input from the user (an unknown name, an id out of range): exit code 2."""

    exit_code = 2


class DataError(StillroomError):
    """A sample that cannot be read (not an image, truncated, unreadable): names the file or row."""


class StoreError(StillroomError):
    """The store on disk is missing, corrupt or not what the caller asked for."""


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def from_worker(cause: BaseException | None, traceback_text: str, where: str) -> StillroomError:
    """What a Ray actor or worker raised (``cause``, with Ray's ``traceback_text`` of it), as the error this
    process raises: the cause itself when it is a StillroomError, else one that names the cause's type and
    first line. ``worker_traceback`` keeps the traceback, colour codes dropped, for the job's log; the message
    stays the one line a person reads (``error_line``)."""
    if isinstance(cause, StillroomError):
        error = cause
    else:
        name = type(cause).__name__ if cause is not None else "an error"
        first = _ANSI.sub("", str(cause or "")).strip().splitlines()
        error = StillroomError(f"{name} in a {where}{': ' + first[0][:300] if first else ''}")
    error.worker_traceback = _ANSI.sub("", traceback_text)
    return error


def error_line(error: BaseException) -> str:
    """An error as one line. One raised in a worker, with its cause first: ``DataError: x.JPEG: cannot decode
    (...)``; a message that carries a traceback (torch's DataLoader re-raises a worker's error as ``Caught
    DataError in DataLoader worker process 0.`` and the traceback), by the error at its end; any other error,
    as its message."""
    lines = [line for line in _ANSI.sub("", str(error)).strip().splitlines() if line.strip()]
    name, first = type(error).__name__, lines[0] if lines else type(error).__name__
    if any(line.startswith(("Traceback (most recent", "Original Traceback")) for line in lines):
        raised = [m for line in lines if (m := _RAISED.match(line))]
        if raised:
            name, first = raised[-1].group(1), raised[-1].group(2)
            return f"{name}: {first}"
    if getattr(error, "worker_traceback", None) and type(error) is not StillroomError:
        return f"{name}: {first}"
    return first


_RAISED = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception)): (.+)$")
