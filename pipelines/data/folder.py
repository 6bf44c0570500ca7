"""The image-folder reader (``imagefolder:``): ``root/<split>/<class>/<image>`` or ``root/<class>/<image>``, on
disk or on a URL, indexed from headers (one file per sample) and read back one encoded file per sample.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import numpy as np

from stillroom.pipelines.core import DataError, UsageError
from stillroom.pipelines.data.file_dataset import FileDataset, check_split
from stillroom.pipelines.data.holdout import string_hashes
from stillroom.pipelines.data.index_cache import (
    CachedIndex,
    cache_file,
    dump_errors,
    listing_digest,
    load_cache,
    load_errors,
    load_url_cache,
    save_cache,
    save_url_cache,
    url_cache_places,
)
from stillroom.pipelines.data.listing import RemoteRoot, Tree, _ListedTree, _open_root, _size_mtime, _unlisted_skipped
from stillroom.pipelines.data.probe import HASH_BYTES, PARALLEL_FROM, _parallel, _probe_files, _probe_many
from stillroom.pipelines.data.strings import pack_strings, take_strings, unpack_string


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
        self.split, self.bad = split, bad
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
