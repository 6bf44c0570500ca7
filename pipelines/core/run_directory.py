"""A run directory on a plain path or a URL (``--out s3://bucket/runs/r1``): ``RunDirectory``.

The writers of a run (torch's checkpoints, TensorBoard's event files, matplotlib's curves, ``metrics.jsonl``)
write files in place, and append to some of them; object storage has neither append nor rename. So a run whose
``--out`` is a URL writes into a local staging directory (``RunDirectory.local``) and ``sync()``, at each epoch
end, uploads the files that changed since the last sync, each file whole, the checkpoints last (``last=``), so
that a reader who finds an epoch's checkpoint finds that epoch's metrics beside it. A crash loses at most the
epoch under way; ``pull()`` brings a run's files back into a new staging directory to resume it.

A plain path is written in place, as it always was: ``local`` is that path and ``sync()`` does nothing.

The staging directory is ``<temp dir>/stillroom-run-<pid>-<random>``, held by an advisory lock (``flock``) on it
for the run's life. A run killed outright (SIGKILL, out of memory) cannot remove it; the next run directory made on
the node (``sweep_staging``) removes every one whose lock it can take: its process is gone (a lock dies with its
process, whatever pid namespace it ran in).

Why our own and not a library's: fsspec's ``put(recursive=True)`` uploads everything every time, in no chosen
order, and Ray Train's storage takes only the checkpoints it is handed (``ray.train.report``), not a run's
other files; what is left here is the choice of the changed files and their order.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from stillroom.pipelines.core.storage import Location, is_url, local_path

log = logging.getLogger("stillroom")
STAGING_PREFIX = "stillroom-run-"


def _lock(path: Path) -> int | None:
    """An open descriptor of the directory ``path`` holding its exclusive lock, or None if another process holds
    it (or it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def sweep_staging(folder: Path | None = None) -> list[Path]:
    """Remove the staging directories under ``folder`` (the temp dir) that no live run holds; return them."""
    folder = Path(folder or tempfile.gettempdir())
    removed = []
    for path in sorted(folder.glob(STAGING_PREFIX + "*")):
        fd = _lock(path) if path.is_dir() else None
        if fd is None:
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
        log.info("removed %s, the staging directory of a run that was killed", path)
        removed.append(path)
    return removed


class RunDirectory:
    """Where a run writes (``local``) and where its files end up (``url``: the path or URL given)."""

    def __init__(self, out: str | os.PathLike, last: Sequence[str] = (), writes: bool = True):
        """``writes=False``: a rank of a run that writes nothing (not the lead of a multi-worker run): no staging
        directory is made for it; its ``local`` is ``os.devnull``, where a write fails at once."""
        self.remote: Location | None = Location(out) if is_url(out) else None  # refuses a URL holding credentials
        self._held: int | None = None
        if self.remote is not None and not writes:
            self.local: Path = Path(os.devnull)
            self.remote = None  # nothing to upload, pull or remove
        elif self.remote is not None:
            sweep_staging()
            # made under another name and locked before it takes its own, so no sweep finds it unlocked
            made = Path(tempfile.mkdtemp(prefix=f".{STAGING_PREFIX}{os.getpid()}-"))
            self._held = _lock(made)
            self.local = made.with_name(made.name[1:])
            made.rename(self.local)
        else:
            self.local = local_path(out)
        self.last = tuple(last)
        self._synced: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) at its last upload
        self._out = self.remote or Location(out)

    @property
    def url(self) -> str:
        """The run directory as the user named it (a local path or the URL)."""
        return self._out.url

    def __truediv__(self, name: str) -> Location:
        """A file of the run where it ends up (its URL for a run on object storage)."""
        return self._out / name

    def pull(self, skip: Sequence[str] = ()) -> list[str]:
        """Download the run's files into the staging directory, except those whose name or first directory is in
        ``skip`` (checkpoints read from where they are, Ray Train's own storage); return their names."""
        if self.remote is None:
            return []
        names = [n for n in self.remote.files() if n.split("/")[0] not in skip]
        for name in names:
            (self.remote / name).download(self.local / name)
        self._synced = self._stat()
        return names

    def sync(self) -> list[str]:
        """Upload the files written since the last sync, each whole, the ``last`` ones last and in that order;
        return their names. Hidden files (a write's temporary ``.name.tmp``) stay behind."""
        if self.remote is None:
            return []
        now = self._stat()
        changed = sorted((n for n, stat in now.items() if self._synced.get(n) != stat),
                         key=lambda n: (self.last.index(n) + 1 if n in self.last else 0, n))
        for name in changed:
            (self.remote / name).upload(self.local / name)
            self._synced[name] = now[name]  # the state before the upload: a file changed during it goes again
        return changed

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the staging directory (what was not synced is lost with it)."""
        if self.remote is not None:
            shutil.rmtree(self.local, ignore_errors=True)
        if self._held is not None:
            with contextlib.suppress(OSError):
                os.close(self._held)
            self._held = None

    def _stat(self) -> dict[str, tuple[int, int]]:
        found = {}
        for p in self.local.rglob("*"):
            name = p.relative_to(self.local).as_posix()
            if p.is_file() and not any(part.startswith(".") for part in name.split("/")):
                st = p.stat()
                found[name] = (st.st_size, st.st_mtime_ns)
        return found


__all__ = ["RunDirectory", "sweep_staging"]
