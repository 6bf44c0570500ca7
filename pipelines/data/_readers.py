"""Readers for data sets on disk: an index of samples, built once from the files' headers and bytes.

Two kinds, behind one small interface (``FileDataset``): ``ImageFolder`` (one file per sample, the
ImageNet layout) and ``ParquetShards`` (Hugging Face ``datasets`` shards: an ``image`` column of
``{bytes, path}`` and an integer ``label``). Opening one reads, per sample, its label, where its bytes
are, its height and width (from the image header: nothing is decoded) and a hash of its encoded bytes.
That index is kept in memory as a few flat numpy arrays (about 30-70 bytes a sample) and cached on disk,
so a second open only lists and stats the files (or the shards) and compares them with the cache.

Where the cache lives, for data on disk: ``$STILLROOM_CACHE/index/`` when that variable is set; otherwise
``<data root>/.stillroom-index/`` when the data root is writable (the cache then moves with the
folder), else ``~/.cache/stillroom/index/``. An entry is reused when its path, size and mtime match.

Data on a URL (``s3://bucket/prefix``, ``gs://...``, any installed fsspec protocol) is listed once (one
recursive listing: every key with its size and ETag) and its index is cached where every node of a cluster
finds it: next to the data (``<url>/.stillroom-index/``) when that prefix takes a write, else under the shared
index cache (``index_cache=``, ``$STILLROOM_INDEX_CACHE``, or the store root the job was given), else on this
node only (``url_cache_places``). It is one object, written whole by one PUT; an entry is reused when its key,
size and ETag match the listing. The fingerprint is the same as for the same bytes on disk (below).

This module does not import torch: a worker process that turns sample ids into encoded bytes needs only
numpy, PIL and pyarrow.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import multiprocessing
import os
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from stillroom.pipelines.core import (
    DataError,
    Location,
    UsageError,
    filesystem,
    is_url,
    local_path,
    version_field,
    write_atomically,
)
from stillroom.pipelines.data.stage import ShardStage, image_bytes

log = logging.getLogger("stillroom.data")

INDEX_VERSION = 3  # bump when the cache file changes: older caches are rebuilt
HASH_BYTES = 16  # blake2b digest of a sample's encoded bytes
FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # what PIL identifies and we decode
SPLITS = ("train", "val", "test")
BAD_POLICIES = ("stop", "skip")
PARALLEL_FROM = 2048  # fewer samples than this are indexed in this process
ROW_GROUP_CACHE = 4  # row groups of encoded bytes a Parquet reader keeps (per process)
DATASET_HELP = (  # the --dataset help of every command
    "fashion-mnist[:n=N], synthetic[:n=,classes=,size=,channels=], imagefolder:DIR (DIR/train/<class>/*, "
    "DIR/val/<class>/*) or parquet:DIR|GLOB (Hugging Face shards, DIR/train/*.parquet); add ,bad=skip to leave "
    "unreadable images out (listed in the index) instead of stopping with an error naming the file, and ,val=F "
    "(e.g. ,val=0.1) to hold out a fraction F of each class as the val split of data that has none"
)


class MissingSplit(UsageError):
    """The data set has no such split (a folder of class folders, a glob of shards): nothing to evaluate on."""


# ---------------------------------------------------------------- one sample's bytes -> header and hash


def probe(data: bytes, where: str) -> tuple[int, int, bytes]:
    """``(height, width, hash)`` of one encoded image, from its header and bytes alone (no decoding).

    Raises ``DataError`` naming ``where`` for an empty file, a file PIL does not recognise as an image
    of ``FORMATS``, or a JPEG/PNG that is cut short (no end-of-image marker / IEND chunk at its end).
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise DataError(f"{where}: empty file")
    digest = hashlib.blake2b(data, digest_size=HASH_BYTES).digest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (w, h) = img.format, img.size
    except UnidentifiedImageError:
        raise DataError(f"{where}: not an image (no image format recognised)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{where}: not an image ({str(e).splitlines()[0][:120]})") from None
    if fmt not in FORMATS:
        raise DataError(f"{where}: {fmt} images are not read: expected one of {', '.join(FORMATS)}")
    tail = data[-4096:]
    if fmt in ("JPEG", "MPO") and b"\xff\xd9" not in tail:
        raise DataError(f"{where}: truncated JPEG (no end-of-image marker)")
    if fmt == "PNG" and b"IEND" not in data[-64:]:
        raise DataError(f"{where}: truncated PNG (no IEND chunk)")
    if h < 1 or w < 1:
        raise DataError(f"{where}: image of size {w}x{h}")
    return h, w, digest


def _probe_many(items: Sequence[tuple[bytes | str, str]]) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Probe ``(data or file path, where)`` pairs: ``(hw (n, 2) int32, hashes (n, 16) uint8, errors)``, the
    errors by row (bad rows only)."""
    hw = np.zeros((len(items), 2), dtype=np.int32)
    hashes = np.zeros((len(items), HASH_BYTES), dtype=np.uint8)
    errors: dict[int, str] = {}
    for i, (src, where) in enumerate(items):
        try:
            data = src if isinstance(src, bytes) else Path(src).read_bytes()
            h, w, digest = probe(data, where)
        except DataError as e:
            errors[i] = str(e)
            continue
        except OSError as e:
            errors[i] = f"{where}: cannot read ({e.strerror or e})"
            continue
        hw[i] = (h, w)
        hashes[i] = np.frombuffer(digest, dtype=np.uint8)
    return hw, hashes, errors


def _probe_files(paths: list[str]) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    return _probe_many([(p, p) for p in paths])


def _probe_row_group(path: str, row_group: int, column: str) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    data = read_row_group_bytes(path, row_group, column)
    return _probe_many([(b if b is not None else b"", f"{path} row group {row_group} row {i}")
                        for i, b in enumerate(data)])


def _parallel(fn: Callable[..., Any], tasks: list[tuple], workers: int | None) -> list[Any]:
    """``[fn(*t) for t in tasks]``, on a pool of forked processes when there is enough work.

    Fork (not spawn): the children run only this module's functions, and need not import the caller's
    ``__main__`` again."""
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or len(tasks) <= 1:
        return [fn(*t) for t in tasks]
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx) as pool:
        return list(pool.map(fn, *zip(*tasks, strict=True)))


# ---------------------------------------------------------------- the on-disk index cache


def cache_dir(root: Path) -> Path:
    """Where the index of data under ``root`` is cached (see the module docstring)."""
    env = os.environ.get("STILLROOM_CACHE")
    if env:
        return Path(env) / "index"
    if os.access(root, os.W_OK):
        return root / ".stillroom-index"
    return Path.home() / ".cache" / "stillroom" / "index"


def cache_file(root: Path, name: str) -> Path:
    """The cache file for ``name`` (kind and split) under ``root``: inside the root, named by ``name`` alone
    (so a moved folder keeps its cache); elsewhere, named by the root's absolute path too."""
    where = cache_dir(root)
    if where.parent == root:
        return where / f"{name}.npz"
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return where / f"{name}-{key}.npz"


class CachedIndex:
    """The arrays of a cache file (a local path, or the bytes of an object read from a URL), each read when first
    asked for (a warm open never reads the paths)."""

    def __init__(self, path: Path | bytes, where: str | None = None):
        self.path = path
        self.where = where or str(path)
        self._arrays: dict[str, np.ndarray] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._arrays:
            source = io.BytesIO(self.path) if isinstance(self.path, bytes) else self.path
            with np.load(source, allow_pickle=False) as z:
                self._arrays[key] = z[key]
        return self._arrays[key]


def load_cache(path: Path | bytes, where: str | None = None) -> CachedIndex | None:
    """The cache at ``path`` (or in these bytes) if it exists and is of this version; a damaged one counts as
    missing (rebuilt): an npz is a zip, whose CRC32 of each member catches a damaged object too."""
    if isinstance(path, Path) and not path.is_file():
        return None
    cached = CachedIndex(path, where)
    try:
        if int(cached["version"]) != INDEX_VERSION:
            return None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    return cached


# where the index of data on a URL is cached when the data's own prefix is not writable: ``index_cache=`` of
# ``load_dataset``, else $STILLROOM_INDEX_CACHE, else this process's default (``use_index_cache``: the store root)
_DEFAULT_INDEX_CACHE: list[str] = []
INDEX_CACHE_ENV = "STILLROOM_INDEX_CACHE"


def use_index_cache(url: str | os.PathLike | None) -> None:
    """Make ``url`` (a store root, say) this process's shared index cache for data on URLs when neither
    ``index_cache=`` nor $STILLROOM_INDEX_CACHE names one; None forgets it."""
    _DEFAULT_INDEX_CACHE[:] = [os.fspath(url)] if url else []


def url_cache_places(root_url: str, name: str, index_cache: str | os.PathLike | None = None) -> list[str]:
    """Where the index ``name`` of data under ``root_url`` is looked for and written, in order: next to the data
    (``<root>/.stillroom-index/<name>.npz``: it moves with the data, and every node finds it); under the shared
    index cache (``<cache>/.stillroom-index/<name>-<hash of root>.npz``; a URL or a path); last this node's own
    (``$STILLROOM_CACHE/index/`` or ``~/.cache/stillroom/index/``), where no other node will find it."""
    key = hashlib.sha256(root_url.encode()).hexdigest()[:16]
    places = [f"{root_url}/.stillroom-index/{name}.npz"]
    shared = (os.fspath(index_cache) if index_cache else None) or os.environ.get(INDEX_CACHE_ENV) or next(
        iter(_DEFAULT_INDEX_CACHE), None)
    if shared:
        places.append(f"{shared.rstrip('/')}/.stillroom-index/{name}-{key}.npz")
    env = os.environ.get("STILLROOM_CACHE")
    local = Path(env) / "index" if env else Path.home() / ".cache" / "stillroom" / "index"
    places.append(str(local / f"{name}-{key}.npz"))
    return places


def load_url_cache(places: list[str]) -> CachedIndex | None:
    """The first of ``places`` that holds a cache of this version (one GET each until then)."""
    for place in places:
        try:
            data = Location(place).read_bytes()
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            continue
        except OSError as e:  # a place that cannot be read now (a bucket that does not exist, ...) is skipped
            log.warning("index cache %s not read: %s", place, str(e).splitlines()[0][:200] if str(e) else type(e))
            continue
        cached = load_cache(data, place)
        if cached is not None:
            return cached
    return None


def save_url_cache(places: list[str], arrays: dict[str, np.ndarray]) -> str | None:
    """Write the cache to the first of ``places`` that takes it, whole (one PUT of the complete object, or an
    atomic rename on disk: a reader never sees half of it); where it went, or None when none did."""
    buf = io.BytesIO()
    np.savez(buf, **{"version": np.int64(INDEX_VERSION), **arrays})  # type: ignore[arg-type]
    data = buf.getvalue()
    for place in places:
        try:
            loc = Location(place)
            if loc.local is not None:
                loc.local.parent.mkdir(parents=True, exist_ok=True)
            loc.write_bytes(data)
            return place
        except (OSError, NotImplementedError) as e:  # read-only (403 / EACCES), no such bucket: the next place
            log.info("index cache not written to %s (%s): trying the next place", place, type(e).__name__)
    return None


def listing_digest(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """sha256 of a packed list of paths: a warm open compares this, not the paths."""
    h = hashlib.sha256(np.ascontiguousarray(blob).tobytes())
    h.update(np.ascontiguousarray(offsets).tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint8).copy()


def save_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the cache atomically; a cache that cannot be written is skipped (the next open re-scans)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda tmp: np.savez(tmp, **{"version": np.int64(INDEX_VERSION), **arrays}))  # type: ignore[arg-type]
    except OSError:
        pass


# ---------------------------------------------------------------- strings packed into one buffer


def pack_strings(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (utf-8 bytes as uint8, offsets (n + 1,) int64): one buffer instead of n Python objects."""
    encoded = [s.encode() for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def unpack_string(blob: np.ndarray, offsets: np.ndarray, i: int) -> str:
    return blob[offsets[i] : offsets[i + 1]].tobytes().decode()


def take_strings(blob: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The packed strings of ``rows`` (in that order), packed again, without making Python strings."""
    lengths = offsets[rows + 1] - offsets[rows]
    new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    starts = np.repeat(offsets[rows] - new_offsets[:-1], lengths)
    return blob[starts + np.arange(int(new_offsets[-1]))], new_offsets


def dump_errors(errors: dict[int, str]) -> np.ndarray:
    return np.array(json.dumps({str(k): v for k, v in errors.items()}))


def load_errors(stored: np.ndarray) -> dict[int, str]:
    return {int(k): v for k, v in json.loads(str(stored)).items()}


# ---------------------------------------------------------------- a held-out val split (``,val=F``)

_M64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic): every input bit moves every output bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def string_hashes(blob: np.ndarray, offsets: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """A 64-bit hash of each packed string (polynomial in its bytes mod 2**64, then ``_mix64``), vectorised.

    Our own rather than ``hashlib``: a blake2b per path, in a Python loop, took 3.1-5.5 s for ImageNet's 1.28 M
    paths on a loaded 2-core machine (as much as a warm open), this 0.9-1.9 s side by side; ``chunk`` strings at a
    time, so transient memory is bounded whatever the data set's size. The same strings give the same hashes in
    every process (Python's randomised ``hash`` would not)."""
    out = np.empty(len(offsets) - 1, dtype=np.uint64)
    lengths = np.diff(offsets)
    longest = int(lengths.max()) if len(lengths) else 0
    powers = np.empty(longest + 1, dtype=np.uint64)  # P**e mod 2**64, P odd
    p, value = 0x100000001B3, 1
    for e in range(longest + 1):
        powers[e] = value
        value = (value * p) & _M64
    with np.errstate(over="ignore"):
        for a in range(0, len(out), chunk):
            b = min(a + chunk, len(out))
            lo, hi = int(offsets[a]), int(offsets[b])
            owner = np.repeat(np.arange(b - a), lengths[a:b])
            from_end = (offsets[a + 1 : b + 1][owner] - 1 - np.arange(lo, hi)).astype(np.int64)
            terms = (blob[lo:hi].astype(np.uint64) + np.uint64(1)) * powers[from_end]
            sums = np.add.reduceat(terms, (offsets[a:b] - lo).astype(np.int64)) if hi > lo else np.zeros(b - a,
                                                                                                        np.uint64)
            sums[lengths[a:b] == 0] = 0
            out[a:b] = _mix64(sums ^ (lengths[a:b].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)))
    return out


def holdout_mask(keys: np.ndarray, labels: np.ndarray, fraction: float) -> np.ndarray:
    """Which samples form the held-out ``val`` split: those whose key hash (uint64, from each sample's path)
    falls below ``fraction``, so each sample's side depends on its own path alone (adding files moves no other
    sample) and every process agrees. About ``fraction`` of each class; a class of two or more samples keeps at
    least one on each side (the lowest hash held out, the highest kept)."""
    u = (keys >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    val = u < fraction
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    counts = np.bincount(labels, minlength=num_classes)
    held = np.bincount(labels[val], minlength=num_classes)
    for c in np.flatnonzero((counts >= 2) & ((held == 0) | (held == counts))):
        rows = np.flatnonzero(labels == c)
        if held[c] == 0:
            val[rows[np.argmin(u[rows])]] = True
        else:
            val[rows[np.argmax(u[rows])]] = False
    return val


def holdout_part(split: str, has_test: bool) -> str:
    """With ``,val=F``: which side of the train split a split reads (``test`` reads ``test/`` when there is one)."""
    return "test" if split == "test" and has_test else ("train" if split == "train" else "val")


# ---------------------------------------------------------------- the index shared by both kinds


class FileDataset:
    """A data set on disk, as an index: ``labels``, ``sizes`` (height, width) and where each sample's bytes are.

    Subclasses fill the index and implement ``encoded(ids)``. Picklable (a worker process can read from it).
    """

    kind = ""
    spec: str
    split: str
    num_classes: int
    class_names: tuple[str, ...]
    labels: np.ndarray  # (N,) int64
    sizes: np.ndarray  # (N, 2) int32: each image's height and width
    skipped: list[str]  # bad samples left out (bad=skip), one line each
    channels = 3
    in_memory = False
    cache_path: Path | str | None = None  # where the index is cached (a URL for data on one)
    index_reused: bool = False  # True when this open took every entry from the cache
    _fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        raise UsageError(f"{self.spec} holds images of many sizes: it has no single image shape; a view recipe "
                         "with an output size (e.g. imagenet-rrc:size=224) gives its views one")

    @property
    def fingerprint(self) -> str:
        """sha256 of the class count, the labels (int64, in id order) and the blake2b-128 hash of each
        sample's *encoded* bytes (file or Parquet cell), in id order. Not covered: paths, file names, shard
        layout, mtimes: the same bytes and labels from anywhere are the same data set."""
        return self._fingerprint

    holdout: float | None = None  # ``,val=F``: the fraction of each class held out as ``val``
    holdout_side: str | None = None  # which side of it this split is ("train" or "val"), None without one

    def _set_fingerprint(self, hashes: np.ndarray) -> None:
        h = hashlib.sha256(b"stillroom-encoded/1")
        if self.holdout_side is not None:  # the split itself, beside its samples' bytes
            h.update(f"holdout:{self.holdout!r}:{self.holdout_side}".encode())
        h.update(np.int64(self.num_classes).tobytes())
        h.update(self.labels.astype(np.int64).tobytes())
        h.update(np.ascontiguousarray(hashes).tobytes())
        self._fingerprint = h.hexdigest()[:32]

    def encoded(self, ids: np.ndarray) -> list[tuple[bytes, str]]:
        """The encoded bytes of ``ids`` and where each came from (for errors), in the order of ``ids``."""
        raise NotImplementedError

    def read(self, ids: np.ndarray | list[int]) -> Any:
        raise UsageError(f"{self.spec} holds images of many sizes: build views (pipelines.views), not read(ids)")

    def _check_ids(self, ids: np.ndarray | list[int]) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            bad = int(ids[(ids < 0) | (ids >= len(self))][0])
            raise UsageError(f"sample id {bad} is out of range for {self.spec}: expected 0 <= id < {len(self)}")
        return ids

    def _hold_out(self, keys: np.ndarray, labels: np.ndarray, holdout: float | None, side: str) -> np.ndarray:
        """The rows of this split's side of the held-out split (all rows without ``,val=F``, or for ``test/``)."""
        if holdout is None or side == "test":
            return np.arange(len(labels))
        self.holdout, self.holdout_side = holdout, side
        val = holdout_mask(keys, labels, holdout)
        return np.flatnonzero(val if side == "val" else ~val)

    def _keep(self, errors: dict[int, str], n: int, bad: str) -> np.ndarray:
        """Apply the bad-sample policy to ``n`` rows: the rows to keep; raise on the first bad one when ``bad ==
        'stop'``; with ``'skip'`` the bad ones are left out and listed in ``skipped``."""
        bad_rows = [errors[i] for i in sorted(errors)]
        if bad_rows and bad == "stop":
            more = f" (and {len(bad_rows) - 1} more)" if len(bad_rows) > 1 else ""
            raise DataError(f"{bad_rows[0]}{more}; add ,bad=skip to the dataset spec to leave bad images out")
        self.skipped = bad_rows
        keep = np.ones(n, dtype=bool)
        keep[list(errors)] = False
        return np.flatnonzero(keep)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")


# ---------------------------------------------------------------- a data root: a local folder, or a URL listed once


def _version_tag(info: dict[str, Any]) -> int:
    """A 64-bit tag of an object's version from its listing entry (``version_field``: its ETag, etag/generation,
    else its modification time); 0 when the listing has none (then only the size tells a change)."""
    version = version_field(info)
    if version is None:
        return 0
    digest = hashlib.blake2b(str(version).encode(), digest_size=8).digest()
    return int(np.frombuffer(digest, dtype=np.int64)[0])


class RemoteRoot:
    """A data set's URL (``s3://bucket/prefix``, ``gs://...``, any installed fsspec protocol) and its filesystem.

    Picklable, and never shares a client between processes: the filesystem is opened again in a process that
    did not open it (a forked loader worker, a Ray actor), as fsspec's async clients are not fork-safe."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self._fs, self.path = filesystem(self.url)
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None, "_pid": None}

    @property
    def fs(self) -> Any:
        if self._pid != os.getpid():
            self._fs, _ = filesystem(self.url)
            self._pid = os.getpid()
        return self._fs

    def key(self, rel: str) -> str:
        """The filesystem's path of ``rel`` (relative to the root)."""
        return f"{self.path}/{rel}" if rel else self.path

    def show(self, rel: str) -> str:
        return f"{self.url}/{rel}" if rel else self.url

    def listing(self) -> dict[str, tuple[int, int]]:
        """Every object under the root, by path relative to it: ``(size, version tag)``, from one recursive
        listing (on S3, ``ListObjectsV2`` pages of 1,000 keys; no request per file)."""
        try:
            found = self.fs.find(self.path, detail=True)
        except FileNotFoundError:
            found = {}
        prefix = self.path.rstrip("/") + "/"
        return {k[len(prefix):]: (int(v.get("size") or 0), _version_tag(v)) for k, v in found.items()
                if k.startswith(prefix) and v.get("type", "file") != "directory"}

    def cat(self, rels: list[str]) -> list[bytes | BaseException]:
        """The bytes of each object (one GET each, issued together by fsspec's async filesystems), or the error."""
        keys = [self.key(r) for r in rels]
        # cat_ranges from byte 0: one GET ("Range: bytes=0-") each; cat would first HEAD every path (s3fs asks
        # for its size, to split a large object into concurrent parts)
        return list(self.fs.cat_ranges(keys, 0, None, on_error="return")) if keys else []


class _LocalTree:
    """Folders under a local root (what split and class discovery ask of it)."""

    def __init__(self, root: Path):
        self.root = root

    def is_dir(self, rel: str) -> bool:
        return (self.root / rel).is_dir()

    def subdirs(self, rel: str) -> list[str]:
        return sorted(p.name for p in (self.root / rel).iterdir() if p.is_dir() and not p.name.startswith("."))

    def show(self, rel: str) -> str:
        return str(self.root / rel) if rel else str(self.root)


class _ListedTree:
    """Folders and files under a URL, from one listing (object storage has no folders: a prefix with objects)."""

    def __init__(self, remote: RemoteRoot, listing: dict[str, tuple[int, int]]):
        self.remote, self.listing = remote, listing
        self._dirs: dict[str, set[str]] = {"": set()}
        self._files: dict[str, list[str]] = {}
        for rel in listing:
            parts = rel.split("/")
            for depth in range(len(parts) - 1):
                parent, child = "/".join(parts[:depth]), parts[depth]
                self._dirs.setdefault(parent, set()).add(child)
                self._dirs.setdefault("/".join(parts[: depth + 1]), set())
            self._files.setdefault("/".join(parts[:-1]), []).append(parts[-1])

    def is_dir(self, rel: str) -> bool:
        return rel in self._dirs and (rel != "" or bool(self.listing))

    def subdirs(self, rel: str) -> list[str]:
        return sorted(d for d in self._dirs.get(rel, ()) if not d.startswith("."))

    def files(self, rel: str) -> list[str]:
        """The non-hidden objects directly under ``rel``, sorted by name."""
        return sorted(f for f in self._files.get(rel, ()) if not f.startswith("."))

    def show(self, rel: str) -> str:
        return self.remote.show(rel)


Tree = _LocalTree | _ListedTree


def _open_root(where: str, split: str, holdout: float | None, what: str) -> tuple[Tree, str, str, str | None]:
    """The tree of a data root (a URL: from one listing of the whole prefix: splits, classes, files, sizes, ETags),
    the split whose files ``split`` reads with its side of ``,val=F``, and that split's folder (None: the root)."""
    tree: Tree
    if is_url(where):
        remote = RemoteRoot(where)
        tree = _ListedTree(remote, remote.listing())
    else:
        tree = _LocalTree(local_path(where))
    if not tree.is_dir(""):
        raise UsageError(f"{what} {where} does not exist")
    files_split, side = _holdout_split(tree, split, holdout, what)
    return tree, files_split, side, _split_dir(tree, files_split, what)


def _split_dir(tree: Tree, split: str, what: str) -> str | None:
    """The folder of ``split`` under the root (``test`` falls back to ``val``); None when the root has no split
    folders at all."""
    present = [s for s in SPLITS if tree.is_dir(s)]
    if not present:
        if split != "train":
            raise MissingSplit(f"{what} {tree.show('')} has no split folders (train/, val/, test/): it is one train "
                               f"split, so it has no {split} split")
        return None
    if tree.is_dir(split):
        return split
    if split == "test" and tree.is_dir("val"):
        return "val"
    raise MissingSplit(f"{what} {tree.show('')} has no {split}/ folder: it has {', '.join(p + '/' for p in present)}")


def _holdout_split(tree: Tree, split: str, holdout: float | None, what: str) -> tuple[str, str]:
    """The split whose files a split reads, and its side (``holdout_part``); refuses ``,val=F`` beside a
    ``val/`` folder (the data set has a val split already)."""
    if holdout is None:
        return split, "test"
    if tree.is_dir("val"):
        raise UsageError(f"{what} {tree.show('')} has a val/ folder: val=F holds out part of the train split of "
                         "data with no val split; drop ,val= to use val/")
    side = holdout_part(split, tree.is_dir("test"))
    return ("test" if side == "test" else "train"), side


# ---------------------------------------------------------------- imagefolder


class ImageFolder(FileDataset):
    """``root/<split>/<class>/<image>`` (ImageNet layout) or ``root/<class>/<image>`` (a train split only).

    Classes are the sorted folder names of the train split (other splits must have the same folders);
    samples are sorted by class, then file name, as torchvision's ``ImageFolder`` orders them. Every
    non-hidden file in a class folder is a sample; one that is not a readable JPEG/PNG/... stops the open
    (``bad='stop'``) or is left out and listed in ``skipped`` (``bad='skip'``). ``test`` reads ``val/``
    when there is no ``test/``.
    """

    kind = "imagefolder"

    def __init__(self, root: str | os.PathLike, split: str = "train", bad: str = "stop", workers: int | None = None,
                 spec: str | None = None, holdout: float | None = None, index_cache: str | os.PathLike | None = None):
        check_split(split)
        text = os.fspath(root)
        tree, files_split, side, split_dir = _open_root(text, split, holdout, "image folder")
        self.remote = tree.remote if isinstance(tree, _ListedTree) else None
        classes = _class_folders(tree, "train" if split_dir else "")
        if split_dir is not None and split_dir != "train":
            here = _class_folders(tree, split_dir)
            if here != classes:
                missing = sorted(set(classes) - set(here)) or sorted(set(here) - set(classes))
                side = "lacks" if set(classes) - set(here) else "has extra"
                raise UsageError(f"{tree.show(split_dir)} {side} class folder {missing[0]!r} (train/ has "
                                 f"{len(classes)} classes, {split_dir}/ {len(here)})")
        self.spec = spec or f"imagefolder:{root}"
        self.split = split
        self.class_names, self.num_classes = tuple(classes), len(classes)
        self._base_rel = split_dir or ""
        self.root: Path | str  # a Path on disk, the URL otherwise (and the same for ``base``, the split's folder)
        self.base: Path | str
        name = f"imagefolder-{split_dir or 'train'}"
        places: list[str] = []
        if isinstance(tree, _ListedTree):
            self.root, self.base = tree.show(""), tree.show(self._base_rel)
            blob, offsets, labels, stat = _scan_listed(tree, self._base_rel, classes)
            places = url_cache_places(tree.show(""), name, index_cache)
            cached = load_url_cache(_unlisted_skipped(places, tree, name))
        else:
            self.root, self.base = tree.root, tree.root / self._base_rel
            blob, offsets, labels, stat = _scan(tree.root / self._base_rel, classes)
            self.cache_path = cache_file(tree.root, name)
            cached = load_cache(self.cache_path)
        n = len(labels)
        hw, hashes, errors, reused = _reuse(cached, blob, offsets, stat)
        todo = np.flatnonzero(~reused)
        if len(todo):
            chunks = [todo[i : i + 512] for i in range(0, len(todo), 512)]
            rels = [[unpack_string(blob, offsets, int(i)) for i in chunk] for chunk in chunks]
            if self.remote is not None:
                base_rel = self._base_rel
                tasks: list[tuple] = [(self.remote, [f"{base_rel}/{r}" if base_rel else r for r in chunk])
                                      for chunk in rels]
                results = _parallel(_probe_objects, tasks, workers if len(todo) >= PARALLEL_FROM else 1)
            else:
                tasks = [([str(Path(self.base) / r) for r in chunk],) for chunk in rels]
                results = _parallel(_probe_files, tasks, workers if len(todo) >= PARALLEL_FROM else 1)
            for chunk, (c_hw, c_hash, c_err) in zip(chunks, results, strict=True):
                hw[chunk], hashes[chunk] = c_hw, c_hash
                errors.update({int(chunk[j]): e for j, e in c_err.items()})
            arrays = {"paths": blob, "offsets": offsets, "listing": listing_digest(blob, offsets),
                      "stat": stat, "hw": hw, "hash": hashes, "errors": dump_errors(errors)}
            if places:
                self.cache_path = save_url_cache(places, arrays)
            else:
                save_cache(cast(Path, self.cache_path), arrays)
        elif cached is not None and places:
            self.cache_path = cached.where
        self.index_reused = not len(todo)
        kept = self._keep(errors, n, bad)
        empty = np.flatnonzero(np.bincount(labels[kept], minlength=self.num_classes) == 0)
        if len(empty):
            folder = f"{self._base_rel}/{classes[int(empty[0])]}".lstrip("/")
            raise UsageError(f"class folder {tree.show(folder)} has no readable images")
        if holdout is not None and side != "test":  # keyed on each file's path within the split's folder
            kept = kept[self._hold_out(string_hashes(*take_strings(blob, offsets, kept)), labels[kept], holdout, side)]
        self.labels = labels[kept]
        self.sizes = np.ascontiguousarray(hw[kept])
        self._paths, self._offsets = (blob, offsets) if len(kept) == n else take_strings(blob, offsets, kept)
        self._set_fingerprint(hashes[kept])

    def path(self, i: int) -> Path:
        """The file of sample ``i`` (a local folder; ``location(i)`` on a URL too)."""
        if self.remote is not None:
            raise UsageError(f"{self.spec} is on {self.remote.url}: its samples have URLs (location(i)), not paths")
        return cast(Path, self.base) / unpack_string(self._paths, self._offsets, i)

    def location(self, i: int) -> str:
        """Where sample ``i``'s bytes are: its path, or its URL."""
        return f"{self.base}/{unpack_string(self._paths, self._offsets, i)}"

    def encoded(self, ids: np.ndarray) -> list[tuple[bytes, str]]:
        ids = self._check_ids(ids)
        if self.remote is not None:  # one GET per image, the batch's issued together
            rels = [unpack_string(self._paths, self._offsets, int(i)) for i in ids]
            keys = [f"{self._base_rel}/{r}" if self._base_rel else r for r in rels]
            out = []
            for rel, got in zip(keys, self.remote.cat(keys), strict=True):
                if isinstance(got, BaseException):
                    raise DataError(f"{self.remote.show(rel)}: cannot read ({str(got)[:200] or type(got).__name__})")
                out.append((got, self.remote.show(rel)))
            return out
        out = []
        for i in ids:
            p = self.path(int(i))
            try:
                out.append((p.read_bytes(), str(p)))
            except OSError as e:
                raise DataError(f"{p}: cannot read ({e.strerror or e})") from None
        return out


def _class_folders(tree: Tree, rel: str) -> list[str]:
    if not tree.is_dir(rel):
        raise UsageError(f"image folder {tree.show(rel)} does not exist")
    classes = tree.subdirs(rel)
    if len(classes) < 2:
        raise UsageError(f"image folder {tree.show(rel)} needs at least 2 class folders (one per class) with images: "
                         f"found {len(classes)}")
    return classes


def _probe_objects(remote: RemoteRoot, rels: list[str]) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """``_probe_files`` for objects under a URL: their bytes fetched together (one GET each)."""
    items: list[tuple[bytes | str, str]] = []
    errors: dict[int, str] = {}
    for i, (rel, got) in enumerate(zip(rels, remote.cat(rels), strict=True)):
        if isinstance(got, BaseException):
            errors[i] = f"{remote.show(rel)}: cannot read ({str(got)[:200] or type(got).__name__})"
            got = b""
        items.append((got, remote.show(rel)))
    hw, hashes, probe_errors = _probe_many(items)
    return hw, hashes, {**probe_errors, **errors}


def _scan_listed(tree: _ListedTree, base: str, classes: list[str]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``_scan`` from a listing: the class folders' objects, sorted by class then name, with ``(size, version
    tag)`` in place of ``(size, mtime_ns)``."""
    names, labels, stats = [], [], []
    for c, name in enumerate(classes):
        folder = f"{base}/{name}" if base else name
        files = tree.files(folder)
        if not files:
            raise UsageError(f"class folder {tree.show(folder)} is empty: expected image files")
        for f in files:
            names.append(f"{name}/{f}")
            labels.append(c)
            stats.append(tree.listing[f"{folder}/{f}"])
    blob, offsets = pack_strings(names)
    return blob, offsets, np.array(labels, dtype=np.int64), np.array(stats, dtype=np.int64).reshape(-1, 2)


def _scan(base: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every non-hidden file in the class folders, sorted by class then name: relative paths (packed), labels
    (int64) and ``(size, mtime_ns)``. Folders are listed and stat-ed on threads (``stat`` releases the GIL; a
    warm open is mostly stats), each turned into arrays at once: no Python object per file outlives its folder."""
    from concurrent.futures import ThreadPoolExecutor

    def one(name: str) -> tuple[bytes, np.ndarray, np.ndarray]:
        folder = os.path.join(base, name)
        with os.scandir(folder) as it:
            files = sorted(e.name for e in it if not e.name.startswith(".") and e.is_file())
        if not files:
            raise UsageError(f"class folder {folder} is empty: expected image files")
        stats = np.fromiter((v for f in files for v in _size_mtime(os.path.join(folder, f))), dtype=np.int64,
                            count=2 * len(files)).reshape(-1, 2)
        prefix = f"{name}/".encode()
        lengths = np.fromiter((len(prefix) + len(f.encode()) for f in files), dtype=np.int64, count=len(files))
        return b"".join(prefix + f.encode() for f in files), lengths, stats

    with ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1))) as pool:
        folders = list(pool.map(one, classes))
    lengths = np.concatenate([f[1] for f in folders])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    blob = np.frombuffer(b"".join(f[0] for f in folders), dtype=np.uint8).copy()
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(f[1]) for f in folders])
    return blob, offsets, labels, np.concatenate([f[2] for f in folders])


def _size_mtime(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _reuse(cached: CachedIndex | None, blob: np.ndarray, offsets: np.ndarray, stat: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, dict[int, str], np.ndarray]:
    """Headers, hashes and errors from the cache for every entry whose path, size and mtime match; which matched."""
    n = len(stat)
    hw = np.zeros((n, 2), dtype=np.int32)
    hashes = np.zeros((n, HASH_BYTES), dtype=np.uint8)
    reused = np.zeros(n, dtype=bool)
    if cached is None:
        return hw, hashes, {}, reused
    old_errors = load_errors(cached["errors"])
    if np.array_equal(listing_digest(blob, offsets), cached["listing"]):
        match = (cached["stat"] == stat).all(axis=1)  # the same files in the same order: the usual case
        if match.all():  # nothing changed: the cached arrays as they are
            return cached["hw"], cached["hash"], old_errors, match
        rows = np.arange(n)
    else:  # files added or removed: match by path
        old = cached["paths"], cached["offsets"]
        where = {unpack_string(*old, j): j for j in range(len(old[1]) - 1)}
        rows = np.array([where.get(unpack_string(blob, offsets, i), -1) for i in range(n)], dtype=np.int64)
        match = (rows >= 0) & np.all(cached["stat"][np.maximum(rows, 0)] == stat, axis=1)
    hw[match], hashes[match] = cached["hw"][rows[match]], cached["hash"][rows[match]]
    errors = {int(i): old_errors[int(rows[i])] for i in np.flatnonzero(match) if int(rows[i]) in old_errors}
    return hw, hashes, errors, match


# ---------------------------------------------------------------- parquet


OPEN_SHARDS = 64  # Parquet shards on URLs a process keeps open (their footers parsed): no footer GET per read
_OPEN: OrderedDict[str, Any] = OrderedDict()
_OPEN_PID = [0]
_OPEN_LOCK = threading.Lock()


def open_parquet(where: str) -> Any:
    """A ``pyarrow.parquet.ParquetFile`` of a shard: a local path, or a URL read with ranged GETs.

    On a URL the shard is an fsspec file with ``cache_type="none"``: pyarrow's reads (the footer once, then one
    column chunk of one row group at a time, each in one ``ReadAt``) are each one ranged GET of exactly those
    bytes, and nothing is read ahead (fsspec's default read-ahead block is 5-50 MB). fsspec rather than pyarrow's
    own ``S3FileSystem``: the same URL, client and credential chain as the label store (``pipelines.storage``),
    ``gs://`` and every other installed protocol alike. Opened files are kept per process (the last
    ``OPEN_SHARDS``) and never cross a process: a forked child opens its own."""
    import pyarrow.parquet as pq

    if not is_url(where):
        return pq.ParquetFile(local_path(where))
    with _OPEN_LOCK:
        if _OPEN_PID[0] != os.getpid():  # inherited by fork: the parent's clients are not ours to use
            _OPEN.clear()
            _OPEN_PID[0] = os.getpid()
        pf = _OPEN.get(where)
        if pf is not None:
            _OPEN.move_to_end(where)
            return pf
    fs, path = filesystem(where)
    pf = pq.ParquetFile(fs.open(path, "rb", cache_type="none"))
    with _OPEN_LOCK:
        _OPEN[where] = pf
        while len(_OPEN) > OPEN_SHARDS:
            _OPEN.popitem(last=False)[1].close()
    return pf


def read_row_group_bytes(path: str, row_group: int, column: str) -> list[bytes | None]:
    """The encoded image bytes of one row group (``column`` is a ``{bytes, path}`` struct or binary)."""
    return image_bytes(open_parquet(path).read_row_group(row_group, columns=[column]).column(0)).to_pylist()


class ParquetShards(FileDataset):
    """Hugging Face ``datasets`` Parquet shards: ``<dir>/<split>/*.parquet`` (``test`` falls back to ``val``),
    ``<dir>/*.parquet`` or a glob (one train split), on disk or under a URL (``s3://bucket/prefix``: listed once,
    each shard read by row group with ranged GETs, ``open_parquet``). Columns: ``image`` (``{bytes, path}`` or
    binary) and an integer ``label``; class names from the schema's ``huggingface`` metadata where present, else
    the class count is one more than the largest train label. Rows are read by row group, on demand.
    """

    kind = "parquet"

    def __init__(self, where: str, split: str = "train", bad: str = "stop", workers: int | None = None,
                 spec: str | None = None, holdout: float | None = None, index_cache: str | os.PathLike | None = None):
        check_split(split)
        self.spec, self.split = spec or f"parquet:{where}", split
        self.index_cache = index_cache
        src = _parquet_source(where, split, holdout)
        files_split, side = src.files_split, src.side
        self.files, self.root, rel, stat = src.files, src.root, src.rel, src.stat
        places: list[str] = []
        if isinstance(src.root, Path):
            self.cache_path = cache_file(src.root, src.name)
            cached = load_cache(self.cache_path)
        else:
            places = url_cache_places(src.root, src.name, index_cache)
            cached = load_url_cache(_unlisted_skipped(places, src.tree, src.name))
        parts = _parquet_parts(cached, rel, stat)  # per shard: None (to probe) or its cached arrays
        schema = _cached_schema(cached) if all(p is not None for p in parts) else None
        names, label_col, image_col = schema or _parquet_schema(self.files)
        self.image_column = image_col
        tasks = []
        for s, part in enumerate(parts):
            if part is None:
                tasks += [(self.files[s], g, image_col) for g in range(open_parquet(self.files[s]).num_row_groups)]
        if tasks:
            total_rows = sum(open_parquet(f).metadata.num_rows for f in self.files)
            results = iter(_parallel(_probe_row_group, tasks, workers if total_rows >= PARALLEL_FROM else 1))
        shards = []
        for s, part in enumerate(parts):
            if part is None:
                part = _probe_shard(self.files[s], s, results, label_col)
            shards.append(part)
        if tasks:
            blob, offsets = pack_strings(rel)
            arrays = {
                "paths": blob, "offsets": offsets, "stat": stat,
                "rows": np.array([len(p["label"]) for p in shards], dtype=np.int64),
                **{k: np.concatenate([p[k] for p in shards]) for k in ("label", "hw", "hash", "loc")},
                "errors": dump_errors(_shard_errors(shards)),
                "schema": np.array(json.dumps({"names": names, "label": label_col, "image": image_col})),
            }
            if places:
                self.cache_path = save_url_cache(places, arrays)
            else:
                save_cache(cast(Path, self.cache_path), arrays)
        elif places and cached is not None:
            self.cache_path = cached.where
        self.index_reused = not tasks
        labels = np.concatenate([p["label"] for p in shards]).astype(np.int64)
        errors = _shard_errors(shards)
        loc = np.concatenate([p["loc"] for p in shards])
        hw = np.concatenate([p["hw"] for p in shards])
        hashes = np.concatenate([p["hash"] for p in shards])
        if names is None and len(labels):
            names = self._class_names_from_train(where, files_split, labels, bad, workers)
        self.class_names = tuple(names or ())
        self.num_classes = len(self.class_names)
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise UsageError(f"{self.spec} {split}: label {int(labels.max())} out of range for "
                             f"{self.num_classes} classes")
        keep = self._keep(errors, len(labels), bad)
        if holdout is not None and side != "test":  # keyed on (the shard's path, the row's index in it)
            shard_keys = string_hashes(*pack_strings(rel))
            starts = np.concatenate([[0], np.cumsum([len(p["label"]) for p in shards])])
            row_in_shard = (np.arange(len(labels)) - starts[loc[:, 0]]).astype(np.uint64)
            with np.errstate(over="ignore"):
                keys = _mix64(shard_keys[loc[:, 0]] ^ _mix64(row_in_shard + np.uint64(1)))
            keep = keep[self._hold_out(keys[keep], labels[keep], holdout, side)]
        self.labels, self.sizes, self._loc = labels[keep], np.ascontiguousarray(hw[keep]), loc[keep]
        if not len(self.labels):
            raise UsageError(f"{self.spec} {split} has no readable rows")
        self._set_fingerprint(hashes[keep])
        self._groups: OrderedDict[tuple[int, int], list[bytes | None]] = OrderedDict()
        self._stage = ShardStage(self.files, [tuple(s) for s in stat.tolist()], image_col)

    def _class_names_from_train(self, where: str, split: str, labels: np.ndarray, bad: str,
                                workers: int | None) -> list[str]:
        top = int(labels.max())
        if split != "train":
            top = max(top, int(ParquetShards(where, "train", bad, workers, index_cache=self.index_cache).labels.max()))
        return [str(c) for c in range(top + 1)]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_groups": OrderedDict()}

    def encoded(self, ids: np.ndarray) -> list[tuple[bytes, str]]:
        """The rows of a shard staged on the node's disk (``pipelines._shard_stage``: shards read at random) are
        read from its copy, each its own bytes; the others by row group, each group the batch touches once (its
        image column only), the last few kept."""
        loc = self._loc[self._check_ids(ids)]
        out: list[tuple[bytes, str]] = [(b"", "")] * len(loc)
        by_group: dict[tuple[int, int], list[int]] = {}
        for pos, (shard, group, _) in enumerate(loc.tolist()):
            by_group.setdefault((shard, group), []).append(pos)
        for (shard, group), positions in by_group.items():
            rows = [int(loc[pos, 2]) for pos in positions]
            data = self._stage.read(shard, group, rows)
            if data is None:  # not staged (yet): by row group
                group_bytes = self._row_group(shard, group)
                data = [group_bytes[r] for r in rows]
            for pos, row, b in zip(positions, rows, data, strict=True):
                out[pos] = (b or b"", f"{self.files[shard]} row group {group} row {row}")
        return out

    def _row_group(self, shard: int, group: int) -> list[bytes | None]:
        key = (shard, group)
        if key not in self._groups:
            self._groups[key] = read_row_group_bytes(self.files[shard], group, self.image_column)
            self._stage.read_in_place(shard, group)  # a group read again (a shuffle) starts staging
            while len(self._groups) > ROW_GROUP_CACHE:
                self._groups.popitem(last=False)
        self._groups.move_to_end(key)
        return self._groups[key]


@dataclass
class _ParquetSource:
    """The shards of one split: paths or URLs, their ``(size, mtime or version tag)``, paths relative to the
    root the cache belongs to, the cache's name, and the split whose files they are with its side of ``,val=F``."""

    files: list[str]
    stat: np.ndarray
    rel: list[str]
    root: Path | str  # a Path on disk, the URL otherwise
    name: str
    files_split: str
    side: str
    tree: _ListedTree | None = None  # the listing of a URL folder (None for a glob or a local folder)


def _unlisted_skipped(places: list[str], tree: _ListedTree | None, name: str) -> list[str]:
    """The places to look for a cache in, less the one next to the data when the listing shows it is not there."""
    if tree is not None and f".stillroom-index/{name}.npz" not in tree.listing:
        return places[1:]
    return places


def _parquet_source(where: str, split: str, holdout: float | None) -> _ParquetSource:
    is_glob = any(ch in where for ch in "*?[")
    root: Path | str
    if is_glob:  # a glob: one train split, which ,val=F may split
        files_split, side = ("train", holdout_part(split, False)) if holdout is not None else (split, "test")
        if files_split != "train":
            raise MissingSplit(f"parquet:{where} is a glob of one train split: it has no {files_split} split")
        name = "parquet-" + hashlib.sha256(where.encode()).hexdigest()[:12]
        if not is_url(where):
            paths = sorted(glob.glob(os.fspath(local_path(where))))
            if not paths:
                raise UsageError(f"no Parquet files match {where}")
            top = Path(os.path.commonpath([os.path.dirname(p) for p in paths]))
            return _ParquetSource(paths, _local_stat(paths), [os.path.relpath(p, top) for p in paths], top, name,
                                  files_split, side)
        fs, pattern = filesystem(where)
        found = fs.glob(pattern, detail=True)
        keys = sorted(k for k, v in found.items() if v.get("type", "file") != "directory")
        if not keys:
            raise UsageError(f"no Parquet files match {where}")
        base = os.path.commonpath([k.rpartition("/")[0] for k in keys])
        url_root = str(fs.unstrip_protocol(base))
        return _ParquetSource([str(fs.unstrip_protocol(k)) for k in keys],
                              np.array([(int(found[k].get("size") or 0), _version_tag(found[k])) for k in keys],
                                       dtype=np.int64).reshape(-1, 2),
                              [k[len(base) + 1:] for k in keys], url_root, name, files_split, side)
    tree, files_split, side, split_dir = _open_root(where, split, holdout, "Parquet folder")
    folder = split_dir or ""
    name = f"parquet-{split_dir or 'train'}"
    if isinstance(tree, _ListedTree):
        names = [n for n in tree.files(folder) if n.endswith(".parquet")]
        rel = [f"{folder}/{n}" if folder else n for n in names]
        stat = np.array([tree.listing[r] for r in rel], dtype=np.int64).reshape(-1, 2)
        files, root = [tree.show(r) for r in rel], tree.show("")
    else:
        paths = sorted(str(p) for p in (tree.root / folder).glob("*.parquet"))
        files, root, stat = paths, tree.root, _local_stat(paths)
        rel = [os.path.relpath(p, root) for p in paths]
    if not files:
        raise UsageError(f"no *.parquet files in {tree.show(folder)}")
    return _ParquetSource(files, stat, rel, root, name, files_split, side,
                          tree if isinstance(tree, _ListedTree) else None)


def _local_stat(paths: list[str]) -> np.ndarray:
    return np.array([_size_mtime(p) for p in paths], dtype=np.int64).reshape(-1, 2)


def _cached_schema(cached: CachedIndex | None) -> tuple[list[str] | None, str, str] | None:
    """What ``_parquet_schema`` found when the cache was written (caches from before it kept none: None)."""
    if cached is None:
        return None
    try:
        got = json.loads(str(cached["schema"]))
    except (KeyError, ValueError):
        return None
    return got["names"], got["label"], got["image"]


def _parquet_schema(files: list[str]) -> tuple[list[str] | None, str, str]:
    """Class names (from the ``huggingface`` schema metadata, when present), the label and image columns."""
    import pyarrow as pa

    names: list[str] | None = None
    for f in files:
        try:
            schema = open_parquet(f).schema_arrow
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"{f}: not a Parquet file ({str(e).splitlines()[0][:120]})") from None
        if "image" not in schema.names:
            raise UsageError(f"{f} has no 'image' column (columns: {', '.join(schema.names)}): expected an image "
                             "column of {bytes, path} and an integer label column")
        img = schema.field("image").type
        if not (pa.types.is_binary(img) or pa.types.is_large_binary(img)
                or (pa.types.is_struct(img) and img.get_field_index("bytes") >= 0)):
            raise UsageError(f"{f}: column 'image' is {img}: expected a struct {{bytes, path}} or binary")
        if "label" not in schema.names or not pa.types.is_integer(schema.field("label").type):
            raise UsageError(f"{f} has no integer 'label' column (columns: {', '.join(schema.names)})")
        meta = (schema.metadata or {}).get(b"huggingface")
        if meta and names is None:
            try:
                feature = json.loads(meta)["info"]["features"]["label"]
                names = [str(n) for n in feature["names"]] if feature.get("names") else None
            except (KeyError, TypeError, ValueError):
                names = None
    return names, "label", "image"


def _parquet_parts(cached: CachedIndex | None, rel: list[str], stat: np.ndarray
                   ) -> list[dict[str, Any] | None]:
    """Per shard, its rows from the cache when its path, size and mtime match, else None."""
    parts: list[dict[str, Any] | None] = [None] * len(rel)
    if cached is None:
        return parts
    old = {unpack_string(cached["paths"], cached["offsets"], j): j for j in range(len(cached["offsets"]) - 1)}
    starts = np.concatenate([[0], np.cumsum(cached["rows"])])
    errors = load_errors(cached["errors"])
    for s, r in enumerate(rel):
        j = old.get(r)
        if j is None or not np.array_equal(cached["stat"][j], stat[s]):
            continue
        a, b = int(starts[j]), int(starts[j + 1])
        loc = cached["loc"][a:b].copy()
        loc[:, 0] = s
        parts[s] = {"label": cached["label"][a:b], "hw": cached["hw"][a:b], "hash": cached["hash"][a:b],
                    "loc": loc, "errors": {k - a: v for k, v in errors.items() if a <= k < b}}
    return parts


def _probe_shard(path: str, shard: int, results: Any, label_col: str) -> dict[str, Any]:
    pf = open_parquet(path)
    labels = pf.read(columns=[label_col]).column(0).to_numpy(zero_copy_only=False)
    if len(labels) and labels.min() < 0:
        raise UsageError(f"{path}: negative label {int(labels.min())}")
    hws = [np.zeros((0, 2), dtype=np.int32)]
    hashes = [np.zeros((0, HASH_BYTES), dtype=np.uint8)]
    locs = [np.zeros((0, 3), dtype=np.int32)]
    errors: dict[int, str] = {}
    done = 0  # rows of this shard before this row group
    for g in range(pf.num_row_groups):
        hw, h, err = next(results)
        n = len(hw)
        hws.append(hw)
        hashes.append(h)
        errors.update({done + j: e for j, e in err.items()})
        done += n
        locs.append(np.stack([np.full(n, shard), np.full(n, g), np.arange(n)], axis=1).astype(np.int32))
    return {"label": labels.astype(np.int64), "hw": np.concatenate(hws), "hash": np.concatenate(hashes),
            "loc": np.concatenate(locs), "errors": errors}


def _shard_errors(shards: list[dict[str, Any]]) -> dict[int, str]:
    """The shards' errors by row of the whole split."""
    out: dict[int, str] = {}
    start = 0
    for p in shards:
        out.update({start + k: v for k, v in p["errors"].items()})
        start += len(p["label"])
    return out
