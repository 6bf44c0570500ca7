"""The index cache: a data set's index (paths, labels, sizes, hashes) saved once, reused by every later open.

Where the cache lives, for data on disk: ``$STILLROOM_CACHE/index/`` when that variable is set; otherwise
``<data root>/.stillroom-index/`` when the data root is writable (the cache then moves with the
folder), else ``~/.cache/stillroom/index/``. An entry is reused when its path, size and mtime match.

Data on a URL (``s3://bucket/prefix``, ``gs://...``, any installed fsspec protocol) is listed once (one
recursive listing: every key with its size and ETag) and its index is cached where every node of a cluster
finds it: next to the data (``<url>/.stillroom-index/``) when that prefix takes a write, else under the shared
index cache (``index_cache=``, ``$STILLROOM_INDEX_CACHE``, or the store root the job was given), else on this
node only (``url_cache_places``). It is one object, written whole by one PUT; an entry is reused when its key,
size and ETag match the listing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from stillroom.pipelines.core import Location, write_atomically

log = logging.getLogger("stillroom.data")

INDEX_VERSION = 3  # bump when the cache file changes: older caches are rebuilt


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


def dump_errors(errors: dict[int, str]) -> np.ndarray:
    return np.array(json.dumps({str(k): v for k, v in errors.items()}))


def load_errors(stored: np.ndarray) -> dict[int, str]:
    return {int(k): v for k, v in json.loads(str(stored)).items()}
