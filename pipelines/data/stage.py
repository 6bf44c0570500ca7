"""Parquet shards read at random, staged on the node's local disk as Arrow IPC files that give any row at once.

A shuffled epoch takes its rows from every row group in turn, and Parquet reads a row group's column whole: each
image then costs its row group's whole image column (Hugging Face writes 100 rows a group, about 11 MB on
ImageNet). On object storage that is about 100x the epoch's image bytes fetched, every epoch; on a local disk it
is still about 5 ms of reading a column chunk an image from the page cache (``bench/parquet.py``: row groups of
100 images of 108 KB), more than decoding the JPEG. What a user does by hand instead (``aws s3
sync`` to the node's disk, or Hugging Face ``datasets``' Arrow cache, or Mosaic streaming's local shards) is what
this does on its own: the first time a process reads a row group from its shard a second time (it was read, left
the last few kept, and is wanted again: a shuffle; reading in id order, as labeling does, whatever the batch size,
reads each group once and stages nothing), it starts a stager process for the data set, which queues every shard
of it, that one first, and ``STAGE_THREADS`` threads copy them, once per node: a shard on a URL downloaded by
one sequential read, then its image column written as an Arrow IPC file (one record batch a row group, the
images' bytes uncompressed, as the JPEGs are), read later through a memory map: one image costs its own bytes
(0.09 ms against 5.2 there). Until a shard's copy is there, its reads take the row-group path; from then on, and
in every later epoch and run on the node, the copy. The shuffle stays uniform over the whole split: nothing about
the order changes.

The stager is a process of its own (one a data set a node: it holds ``<data set>.stager.lock``), so the copies
in flight outlive the loader workers that asked for them (a DataLoader's workers end with each epoch); it ends
once every shard is staged, or when the process that owns the reads (the training process, a loader worker's
parent) is gone, and logs to ``stager.log`` in the folder.

Where: ``$STILLROOM_SHARD_STAGE`` (a directory; ``off`` turns staging off), by default
``<temp dir>/stillroom-shards``. A process stages only when that disk keeps 10 % free (and 1 GiB) after every
shard of the data set is there (a copy takes about its shard's size: JPEG bytes do not compress) and the copies
in flight have landed (a shard on a URL takes twice its size while it lands: the download, then the copy), and
says so once in the log either way; each copy checks again before it starts. Copies are named by the shard's path
or URL, size and version (ETag, or a file's modification time), so a rewritten shard is staged again.
``$STILLROOM_SHARD_STAGE_MAX`` (a size: ``200G``, ``500M``, bytes) caps the folder's copies: before a copy, the
least recently read copies of other data sets are removed to make room; a data set larger than the cap has only
what fits staged, the rest read in place.

Several processes on a node (loader workers, Ray workers) share the folder: one holds an advisory lock on a
shard while it writes a file of its own and renames it into place, the others keep reading in place meanwhile.
A copy exists only once renamed; a process killed mid-copy leaves ``.part-*`` files that the next one to copy
the shard removes, never a copy taken for whole. A copy that cannot be read is removed and the shard read in
place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from stillroom.pipelines.core import filesystem, is_url, local_path

log = logging.getLogger("stillroom.data")

ENV = "STILLROOM_SHARD_STAGE"
MAX_ENV = "STILLROOM_SHARD_STAGE_MAX"
KEEP_FREE = 0.10  # of the disk, after every shard is staged
KEEP_FREE_MIN = 1 << 30
COPY_BLOCK = 8 << 20  # bytes a read while downloading
STAGE_THREADS = 4  # shards copied at once by a process (S3 gives bandwidth by concurrency)
OPEN_COPIES = 64  # memory-mapped copies a process keeps open
STAGER = "from stillroom.pipelines.data.stage import stager_main; stager_main()"  # the stager process's program


def stage_dir() -> Path | None:
    """The folder staged shards go to, or None when ``$STILLROOM_SHARD_STAGE`` is ``off``."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in ("off", "0", "false", "no", "none"):
        return None
    return Path(value) if value else Path(tempfile.gettempdir()) / "stillroom-shards"


def stage_cap() -> int | None:
    """The most bytes the staged copies may take (``$STILLROOM_SHARD_STAGE_MAX``), or None for no cap."""
    value = os.environ.get(MAX_ENV, "").strip()
    if not value:
        return None
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", value, re.IGNORECASE)
    if found is None:
        raise ValueError(f"{MAX_ENV}={value!r} is not a size: expected bytes or a number with K, M, G or T (200G)")
    return int(float(found[1]) * 1024 ** " KMGT".index(found[2].upper() or " "))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _reads_owner() -> int:
    """The process whose reads this is: a DataLoader worker's parent (the workers end with each epoch), else this."""
    data = sys.modules.get("torch.utils.data")
    if data is not None and data.get_worker_info() is not None:
        return os.getppid()
    return os.getpid()


def image_bytes(column: Any) -> Any:
    """A row group's image column (a ``{bytes, path}`` struct or binary, chunked or not) as one binary array."""
    if hasattr(column, "combine_chunks"):
        column = column.combine_chunks()
    return column.field("bytes") if hasattr(column, "field") else column


class ShardStage:
    """Arrow IPC copies of one data set's shards (paths or URLs, with their listed ``(size, version)``), made in
    the background of the process that reads them; ``read`` takes rows from a copy, or says there is none.

    Pickled into loader workers as its settings only: each process has its own copying threads, re-read record
    and open copies (a forked child starts afresh)."""

    def __init__(self, sources: list[str], stat: list[tuple[int, int]], column: str):
        self.sources, self.column, self.sizes = sources, column, [int(size) for size, _ in stat]
        self.names = [hashlib.sha256(f"{u}\0{size}\0{tag}\0{column}".encode()).hexdigest()[:32] + ".arrow"
                      for u, (size, tag) in zip(sources, stat, strict=True)]
        self._fresh()

    def _fresh(self) -> None:
        self._pid = os.getpid()
        self._dir: Path | None | bool = False  # False: not decided yet in this process
        self._reads: set[tuple[int, int]] = set()
        self._started = False
        self._open: OrderedDict[int, Any] = OrderedDict()  # shard -> its copy's RecordBatchFileReader
        self._stager: subprocess.Popen[bytes] | None = None  # the stager process this one started
        self._landing = 0  # bytes the copies in flight in this process will still take on the disk
        self._room = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"sources": self.sources, "column": self.column, "sizes": self.sizes, "names": self.names}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fresh()

    def read(self, shard: int, group: int, rows: list[int]) -> list[bytes | None] | None:
        """The image bytes of ``rows`` of row group ``group`` of ``shard`` from its copy; None when it has none
        (yet): read it in place, and say so (``read_in_place``)."""
        if self._pid != os.getpid():
            self._fresh()
        reader = self._copy(shard)
        if reader is None:
            return None
        try:
            column = reader.get_batch(group).column(0)
            return [column[r].as_py() for r in rows]
        except Exception as e:  # pyarrow's errors for a file cut short or overwritten: read in place
            self._drop(shard, e)
            return None

    def read_in_place(self, shard: int, group: int) -> None:
        """Row group ``group`` of ``shard`` was read from the shard itself: the first group this process reads a
        second time starts staging every shard, ``shard`` first."""
        if self._pid != os.getpid():
            self._fresh()
        if self._started or self._folder() is None:
            return
        key = (shard, group)
        if key not in self._reads:
            self._reads.add(key)
        else:
            self._start(shard)

    def _copy(self, shard: int) -> Any:
        """The open copy of ``shard`` (opened now if it is on disk), or None."""
        reader = self._open.get(shard)
        if reader is not None:
            self._open.move_to_end(shard)
            return reader
        folder = self._folder()
        if folder is None or not (folder / self.names[shard]).exists():
            return None
        import pyarrow as pa

        try:
            reader = pa.ipc.open_file(pa.memory_map(str(folder / self.names[shard])))
        except FileNotFoundError:  # removed since the check
            return None
        except Exception as e:
            self._drop(shard, e)
            return None
        with contextlib.suppress(OSError):  # read now: the last copy a cap evicts (``_make_room``)
            os.utime(folder / self.names[shard])
        self._open[shard] = reader
        while len(self._open) > OPEN_COPIES:
            self._open.popitem(last=False)
        return reader

    def _drop(self, shard: int, error: Exception) -> None:
        self._open.pop(shard, None)
        folder = self._folder()
        if folder is not None and (folder / self.names[shard]).exists():
            log.warning("removing the unreadable staged copy of %s (%s: %s); reading it in place",
                        self.sources[shard], type(error).__name__, error)
            (folder / self.names[shard]).unlink(missing_ok=True)

    def _start(self, first: int) -> None:
        """Start the data set's stager process (``stager_main``), detached: it outlives this process (a loader
        worker ends with its epoch) and ends with the process that owns the reads."""
        self._started = True
        folder = self._folder()
        if folder is None:
            return
        job = {"sources": self.sources, "sizes": self.sizes, "names": self.names, "column": self.column,
               "folder": str(folder), "first": first, "owner": _reads_owner()}
        try:
            # its log to the folder: a detached process holding this one's stdout or stderr would keep a reader of
            # them (a caller's subprocess.run) waiting for it
            with open(folder / "stager.log", "ab") as log_file:
                self._stager = subprocess.Popen([sys.executable, "-c", STAGER],
                                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log_file,
                                                start_new_session=True)
            stdin = self._stager.stdin
            if stdin is not None:
                stdin.write(json.dumps(job).encode())
                stdin.close()
        except OSError as e:
            log.warning("not staging Parquet shards: cannot start the stager process (%s)", e)

    def stage_all(self, first: int, owner: int) -> None:
        """Copy every shard, ``first`` first, with ``STAGE_THREADS`` threads; stop taking shards once ``owner``
        is gone (what the stager process runs)."""
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        for s in [first, *(s for s in range(len(self.sources)) if s != first)]:
            todo.put(s)
        threads = [threading.Thread(target=self._stage_all, args=(todo, owner), name="stillroom-shard-stage")
                   for _ in range(min(STAGE_THREADS, len(self.sources)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _folder(self) -> Path | None:
        if self._dir is False:
            self._dir = self._decide()
        return self._dir if isinstance(self._dir, Path) else None

    def _decide(self) -> Path | None:
        folder = stage_dir()
        if folder is None or not self.sources:
            return None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            usage = shutil.disk_usage(folder)
        except OSError as e:
            log.warning("not staging Parquet shards in %s: %s", folder, e)
            return None
        todo = [(size, is_url(u)) for u, size, name in zip(self.sources, self.sizes, self.names, strict=True)
                if not (folder / name).exists()]
        missing = sum(size for size, _ in todo)
        cap = stage_cap()
        if cap is not None:
            missing = min(missing, cap)
        # while a shard on a URL lands it takes twice its size (the download, then the copy): the largest ones
        # that STAGE_THREADS copy at once, on top of the copies
        landing = missing + sum(sorted((size for size, url in todo if url), reverse=True)[:STAGE_THREADS])
        keep = max(KEEP_FREE * usage.total, KEEP_FREE_MIN)
        if usage.free - landing < keep:
            log.warning("not staging %d Parquet shards (%.1f GB, %.1f GB while they land) in %s: it has %.1f GB free "
                        "and keeps %.1f GB; rows are read by row group in place (set %s to a larger disk)",
                        len(self.sources), missing / 1e9, landing / 1e9, folder, usage.free / 1e9, keep / 1e9, ENV)
            return None
        log.info("staging Parquet shards read at random in %s (%.1f GB still to copy; %s=off turns it off)",
                 folder, missing / 1e9, ENV)
        return folder

    def _stage_all(self, todo: queue.SimpleQueue[int], owner: int) -> None:
        while _alive(owner):
            try:
                shard = todo.get_nowait()
            except queue.Empty:
                return
            try:
                self.stage(shard)
            except Exception as e:  # the in-place reads go on; a failed copy is retried by no one in this process
                log.warning("could not stage %s: %s", self.sources[shard], e)

    def stage(self, shard: int) -> None:
        """Copy ``shard`` into the folder unless it is there, or another process on the node is copying it."""
        folder = self._folder()
        if folder is None:
            return
        name = self.names[shard]
        with open(folder / (name + ".lock"), "a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another process on this node is copying it; read() finds the copy once it is there
            if (folder / name).exists():
                return
            for stale in folder.glob(name + ".part-*"):
                stale.unlink(missing_ok=True)
            landing = self.sizes[shard] * (2 if is_url(self.sources[shard]) else 1)
            if not self._make_room(folder, shard, landing):
                return
            part = folder / f"{name}.part-{os.getpid()}"
            fetched = folder / f"{name}.part-{os.getpid()}.parquet"
            try:
                source = self.sources[shard]
                if is_url(source):
                    self._download(shard, fetched)
                    source = str(fetched)
                to_arrow(str(local_path(source)), self.column, part)
                os.replace(part, folder / name)
            finally:
                part.unlink(missing_ok=True)
                fetched.unlink(missing_ok=True)
                with self._room:
                    self._landing -= landing
        log.debug("staged %s as %s", self.sources[shard], folder / name)

    def _make_room(self, folder: Path, shard: int, landing: int) -> bool:
        """Whether ``shard``'s copy (``landing`` bytes while it lands) may be made now, and room made for it: under
        the cap (``$STILLROOM_SHARD_STAGE_MAX``) after removing the least recently read copies of other data sets,
        with the disk's share kept free beside the copies in flight in this process. True reserves ``landing``."""
        cap = stage_cap()
        with self._room:
            if cap is not None:
                copies = sorted(((p.stat().st_mtime, p.stat().st_size, p) for p in folder.glob("*.arrow")
                                 if p.is_file()), key=lambda c: c[0])
                used = sum(size for _, size, _ in copies)
                ours = set(self.names)
                for _, size, path in copies:
                    if used + self.sizes[shard] <= cap:
                        break
                    if path.name not in ours:
                        path.unlink(missing_ok=True)
                        used -= size
                        log.info("removed the staged copy %s (least recently read) to keep %s under %s bytes",
                                 path.name, folder, cap)
                if used + self.sizes[shard] > cap:
                    log.info("not staging %s: the staged copies would pass %s=%d", self.sources[shard], MAX_ENV, cap)
                    return False
            usage = shutil.disk_usage(folder)
            keep = max(KEEP_FREE * usage.total, KEEP_FREE_MIN)
            if usage.free - self._landing - landing < keep:
                log.warning("not staging %s now: %s has %.1f GB free and keeps %.1f GB", self.sources[shard],
                            folder, usage.free / 1e9, keep / 1e9)
                return False
            self._landing += landing
            return True

    def _download(self, shard: int, target: Path) -> None:
        fs, path = filesystem(self.sources[shard])
        with fs.open(path, "rb", block_size=COPY_BLOCK, cache_type="none") as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, COPY_BLOCK)
        got, listed = target.stat().st_size, self.sizes[shard]
        if listed > 0 and got != listed:
            raise OSError(f"{got} bytes fetched, {listed} listed (the shard changed since it was listed?)")


def to_arrow(parquet: str, column: str, out: Path) -> None:
    """``column`` of a Parquet file as an Arrow IPC file of its images' bytes: one record batch a row group (so a
    row group's index is its batch's), ``large_binary`` (no 2 GB limit a batch), streamed a row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = pq.ParquetFile(parquet)
    schema = pa.schema([("bytes", pa.large_binary())])
    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for group in range(source.num_row_groups):
            images = image_bytes(source.read_row_group(group, columns=[column]).column(0))
            writer.write_batch(pa.record_batch([images.cast(pa.large_binary())], schema=schema))


def stager_main() -> None:
    """The stager process: its job as JSON on stdin (``ShardStage._start``); one a data set a node."""
    logging.basicConfig(level=logging.WARNING, format="stillroom: %(message)s")
    job = json.loads(sys.stdin.read())
    folder = Path(job["folder"])
    key = hashlib.sha256("\0".join(job["names"]).encode()).hexdigest()[:32]
    with open(folder / f"{key}.stager.lock", "a+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # this data set's stager on this node is running already
        stage = ShardStage.__new__(ShardStage)
        stage.__setstate__({k: job[k] for k in ("sources", "sizes", "names", "column")})
        stage._dir = folder
        stage.stage_all(int(job["first"]), int(job["owner"]))

