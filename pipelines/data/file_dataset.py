"""Data sets on disk as an index of samples, built once from the files' headers and bytes.

Two kinds, behind one small interface (``FileDataset``): ``ImageFolder`` (one file per sample, the
ImageNet layout, ``folder.py``) and ``ParquetShards`` (Hugging Face ``datasets`` shards: an ``image`` column of
``{bytes, path}`` and an integer ``label``, ``parquet.py``). Opening one reads, per sample, its label, where its
bytes are, its height and width (from the image header: nothing is decoded, ``probe.py``) and a hash of its
encoded bytes. That index is kept in memory as a few flat numpy arrays (about 30-70 bytes a sample) and cached
(``index_cache.py``), so a second open only lists and stats the files (or the shards) and compares them with the
cache. The fingerprint is the same for the same bytes on disk or on a URL.

The readers do not import torch: a worker process that turns sample ids into encoded bytes needs only numpy,
PIL and pyarrow.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from stillroom.pipelines.core import DataError, UsageError
from stillroom.pipelines.data.holdout import holdout_mask

SPLITS = ("train", "val", "test")
BAD_POLICIES = ("stop", "skip")


class MissingSplit(UsageError):
    """The data set has no such split (a folder of class folders, a glob of shards): nothing to evaluate on."""


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
    bad = "stop"  # the bad-sample policy: ``skip`` also leaves out views whose image fails to decode (labeling,
    # training: ``pipelines.views.render_views_at``'s ``failed``)
    channels = 3
    in_memory = False
    cache_path: Path | str | None = None  # where the index is cached (a URL for data on one)
    index_reused: bool = False  # True when this open took every entry from the cache
    _fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        raise UsageError(f"{self._on_disk()}: it is not read as one tensor; a view recipe with an output size "
                         "(e.g. imagenet-rrc:size=224) gives its views one shape")

    def one_size(self) -> tuple[int, int] | None:
        """The (height, width) every image shares (the index holds each image's), None where they differ or the
        data set is empty."""
        sizes = np.asarray(self.sizes)
        if not len(sizes) or (sizes != sizes[0]).any():
            return None
        return int(sizes[0, 0]), int(sizes[0, 1])

    def _on_disk(self) -> str:
        """What is true of this data set's image sizes, for a refusal that needs one tensor of them."""
        shared = self.one_size()
        if shared is not None:
            return f"{self.spec} is on disk (every image {shared[0]}x{shared[1]})"
        return f"{self.spec} holds images of many sizes"

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
        raise UsageError(f"{self._on_disk()}: build views (pipelines.views), not read(ids)")

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
