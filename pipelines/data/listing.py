"""A data root, a local folder or a URL listed once: ``RemoteRoot`` (a URL and its fsspec filesystem), the
trees the readers walk (``_LocalTree`` on disk, ``_ListedTree`` over one recursive listing), and where a split
lives in them (``<root>/<split>/``, or the train split held out with ``,val=F``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from stillroom.pipelines.core import UsageError, filesystem, is_url, local_path, version_field
from stillroom.pipelines.data.file_dataset import SPLITS, MissingSplit
from stillroom.pipelines.data.holdout import holdout_part


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


def _size_mtime(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _unlisted_skipped(places: list[str], tree: _ListedTree | None, name: str) -> list[str]:
    """The places to look for a cache in, less the one next to the data when the listing shows it is not there."""
    if tree is not None and f".stillroom-index/{name}.npz" not in tree.listing:
        return places[1:]
    return places
