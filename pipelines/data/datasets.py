"""Datasets: a small interface, two in-memory kinds and two on disk.

A dataset is a fixed, ordered list of samples. ``sample_id`` is the position in that list; ``labels``
holds the ground truth and ``sizes`` each image's (height, width). Every dataset has a ``fingerprint``:
a hash of its content (see each class for what it covers), so that a label store can refuse labels made
for other data.

In-memory data sets (``in_memory = True``: every image the same size) hold the pixels and ``read(ids)``
returns them as one uint8 tensor ``(B, C, H, W)``. Data sets on disk (``imagefolder:``, ``parquet:``;
``pipelines/data/folder.py``, ``parquet.py``) are an index: opening one reads headers, not pixels, and ``encoded(ids)``
returns the encoded bytes of a batch; ``pipelines.views`` decodes and crops them per image.

Specs, as the CLI and the service take them:

- ``fashion-mnist`` or ``fashion-mnist:n=N`` (the first N samples of the split): the idx files from
  ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``) or ``data_root`` /
  ``$STILLROOM_DATA``.
- ``imagefolder:<path>``: the ImageNet layout ``<path>/train/<class>/*``, ``<path>/val/<class>/*`` (or
  ``test/``), or ``<path>/<class>/*`` for a train split only; JPEG/PNG of any size, decoded to RGB.
- ``parquet:<dir or glob>``: Hugging Face ``datasets`` shards, ``<dir>/<split>/*.parquet`` with an
  ``image`` ({bytes, path}) and an integer ``label`` column.
- Both take a URL of any installed fsspec protocol for the path (``imagefolder:s3://bucket/imagenet``,
  ``parquet:gs://bucket/prefix``, ``file:///data/x``): the prefix is listed once (sizes and ETags) into the
  cached index; an image folder's file is then one GET, a Parquet row group's image column one ranged GET.
- Both take ``,bad=skip`` after the path: images that cannot be read are left out and recorded
  (``dataset.skipped``) instead of stopping the open with an error naming the file (``bad=stop``, the default).
- Both take ``,val=F`` (0 < F < 1) after the path, for data with no val split: about a fraction F of each
  class of the train split is held out as the ``val`` split (``test`` reads it too when there is no ``test/``),
  each sample by a hash of its path (Parquet: of its shard's path and its row in the shard), so every process
  holds out the same samples and adding files moves no other; ``train`` is the rest.
- ``synthetic`` or ``synthetic:n=512,classes=10,size=16,channels=1``: generated from the sample id,
  deterministic, learnable (each class is a different stripe pattern), for tests.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from stillroom.pipelines.core import DataError, UsageError
from stillroom.pipelines.data.file_dataset import BAD_POLICIES, MissingSplit
from stillroom.pipelines.data.folder import ImageFolder
from stillroom.pipelines.data.parquet import ParquetShards

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)
DATASET_HELP = (  # the --dataset help of every command
    "fashion-mnist[:n=N], synthetic[:n=,classes=,size=,channels=], imagefolder:DIR (DIR/train/<class>/*, "
    "DIR/val/<class>/*) or parquet:DIR|GLOB (Hugging Face shards, DIR/train/*.parquet); add ,bad=skip to leave "
    "unreadable images out (listed in the index) instead of stopping with an error naming the file, and ,val=F "
    "(e.g. ,val=0.1) to hold out a fraction F of each class as the val split of data that has none"
)
SPLITS = ("train", "test")  # of the in-memory data sets; those on disk also have "val"
__all__ = ["DATASET_HELP", "DataError", "Dataset", "FashionMNIST", "ImageFolder", "MissingSplit", "ParquetShards",
           "Synthetic", "load_dataset", "open_eval_split"]


class Dataset(Protocol):
    spec: str
    split: str
    num_classes: int
    labels: np.ndarray  # (N,) int64 ground truth
    in_memory: bool  # True: ``read`` and ``image_shape``; False: ``encoded`` (see the module docstring)

    @property
    def channels(self) -> int: ...

    skipped: list[str]  # samples left out as unreadable (``,bad=skip``), one line each

    @property
    def sizes(self) -> np.ndarray: ...  # (N, 2) each image's height and width

    @property
    def image_shape(self) -> tuple[int, int, int]: ...  # (C, H, W), in-memory only

    def __len__(self) -> int: ...

    @property
    def fingerprint(self) -> str: ...

    def read(self, ids: np.ndarray | list[int]) -> torch.Tensor: ...  # in-memory only

    def encoded(self, ids: np.ndarray) -> list[tuple[bytes, str]]: ...  # on disk only


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")


def _check_ids(ids: np.ndarray | list[int], n: int, spec: str) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        bad = int(ids[(ids < 0) | (ids >= n)][0])
        raise UsageError(f"sample id {bad} is out of range for {spec}: expected 0 <= id < {n}")
    return ids


def _hash_arrays(*parts: bytes | np.ndarray) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.tobytes() if isinstance(part, np.ndarray) else part)
    return h.hexdigest()[:32]


class _InMemory:
    """Shared body of the datasets that hold every image in one uint8 array."""

    spec: str
    split: str
    num_classes: int
    images: np.ndarray  # (N, C, H, W) uint8
    labels: np.ndarray
    _fingerprint: str | None = None
    in_memory = True
    skipped: list[str] = []

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def sizes(self) -> np.ndarray:
        """(N, 2): every image's (height, width), one broadcast row (no memory per sample)."""
        return np.broadcast_to(np.array(self.images.shape[2:], dtype=np.int32), (len(self), 2))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def fingerprint(self) -> str:
        """sha256 of the image shape, the image bytes, the label bytes and the class count.

        Paths, names and file formats are not covered: the same pixels and labels from anywhere are the
        same data set.
        """
        if self._fingerprint is None:
            shape = np.asarray(self.images.shape + (self.num_classes,), dtype=np.int64)
            self._fingerprint = _hash_arrays(shape, self.images, self.labels.astype(np.int64))
        return self._fingerprint

    def read(self, ids: np.ndarray | list[int]) -> torch.Tensor:
        ids = _check_ids(ids, len(self), self.spec)
        return torch.from_numpy(self.images[ids])

    def encoded(self, ids: np.ndarray) -> list[tuple[bytes, str]]:
        raise UsageError(f"{self.spec} is held in memory as pixels: read(ids), not encoded bytes")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise UsageError(f"{path} is not an idx file of unsigned bytes")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class FashionMNIST(_InMemory):
    """Fashion-MNIST from its idx files (gzipped or not): 60,000 train and 10,000 test images, 28x28."""

    num_classes = 10
    class_names = FASHION_MNIST_CLASSES

    def __init__(self, split: str = "train", data_root: str | os.PathLike | None = None, n: int | None = None):
        _check_split(split)
        root = Path(data_root or os.environ.get("STILLROOM_DATA") or FASHION_MNIST_DIR)
        prefix = "train" if split == "train" else "t10k"
        files = {}
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            candidates = [root / f"{prefix}-{kind}.gz", root / f"{prefix}-{kind}"]
            found = next((p for p in candidates if p.exists()), None)
            if found is None:
                raise UsageError(
                    f"Fashion-MNIST file {candidates[0].name} not found in {root}: install the Debian package "
                    "dataset-fashion-mnist or point --data-root / STILLROOM_DATA at the idx files"
                )
            files[kind] = found
        self.spec, self.split = "fashion-mnist" if n is None else f"fashion-mnist:n={n}", split
        self.images = _read_idx(files["images-idx3-ubyte"])[:, None]
        self.labels = _read_idx(files["labels-idx1-ubyte"]).astype(np.int64)
        if len(self.images) != len(self.labels):
            raise UsageError(f"{root}: {len(self.images)} images but {len(self.labels)} labels")
        if n is not None:  # the first n samples; a split with fewer (test: 10,000) is taken whole
            if n < 1:
                raise UsageError(f"fashion-mnist:n={n}: expected n >= 1")
            self.images, self.labels = self.images[:n], self.labels[:n]


class Synthetic(_InMemory):
    """Generated images: class ``c`` is a stripe pattern of frequency ``c + 1`` at angle ``c``, plus noise.

    Deterministic in (n, classes, size, channels, split, sample id); learnable by a tiny network.
    """

    def __init__(self, split: str = "train", n: int = 512, classes: int = 10, size: int = 16, channels: int = 1):
        _check_split(split)
        if n < 1 or classes < 2 or size < 4 or channels not in (1, 3):
            raise UsageError(
                f"bad synthetic spec n={n} classes={classes} size={size} channels={channels}: "
                "expected n >= 1, classes >= 2, size >= 4, channels 1 or 3"
            )
        self.spec = f"synthetic:n={n},classes={classes},size={size},channels={channels}"
        self.split, self.num_classes = split, classes
        rng = np.random.Generator(np.random.Philox(key=[n * 131 + classes, size * 7 + channels + SPLITS.index(split)]))
        self.labels = rng.integers(0, classes, size=n).astype(np.int64)
        yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
        angle = self.labels[:, None, None] * (np.pi / classes)
        freq = (self.labels[:, None, None] % 4 + 1) * 2 * np.pi
        proj = np.cos(angle) * xx[None] + np.sin(angle) * yy[None]
        clean = 0.5 + 0.4 * np.sin(freq * proj + self.labels[:, None, None])
        noisy = clean + 0.1 * rng.standard_normal((n, size, size))
        img = (np.clip(noisy, 0, 1) * 255).astype(np.uint8)[:, None]
        self.images = np.ascontiguousarray(np.repeat(img, channels, axis=1))


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset spec string (see the module docstring)."""

    kind: str
    arg: str = ""

    @classmethod
    def parse(cls, spec: str) -> DatasetSpec:
        kind, _, arg = spec.partition(":")
        if kind not in ("fashion-mnist", "imagefolder", "parquet", "synthetic"):
            raise UsageError(f"unknown dataset {spec!r}: expected fashion-mnist, imagefolder:<path>, "
                             "parquet:<dir or glob> or synthetic[:...]")
        if kind in ("imagefolder", "parquet") and not arg:
            raise UsageError(f"{kind} needs a path: {kind}:<path>")
        return cls(kind, arg)

    def path_and_options(self) -> tuple[str, dict[str, str]]:
        """``imagefolder:`` / ``parquet:`` only: the path and the options after it (``,bad=...``, ``,val=...``,
        in any order), as written."""
        path, options = self.arg, dict[str, str]()
        while True:
            head, sep, tail = path.rpartition(",")
            key, eq, value = tail.partition("=")
            if not sep or not eq or not key.isidentifier():
                return path, options
            if key not in DISK_OPTIONS or key in options:
                why = "twice" if key in options else f"unknown: expected {', '.join(k + '=' for k in DISK_OPTIONS)}"
                raise UsageError(f"option {key}= in {self.kind}:{self.arg} is {why}")
            options[key], path = value, head

    def path_and_policy(self) -> tuple[str, str, float | None]:
        """``imagefolder:`` / ``parquet:`` only: the path, the bad-image policy (``,bad=stop|skip``) and the
        fraction of each class held out as ``val`` (``,val=F``; None without it)."""
        path, options = self.path_and_options()
        bad = options.get("bad", "stop")
        if bad not in BAD_POLICIES:
            raise UsageError(f"bad={bad!r} in {self.kind}:{self.arg}: expected bad=stop or bad=skip")
        if "val" not in options:
            return path, bad, None
        try:
            fraction = float(options["val"])
        except ValueError:
            fraction = -1.0
        if not 0 < fraction < 1:
            raise UsageError(f"val={options['val']} in {self.kind}:{self.arg}: expected a fraction between 0 and 1 "
                             "(e.g. val=0.1 holds out a tenth of each class)")
        return path, bad, fraction


def _parse_kwargs(arg: str, spec: str, keys: tuple[str, ...] = ("n", "classes", "size", "channels")) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in filter(None, arg.split(",")):
        key, _, value = part.partition("=")
        if key not in keys or not value.isdigit():
            expected = ", ".join(f"{k}=" for k in keys)
            raise UsageError(f"bad option {part!r} in {spec!r}: expected {expected}")
        out[key] = int(value)
    return out


DISK_OPTIONS = ("bad", "val")  # what imagefolder: and parquet: take after their path

_CACHE: dict[tuple[str, str, str], Dataset] = {}


def load_dataset(spec: str, split: str = "train", data_root: str | os.PathLike | None = None,
                 index_cache: str | os.PathLike | None = None) -> Dataset:
    """Open a dataset by spec; repeated calls in one process share the loaded images (or index).

    ``index_cache``: where the index of data on a URL is cached when the data's own prefix is not writable (a
    URL or a path shared by the cluster; the labeling job gives its store root); default $STILLROOM_INDEX_CACHE,
    else ``pipelines.data.index_cache.use_index_cache``'s. It changes where the index lives, never the data set."""
    key = (spec, split, str(data_root or os.environ.get("STILLROOM_DATA") or ""))
    if key not in _CACHE:
        parsed = DatasetSpec.parse(spec)
        ds: Dataset
        if parsed.kind == "fashion-mnist":
            ds = FashionMNIST(split, data_root, **_parse_kwargs(parsed.arg, spec, ("n",)))
        elif parsed.kind == "synthetic":
            ds = Synthetic(split, **_parse_kwargs(parsed.arg, spec))
        else:
            path, bad, holdout = parsed.path_and_policy()
            reader = ImageFolder if parsed.kind == "imagefolder" else ParquetShards
            ds = reader(path, split, bad, spec=spec, holdout=holdout, index_cache=index_cache)
        _CACHE[key] = ds
    return _CACHE[key]


def open_eval_split(spec: str, split: str, data_root: str | os.PathLike | None = None) -> Dataset | None:
    """The split a run evaluates on, or None when the data set has none (a folder of class folders, a glob of
    shards): the run then trains without evaluating, and one line on stderr says so and how to hold some out."""
    import sys

    try:
        return load_dataset(spec, split, data_root)
    except MissingSplit as e:
        kind = DatasetSpec.parse(spec).kind
        how = (f"add ,val=F to the dataset (e.g. {spec},val=0.1) to hold out a fraction of each class"
               if kind in ("imagefolder", "parquet") else "give a data set with that split")
        print(f"stillroom: note: nothing to evaluate on ({e}): training without evaluation; {how}", file=sys.stderr)
        return None
