"""Parquet shards on object storage, staged whole on the node's local disk once they are read at random.

A shuffled epoch takes its rows from every row group in turn. Read in place, each row then costs its row
group's whole image column (Hugging Face writes 100 rows a group): about 100x the epoch's image bytes from the
object store, every epoch. What a user does by hand instead (``aws s3 sync`` to the node's disk, or Mosaic
streaming's local cache) is what this does on its own: the first time a process reads a row group a second time
(the access pattern of a shuffle; reading in id order, as labeling does, reads each group once and stages
nothing), it queues every shard of the data set, that one first, and ``DOWNLOAD_THREADS`` threads download them
whole, each by one sequential read, once per node. Until a shard's copy is there, its reads take the ranged
row-group path; from then on, and in every later epoch and run on the node, the local copy. The shuffle stays
uniform over the whole split: nothing about the order changes.

Where: ``$STILLROOM_SHARD_STAGE`` (a directory; ``off`` turns staging off), by default
``<temp dir>/stillroom-shards``. A process stages only when that disk keeps 10 % free (and 1 GiB) after every
shard of the data set is there, and says so once in the log either way. Copies are named by the shard's URL,
size and version tag (ETag), so a rewritten shard is fetched again; delete the folder to take the space back.

Several processes on a node (loader workers, Ray workers) share the folder: one holds an advisory lock on a
shard while it downloads into a file of its own and renames it into place, the others keep reading in place
meanwhile. A process killed mid-download leaves a ``.part-*`` file that the next downloader removes, never a
copy taken for whole; a copy whose size differs from the listing's is not used.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import queue
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from pipelines.storage import filesystem

log = logging.getLogger("stillroom.data")

ENV = "STILLROOM_SHARD_STAGE"
KEEP_FREE = 0.10  # of the disk, after every shard is staged
KEEP_FREE_MIN = 1 << 30
COPY_BLOCK = 8 << 20  # bytes a read while downloading
DOWNLOAD_THREADS = 4  # shards fetched at once by a process (S3 gives bandwidth by concurrency)


def stage_dir() -> Path | None:
    """The folder staged shards go to, or None when ``$STILLROOM_SHARD_STAGE`` is ``off``."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in ("off", "0", "false", "no", "none"):
        return None
    return Path(value) if value else Path(tempfile.gettempdir()) / "stillroom-shards"


class ShardStage:
    """Local copies of one data set's shards, made in the background of the process that reads them.

    Pickled into loader workers as its settings only: each process has its own downloader thread and
    re-read counts (a forked child starts afresh)."""

    def __init__(self, urls: list[str], stat: list[tuple[int, int]]):
        self.urls, self.sizes = urls, [int(size) for size, _ in stat]
        self.names = [hashlib.sha256(f"{u}\0{size}\0{tag}".encode()).hexdigest()[:32] + ".parquet"
                      for u, (size, tag) in zip(urls, stat, strict=True)]
        self._fresh()

    def _fresh(self) -> None:
        self._pid = os.getpid()
        self._dir: Path | None | bool = False  # False: not decided yet in this process
        self._reads: set[tuple[int, int]] = set()
        self._started = False

    def __getstate__(self) -> dict[str, Any]:
        return {"urls": self.urls, "sizes": self.sizes, "names": self.names}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fresh()

    def where(self, shard: int, group: int) -> str:
        """What to read ``group`` of ``shard`` from: its local copy when staged, else its URL (and the first
        second read of a group in this process starts staging every shard, ``shard`` first)."""
        if self._pid != os.getpid():
            self._fresh()
        folder = self._folder()
        if folder is None:
            return self.urls[shard]
        path = folder / self.names[shard]
        if _whole(path, self.sizes[shard]):  # a stat each time: a copy deleted meanwhile is read in place again
            return str(path)
        key = (shard, group)
        if key not in self._reads:
            self._reads.add(key)
        elif not self._started:
            self._started = True
            todo: queue.SimpleQueue[int] = queue.SimpleQueue()
            for s in [shard, *(s for s in range(len(self.urls)) if s != shard)]:
                todo.put(s)
            for _ in range(min(DOWNLOAD_THREADS, len(self.urls))):  # daemons: a process that ends leaves a .part
                threading.Thread(target=self._download_all, args=(todo,), name="stillroom-shard-stage",
                                 daemon=True).start()
        return self.urls[shard]

    def _folder(self) -> Path | None:
        if self._dir is False:
            self._dir = self._decide()
        return self._dir if isinstance(self._dir, Path) else None

    def _decide(self) -> Path | None:
        folder = stage_dir()
        if folder is None or not self.urls or self.urls[0].startswith("file://"):
            return None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            usage = shutil.disk_usage(folder)
        except OSError as e:
            log.warning("not staging Parquet shards in %s: %s", folder, e)
            return None
        missing = sum(size for size, name in zip(self.sizes, self.names, strict=True) if not (folder / name).exists())
        keep = max(KEEP_FREE * usage.total, KEEP_FREE_MIN)
        if usage.free - missing < keep:
            log.warning("not staging %d Parquet shards (%.1f GB to fetch) in %s: it has %.1f GB free and keeps "
                        "%.1f GB; rows are read by row group from the object store (set %s to a larger disk)",
                        len(self.urls), missing / 1e9, folder, usage.free / 1e9, keep / 1e9, ENV)
            return None
        log.info("staging Parquet shards read at random in %s (%.1f GB still to fetch; %s=off turns it off)",
                 folder, missing / 1e9, ENV)
        return folder

    def _download_all(self, todo: queue.SimpleQueue[int]) -> None:
        while True:
            try:
                shard = todo.get_nowait()
            except queue.Empty:
                return
            try:
                self._download(shard)
            except Exception as e:  # the ranged reads go on; a failed copy is retried by no one in this process
                log.warning("could not stage %s: %s", self.urls[shard], e)

    def _download(self, shard: int) -> None:
        folder = self._folder()
        if folder is None:
            return
        final = folder / self.names[shard]
        with open(folder / (self.names[shard] + ".lock"), "a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another process on this node is fetching it; where() finds the copy once it is there
            if _whole(final, self.sizes[shard]):
                return
            for stale in folder.glob(self.names[shard] + ".part-*"):
                stale.unlink(missing_ok=True)
            part = folder / f"{self.names[shard]}.part-{os.getpid()}"
            fs, path = filesystem(self.urls[shard])
            try:
                with fs.open(path, "rb", block_size=COPY_BLOCK, cache_type="none") as src, open(part, "wb") as out:
                    shutil.copyfileobj(src, out, COPY_BLOCK)
                if not _whole(part, self.sizes[shard]):
                    raise OSError(f"{part.stat().st_size} bytes fetched, {self.sizes[shard]} listed "
                                  "(the shard changed since it was listed?)")
                os.replace(part, final)
            finally:
                part.unlink(missing_ok=True)
        log.debug("staged %s as %s", self.urls[shard], final)


def _whole(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size or size <= 0 < path.stat().st_size
    except FileNotFoundError:
        return False
