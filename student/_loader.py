"""The student's loader: worker processes build each batch from the store, the device finishes it.

The split of work follows timm's ``data/loader.py`` (worker processes, uint8 batches, a prefetch loader that
normalises on the device):

- a worker (``BatchSource.__getitems__``, run by a ``torch.utils.data.DataLoader`` whose batch sampler is
  the epoch's order cut into batches) gathers the stored arrays of its batch's ids, the labels and mixed
  targets, and the *uint8* pixels: on-disk data sets decode and crop each view from its stored parameters
  (``render_batch``, into shared memory); in-memory data sets hand over the source images (cropping them is
  one ``grid_sample`` over the batch, cheapest on the device);
- the training process (``finish``) moves the uint8 batch to the device (pinned, non-blocking on CUDA, one
  batch ahead on a side stream) and builds the float views there: ``mix_views`` or ``apply_views``. The
  student's normalisation follows in its step, on the same device.

With ``workers=0`` the same ``BatchSource`` runs in the training process, so 0 and N workers give the same
batches bit for bit (the tests check it). Feature maps (TaT) are read by chunk (``FeatureChunks``), never
loaded whole.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import torch

from pipelines.errors import UsageError
from pipelines.store import StoreError
from pipelines.views import COL, MIX_NONE, apply_views, mix_views, partner_ids, render_batch

MAX_AUTO_WORKERS = 4  # more rarely pays for one training process; say --loader-workers N for more
FEATURE_CHUNK_CACHE = 4  # feature chunks a process keeps (with 2 KB a sample and 8192-row chunks: 64 MB)
FEATURE_WINDOW_CHUNKS = 2  # with features, an epoch shuffles within windows of this many chunks


@dataclass
class Batch:
    """One training batch: the views, the ground truth and what the teacher said about those views."""

    ids: np.ndarray  # (B,) sample ids
    views: torch.Tensor  # (B, C, H, W) float in [0, 1]
    labels: torch.Tensor  # (B,) int64 ground truth of each sample itself
    targets: torch.Tensor  # (B, num_classes) ground truth mixed by the view's lambda (one-hot where not mixed)
    teacher: dict[str, torch.Tensor] = field(default_factory=dict)  # topk_idx, topk_logit, lse, tail_lse, ...
    params: np.ndarray | None = None  # (B, P) the view parameters
    seed: int = 0
    epoch: int = 0

    @property
    def mixed(self) -> bool:
        return self.params is not None and bool((self.params[:, COL["mix_mode"]] != MIX_NONE).any())


LABEL_ARRAYS = ("topk_idx", "topk_logit", "lse", "tail_lse", "hard", "sampled", "features")


def label_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Stored label arrays -> tensors: class indices as int64, logits and features as float32 (from float16)."""
    out = {}
    for k in LABEL_ARRAYS:
        if k in arrays:
            t = torch.from_numpy(np.ascontiguousarray(arrays[k]))
            out[k] = t.long() if k in ("topk_idx", "hard", "sampled") else t.float()
    return out


def mixed_targets(labels: np.ndarray, params: np.ndarray, partner_labels: np.ndarray, num_classes: int
                  ) -> np.ndarray:
    """``lam * onehot(y) + (1 - lam) * onehot(y_partner)`` for mixed views, ``onehot(y)`` for the others."""
    out = np.zeros((len(labels), num_classes), dtype=np.float32)
    rows = np.arange(len(labels))
    mixing = params[:, COL["mix_mode"]] != MIX_NONE
    lam = np.where(mixing, params[:, COL["lam"]], 1.0).astype(np.float32)
    out[rows, labels] += lam
    out[rows, partner_labels] += np.where(mixing, 1.0 - lam, 0.0).astype(np.float32)
    return out


def default_loader_workers(in_memory: bool, world_size: int = 1) -> int:
    """``--loader-workers`` when not given: 0 for in-memory data (gathering uint8 images is a copy, and the crop
    is one vectorised ``grid_sample`` on the device: a worker process would only add a hop); for data on disk,
    which is decoded image by image, the cores this process may use, shared among the ``world_size`` ranks
    (assumed on one machine), less one for the training process, at least 1 and at most ``MAX_AUTO_WORKERS``."""
    if in_memory:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores // max(world_size, 1) - 1, MAX_AUTO_WORKERS))


# ---------------------------------------------------------------- feature maps, by chunk


class FeatureChunks:
    """A seed's ``features`` array ``(N, C, h, w)`` float16, read by chunk: ``take(ids)`` decodes each chunk the ids
    touch once and keeps the last ``cache`` chunks (per process; the open array is not pickled, so a worker
    opens its own)."""

    def __init__(self, seed_dir: str | os.PathLike, chunk_rows: int, cache: int = FEATURE_CHUNK_CACHE):
        # a str: the seed's zarr group may be a URL (s3://...), which Path would mangle
        self.seed_dir, self.chunk_rows, self.cache = os.fspath(seed_dir), int(chunk_rows), int(cache)
        self._array: Any = None
        self._chunks: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None, "_chunks": OrderedDict()}

    def _open(self) -> Any:
        if self._array is None:
            import zarr

            try:
                self._array = zarr.open_group(store=self.seed_dir, mode="r", zarr_format=3)["features"]
            except (KeyError, FileNotFoundError) as e:
                raise StoreError(f"{self.seed_dir} has no features array ({e})") from None
        return self._array

    def chunk(self, k: int) -> np.ndarray:
        """Rows ``[k * chunk_rows, (k + 1) * chunk_rows)``, decoded once while cached."""
        if k not in self._chunks:
            array = self._open()
            try:
                self._chunks[k] = np.asarray(array[k * self.chunk_rows : (k + 1) * self.chunk_rows])
            except Exception as e:  # a truncated or edited chunk fails to decode
                raise StoreError(f"{self.seed_dir} features chunk {k}: cannot be read "
                                 f"({type(e).__name__}: {e})") from None
            while len(self._chunks) > self.cache:
                self._chunks.popitem(last=False)
        self._chunks.move_to_end(k)
        return self._chunks[k]

    def take(self, ids: np.ndarray) -> np.ndarray:
        """The feature maps of ``ids``, in that order."""
        ids = np.asarray(ids, dtype=np.int64)
        shape = self._open().shape
        out = np.empty((len(ids), *shape[1:]), dtype=np.float16)
        which = ids // self.chunk_rows
        for k in np.unique(which):
            rows = np.flatnonzero(which == k)
            out[rows] = self.chunk(int(k))[ids[rows] - int(k) * self.chunk_rows]
        return out


def chunk_window_order(rng: np.random.Generator, n: int, chunk_rows: int, window: int = FEATURE_WINDOW_CHUNKS
                       ) -> np.ndarray:
    """A permutation of ``range(n)`` that reads by chunk: the chunks in a random order, then the samples shuffled
    within each run of ``window`` consecutive chunks of that order (a shuffle buffer of ``window * chunk_rows``
    samples). A reader of chunked arrays then holds about ``window`` chunks at a time."""
    chunks = rng.permutation(-(-n // chunk_rows))
    parts = []
    for start in range(0, len(chunks), window):
        rows = np.concatenate([np.arange(k * chunk_rows, min((k + 1) * chunk_rows, n))
                               for k in chunks[start : start + window]])
        parts.append(rng.permutation(rows))
    return np.concatenate(parts)


# ---------------------------------------------------------------- what a worker hands over


@dataclass
class BatchParts:
    """A batch before its views are finished: uint8 pixels and everything gathered from the store."""

    ids: np.ndarray
    pixels: torch.Tensor  # uint8: rendered views (B, 3, S, S) when ``rendered``, else source images (B, C, H, W)
    partners: torch.Tensor | None  # the partners' uint8 pixels where some row mixes, else None
    params: np.ndarray
    labels: torch.Tensor
    targets: torch.Tensor
    teacher: dict[str, torch.Tensor]
    rendered: bool
    out_size: int | None
    seed: int
    epoch: int

    def pin_memory(self) -> BatchParts:
        """Called by the DataLoader's pinning thread (CUDA): page-locked host tensors copy asynchronously."""
        return replace(self, pixels=self.pixels.pin_memory(),
                       partners=self.partners.pin_memory() if self.partners is not None else None,
                       labels=self.labels.pin_memory(), targets=self.targets.pin_memory(),
                       teacher={k: v.pin_memory() for k, v in self.teacher.items()})


class BatchSource(torch.utils.data.Dataset):
    """One epoch's batches for a DataLoader: ``__getitems__(ids)`` builds the ``BatchParts`` of those ids.

    Holds the seed's label arrays (gathered by numpy indexing; inherited by forked workers without a copy),
    the data set's index and, where the store has them and they are wanted, the feature maps by chunk."""

    def __init__(self, dataset: Any, arrays: dict[str, np.ndarray], seed: int, epoch: int, out_size: int | None,
                 draft: bool, num_classes: int, features: FeatureChunks | None = None):
        self.dataset, self.arrays, self.seed, self.epoch = dataset, arrays, seed, epoch
        self.out_size, self.draft, self.num_classes, self.features = out_size, draft, num_classes, features

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> BatchParts:
        return self.__getitems__([i])

    def __getitems__(self, ids: Any) -> BatchParts:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        gathered = {name: np.take(a, ids, axis=0) for name, a in self.arrays.items()}
        params = gathered.pop("view")
        if self.features is not None:
            gathered["features"] = self.features.take(ids)
        partners = partner_ids(params, ids)
        mixing = not np.array_equal(partners, ids)
        if self.dataset.in_memory:
            pixels = self.dataset.read(ids)
            partner_pixels = self.dataset.read(partners) if mixing else None
        else:
            pixels, partner_pixels = render_batch(self.dataset, ids, params, int(self.out_size or 0), self.draft)
        y = self.dataset.labels[ids]
        targets = mixed_targets(y, params, self.dataset.labels[partners], self.num_classes)
        return BatchParts(ids, pixels, partner_pixels, params, torch.from_numpy(y), torch.from_numpy(targets),
                          label_tensors(gathered), not self.dataset.in_memory, self.out_size, self.seed, self.epoch)


def _first(items: Any) -> BatchParts:
    """The DataLoader's collate: ``__getitems__`` already made the batch."""
    return items if isinstance(items, BatchParts) else items[0]


def finish(parts: BatchParts, device: torch.device) -> Batch:
    """Move the uint8 batch to ``device`` and build the float views there."""
    async_copy = device.type == "cuda"
    pixels = parts.pixels.to(device, non_blocking=async_copy)
    partners = parts.partners.to(device, non_blocking=async_copy) if parts.partners is not None else None
    if parts.rendered:
        views = mix_views(pixels, partners, parts.params)
    else:
        views = apply_views(pixels, parts.params, parts.out_size, partners)
    return Batch(parts.ids, views, parts.labels.to(device, non_blocking=async_copy),
                 parts.targets.to(device, non_blocking=async_copy),
                 {k: v.to(device, non_blocking=async_copy) for k, v in parts.teacher.items()},
                 parts.params, parts.seed, parts.epoch)


def batch_parts(source: BatchSource, batches: list[np.ndarray], workers: int, pin: bool) -> Iterable[BatchParts]:
    """The batches' parts, built in this process (``workers == 0``) or by ``workers`` forked processes, in order."""
    if workers == 0:
        return (source.__getitems__(ids) for ids in batches)
    if workers < 0:
        raise UsageError(f"--loader-workers {workers}: expected >= 0")
    return torch.utils.data.DataLoader(
        source, batch_sampler=cast(Any, batches), collate_fn=_first, num_workers=workers, pin_memory=pin,
        prefetch_factor=2, multiprocessing_context="fork" if "fork" in _start_methods() else None)


def _start_methods() -> list[str]:
    import multiprocessing

    return multiprocessing.get_all_start_methods()


def on_device(parts: Iterable[BatchParts], device: torch.device) -> Iterator[Batch]:
    """Finished batches on ``device``. On CUDA the next batch is copied and finished on a side stream while the
    current one trains (timm's ``PrefetchLoader``)."""
    if device.type != "cuda":
        for p in parts:
            yield finish(p, device)
        return
    side = torch.cuda.Stream(device=device)
    pending: Batch | None = None
    for p in parts:
        with torch.cuda.stream(side):
            ready = finish(p, device)
        if pending is not None:
            yield pending
        main = torch.cuda.current_stream(device)
        main.wait_stream(side)
        for t in (ready.views, ready.labels, ready.targets, *ready.teacher.values()):
            t.record_stream(main)  # made on the side stream, used on the main one: not freed before it is done
        pending = ready
    if pending is not None:
        yield pending
