"""The student's loader: worker processes build each batch from the store, the device finishes it.

The split of work follows timm's ``data/loader.py`` (worker processes, uint8 batches, a prefetch loader that
normalises on the device):

- a worker (``BatchSource.__getitems__``, run by a ``torch.utils.data.DataLoader`` whose batch sampler is
  the epoch's order cut into batches) gathers the stored arrays of its batch's ids, the labels and mixed
  targets, and the *uint8* pixels: on-disk data sets decode and crop each view from its stored parameters
  (``render_batch_pool``, into shared memory: the batch's views and only the partner views it lacks, gathered
  on the device); in-memory data sets hand over the source images (cropping them is one vectorised crop over
  the batch, cheapest on the device);
- the training process (``finish``) moves the uint8 batch to the device (pinned, non-blocking on CUDA, one
  batch ahead on a side stream) and builds the float views there: ``mix_views`` or ``apply_views``. The
  student's normalisation follows in its step, on the same device.

With ``workers=0`` the same ``BatchSource`` runs in the training process, so 0 and N workers give the same
batches bit for bit (the tests check it). Feature maps (TaT) are read by the batch's rows (``FeatureRows``),
never loaded whole.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from stillroom.pipelines.core import UsageError, is_url
from stillroom.pipelines.store import StoreError
from stillroom.pipelines.views import (
    COL,
    MIX_NONE,
    Recipe,
    apply_views,
    draw_views,
    mix_views,
    num_view_params,
    partner_ids,
    render_batch_pool,
)

log = logging.getLogger("stillroom.student")
MAX_AUTO_WORKERS = 4  # more rarely pays for one training process; say --loader-workers N for more


@dataclass
class Batch:
    """One training batch: the views, the ground truth and what the teacher said about those views."""

    ids: np.ndarray  # (B,) sample ids
    views: torch.Tensor  # (B, C, H, W) float in [0, 1]
    labels: torch.Tensor  # (B,) int64 ground truth of each sample itself
    targets: torch.Tensor  # (B, num_classes) ground truth mixed by the view's lambda (one-hot where not mixed)
    teacher: dict[str, torch.Tensor] = field(default_factory=dict)  # topk_idx, topk_logit, lse, tail_lse, ...
    params: np.ndarray | None = None  # (B, P) the view parameters
    seed: int = 0  # the store seed of every view (-1 when the rows come from several: ``row_seeds``)
    epoch: int = 0
    row_seeds: np.ndarray | None = None  # (B,) each view's store seed under ``--view-order random``

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


def usable_cores() -> int:
    """The cores this process may use (its CPU affinity where the platform says it, else the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_loader_workers(in_memory: bool, world_size: int = 1) -> int:
    """``--loader-workers`` when not given: 0 for in-memory data (gathering uint8 images is a copy, and the crop
    is one vectorised crop on the device: a worker process would only add a hop); for data on disk,
    which is decoded image by image, the cores this process may use, shared among the ``world_size`` ranks
    (assumed on one machine), less one for the training process, at least 1 and at most ``MAX_AUTO_WORKERS``."""
    if in_memory:
        return 0
    return max(1, min(usable_cores() // max(world_size, 1) - 1, MAX_AUTO_WORKERS))


def set_training_threads(threads: int | None, loader_workers: int) -> int:
    """Give torch ``threads`` CPU threads, else (``OMP_NUM_THREADS`` unset: a plain process, not a Ray worker or
    job, which Ray sizes) the cores this process may use less its ``loader_workers`` decoding processes, at least
    1; returns torch's count. torch's own default, every core, beside loader workers oversubscribes the cores,
    and its OpenMP threads then wait on each other: on a loaded 2-core machine an epoch took 5.7-10.6 s where
    one thread took 0.9-1.0 s (``bench/training.py --threads-ways`` measures the two side by side: 1.84x as slow
    loaded, 8 % faster idle)."""
    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, usable_cores() - loader_workers)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# ---------------------------------------------------------------- feature maps, by the batch's rows


class FeatureRows:
    """A seed's ``features`` array ``(N, C, h, w)`` float16, read by the rows a batch takes: ``take(ids)``.

    The store shards it (``pipelines.store._layout``): a file of ``chunk_rows`` rows made of inner chunks of 16
    rows, the file's index (where each inner chunk lies, CRC32C-checked) at its end. ``take`` reads, for each
    file its rows lie in, the index and then only the inner chunks of those rows, decoded with Blosc as zarr
    decodes them; it keeps nothing between calls, so memory does not grow with the split. Our own reading of
    zarr's sharding format, because zarr's (``array.oindex[ids]``) spends far longer on its asynchronous
    machinery per inner chunk than on decoding it (``bench/features.py`` measures both on the same files). Any
    other layout (a store that chunked features by ``chunk_rows`` rows, or not on a local disk) is read through
    zarr: right, but for big chunks slow (one warning). The open array is not pickled, so a worker opens its own."""

    def __init__(self, seed_dir: str | os.PathLike):
        # a str: the seed's zarr group may be a URL (s3://...), which Path would mangle
        self.seed_dir = os.fspath(seed_dir)
        self._array: Any = None
        self._sharded: tuple[int, int] | None = None  # (rows a shard, rows an inner chunk) on the fast path

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None, "_sharded": None}

    def _open(self) -> Any:
        if self._array is None:
            import zarr

            try:
                self._array = zarr.open_group(store=self.seed_dir, mode="r", zarr_format=3)["features"]
            except (KeyError, FileNotFoundError) as e:
                raise StoreError(f"{self.seed_dir} has no features array ({e})") from None
            local = not is_url(self.seed_dir)  # the fast path reads the shard files directly
            self._sharded = _fast_shards(self._array, Path(self.seed_dir) / "features") if local else None
            rows = self._array.chunks[0]
            if self._sharded is None and rows > MAX_ROWS_A_READ:
                log.warning("%s: features are stored in chunks of %d rows (a store made before features were "
                            "sharded): every row a batch takes decodes its whole chunk; relabel for fast reads",
                            self.seed_dir, rows)
        return self._array

    def take(self, ids: np.ndarray) -> np.ndarray:
        """The feature maps of ``ids``, in that order."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        array = self._open()
        if self._sharded is None:
            try:
                return np.asarray(array.oindex[ids])
            except Exception as e:  # a truncated or edited chunk fails to decode
                raise StoreError(f"{self.seed_dir} features: cannot be read ({type(e).__name__}: {e})") from None
        shard_rows, inner_rows = self._sharded
        out = np.empty((len(ids), *array.shape[1:]), dtype=np.float16)
        order = np.argsort(ids, kind="stable")
        shard_of = ids[order] // shard_rows
        bounds = np.flatnonzero(np.diff(shard_of)) + 1
        for rows in np.split(order, bounds):
            shard = int(ids[rows[0]]) // shard_rows
            self._read_shard(shard, (ids[rows] - shard * shard_rows).tolist(), rows.tolist(), out)
        return out

    def _read_shard(self, shard: int, local: list[int], rows: list[int], out: np.ndarray) -> None:
        """Rows ``local`` (sorted) of file ``shard`` into ``out[rows]``."""
        from numcodecs import Blosc

        shard_rows, inner_rows = self._sharded or (0, 1)
        path = Path(self.seed_dir) / "features" / self._array.metadata.encode_chunk_key((shard, 0, 0, 0))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # zarr writes no file of fill values (0) only
            out[rows] = 0
            return
        try:
            index = _shard_index(fd, shard_rows // inner_rows, path)
            decoded, chunk = -1, out[:0]
            for row, i in zip(rows, local, strict=True):
                k = i // inner_rows
                if k != decoded:
                    offset, nbytes = (int(v) for v in index[k])
                    if offset == _EMPTY:  # an inner chunk of fill values (0), which zarr leaves out
                        chunk = np.zeros((inner_rows, *out.shape[1:]), dtype=np.float16)
                    else:
                        data = Blosc().decode(os.pread(fd, nbytes, offset))
                        chunk = np.frombuffer(data, dtype="<f2").reshape(inner_rows, *out.shape[1:])
                    decoded = k
                out[row] = chunk[i - k * inner_rows]
        except (OSError, ValueError, RuntimeError) as e:  # a truncated or edited file
            raise StoreError(f"{path}: features cannot be read ({type(e).__name__}: {e})") from None
        finally:
            os.close(fd)


MAX_ROWS_A_READ = 64  # past this, reading one sample's features through a chunk warrants a warning
_EMPTY = 2**64 - 1  # zarr's index entry for an inner chunk not written


def _fast_shards(array: Any, path: Path) -> tuple[int, int] | None:
    """``(rows a shard, rows an inner chunk)`` when ``array`` is laid out as ``pipelines.store`` shards features
    (the inner chunks little-endian bytes then Blosc, the index at the end with a CRC32C, on a local disk), else
    None (zarr reads it)."""
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
    from zarr.codecs.sharding import ShardingCodecIndexLocation

    codecs = array.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec) or not path.is_dir():
        return None
    sharding = codecs[0]
    inner = sharding.codecs
    index = sharding.index_codecs
    little = BytesCodec(endian="little")
    if not (len(inner) == 2 and inner[0] == little and isinstance(inner[1], BloscCodec)
            and len(index) == 2 and index[0] == little and isinstance(index[1], Crc32cCodec)
            and sharding.index_location == ShardingCodecIndexLocation.end
            and tuple(sharding.chunk_shape[1:]) == tuple(array.shape[1:]) and array.dtype == np.float16):
        return None
    return int(array.shards[0]), int(sharding.chunk_shape[0])


def _shard_index(fd: int, chunks: int, path: Path) -> np.ndarray:
    """A shard's ``(chunks, 2)`` index (offset, length of each inner chunk) from the end of its file, its CRC32C
    checked."""
    import google_crc32c

    size = chunks * 16
    end = os.fstat(fd).st_size
    data = os.pread(fd, size + 4, end - size - 4) if end >= size + 4 else b""
    if len(data) != size + 4 or google_crc32c.value(data[:size]) != int.from_bytes(data[size:], "little"):
        raise ValueError(f"the shard index of {path.name} does not match its checksum")
    return np.frombuffer(data[:size], dtype="<u8").reshape(chunks, 2)


# ---------------------------------------------------------------- what a worker hands over


@dataclass
class BatchParts:
    """A batch before its views are finished: uint8 pixels and everything gathered from the store."""

    ids: np.ndarray
    pixels: torch.Tensor  # uint8: rendered views (B, 3, S, S) when ``rendered``, else source images (B, C, H, W)
    partners: torch.Tensor | None  # the partners' uint8 pixels where some row mixes (rendered: those the batch
    # lacks, ``partner_index``), else None
    params: np.ndarray
    labels: torch.Tensor
    targets: torch.Tensor
    teacher: dict[str, torch.Tensor]
    rendered: bool
    out_size: int | None
    seed: int
    epoch: int
    row_seeds: np.ndarray | None = None
    recipe: Recipe | None = None  # what finishes in-memory views with photometric ops (``apply_views``)
    partner_index: np.ndarray | None = None  # rendered: each row's partner view in pixels, then partners

    def pin_memory(self) -> BatchParts:
        """Called by the DataLoader's pinning thread (CUDA): page-locked host tensors copy asynchronously."""
        return replace(self, pixels=self.pixels.pin_memory(),
                       partners=self.partners.pin_memory() if self.partners is not None else None,
                       labels=self.labels.pin_memory(), targets=self.targets.pin_memory(),
                       teacher={k: v.pin_memory() for k, v in self.teacher.items()})


class BatchSource(torch.utils.data.Dataset):
    """One epoch's batches for a DataLoader: ``__getitems__(ids)`` builds the ``BatchParts`` of those ids.

    Holds the epoch's label arrays (gathered by numpy indexing; inherited by forked workers without a copy),
    the data set's index and, where the store has them and they are wanted, the feature maps read by rows.
    The arrays are one seed's (``seed``), or under ``--view-order random`` each sample's row from the seed
    ``seeds[seed_index[id]]`` (``seed`` -1), whose feature maps are then read from that seed's own array. With
    ``views_per_image = K`` the batch's keys are ``id * K + j``, view j of sample ``id`` from seed ``seeds[j]``,
    and the arrays are indexed by key; a sample's K views are cropped from one decode (``render_views``)."""

    def __init__(self, dataset: Any, arrays: dict[str, np.ndarray], seed: int, epoch: int, out_size: int | None,
                 draft: bool, num_classes: int, features: dict[int, FeatureRows] | None = None,
                 seed_index: np.ndarray | None = None, seeds: tuple[int, ...] = (), views_per_image: int = 1,
                 recipe: Recipe | None = None):
        self.dataset, self.arrays, self.seed, self.epoch, self.recipe = dataset, arrays, seed, epoch, recipe
        self.out_size, self.draft, self.num_classes, self.features = out_size, draft, num_classes, features
        self.seed_index, self.seeds, self.views_per_image = seed_index, seeds, views_per_image

    def __len__(self) -> int:
        return len(self.dataset) * self.views_per_image  # the keys: ``id * K + j``

    def __getitem__(self, i: int) -> BatchParts:
        return self.__getitems__([i])

    def row_seeds(self, keys: np.ndarray) -> np.ndarray | None:
        """The store seed of each key's view (None: all are ``seed``)."""
        if self.views_per_image > 1:
            return np.asarray(self.seeds, dtype=np.int64)[keys % self.views_per_image]
        if self.seed_index is None:
            return None
        return np.asarray(self.seeds, dtype=np.int64)[self.seed_index[keys]]

    def redraw(self, ids: np.ndarray, row_seeds: np.ndarray | None) -> np.ndarray:
        """The view parameters of ``ids`` drawn again (a store that keeps a digest of them, not them: format 3), each
        under its row's seed: the draw the labeler made (``view_hw``), checked against the store's digests when the
        seed was loaded (``StoreStream.check_views``)."""
        if self.recipe is None:
            raise StoreError("the store keeps no view parameters and the batch source has no recipe to draw them")
        hw, n = view_hw(self.dataset), len(self.dataset)
        if row_seeds is None:
            return draw_views(self.recipe, self.seed, ids, n, hw)
        out = np.empty((len(ids), num_view_params(self.recipe)), dtype=np.float32)
        for s in np.unique(row_seeds):
            rows = np.flatnonzero(row_seeds == s)
            out[rows] = draw_views(self.recipe, int(s), ids[rows], n, hw)
        return out

    def _features(self, features: dict[int, FeatureRows], ids: np.ndarray, row_seeds: np.ndarray | None
                  ) -> np.ndarray:
        if row_seeds is None:
            return features[self.seed].take(ids)
        parts = {int(s): np.flatnonzero(row_seeds == s) for s in np.unique(row_seeds)}
        taken = {s: features[s].take(ids[rows]) for s, rows in parts.items()}
        first = next(iter(taken.values()))
        out = np.empty((len(ids), *first.shape[1:]), dtype=first.dtype)
        for s, rows in parts.items():
            out[rows] = taken[s]
        return out

    def __getitems__(self, keys: Any) -> BatchParts:
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        ids = keys // self.views_per_image
        gathered = {name: np.take(a, keys, axis=0) for name, a in self.arrays.items()}
        row_seeds = self.row_seeds(keys)
        params = gathered.pop("view") if "view" in gathered else self.redraw(ids, row_seeds)
        if self.features is not None:
            gathered["features"] = self._features(self.features, ids, row_seeds)
        partners = partner_ids(params, ids)
        mixing = not np.array_equal(partners, ids)
        partner_index = None
        if self.dataset.in_memory:
            pixels = self.dataset.read(ids)
            partner_pixels = self.dataset.read(partners) if mixing else None
        else:
            size = int(self.out_size or 0)
            own, extra, partner_index = render_batch_pool(self.dataset, ids, params, (size,), self.draft, self.recipe)
            pixels, partner_pixels = own[size], extra[size] if extra is not None else None
        y = self.dataset.labels[ids]
        targets = mixed_targets(y, params, self.dataset.labels[partners], self.num_classes)
        return BatchParts(ids, pixels, partner_pixels, params, torch.from_numpy(y), torch.from_numpy(targets),
                          label_tensors(gathered), not self.dataset.in_memory, self.out_size, self.seed, self.epoch,
                          row_seeds, self.recipe, partner_index)


def view_hw(dataset: Any) -> Any:
    """What ``draw_views`` takes as the images' sizes, as the labeler gave it: an in-memory data set's one
    ``(H, W)``, else each image's own (``dataset.sizes``)."""
    return tuple(dataset.image_shape[1:]) if dataset.in_memory else dataset.sizes


def collate(items: Any) -> BatchParts:
    """The DataLoader's ``collate_fn`` for a ``BatchSource`` (or ``ReplayDataset``): ``__getitems__`` already
    made the batch, which this hands on (a list of one batch, as ``batch_size=None`` gives, is unwrapped)."""
    if isinstance(items, BatchParts):
        return items
    if isinstance(items, list | tuple) and len(items) == 1 and isinstance(items[0], BatchParts):
        return items[0]
    raise TypeError(f"collate: expected the BatchParts that __getitems__ builds, got {type(items).__name__}"
                    f"{f' of {len(items)}' if isinstance(items, list | tuple) else ''} (a dataset wrapper without "
                    "__getitems__, e.g. ConcatDataset, hands over one view at a time: index the ReplayDataset itself)")


def finish(parts: BatchParts, device: torch.device) -> Batch:
    """Move the uint8 batch to ``device`` and build the float views there."""
    async_copy = device.type == "cuda"
    pixels = parts.pixels.to(device, non_blocking=async_copy)
    partners = parts.partners.to(device, non_blocking=async_copy) if parts.partners is not None else None
    if parts.rendered:
        views = mix_views(pixels, partners, parts.params, parts.partner_index)
    else:
        views = apply_views(pixels, parts.params, parts.out_size, partners, parts.recipe)
    return Batch(parts.ids, views, parts.labels.to(device, non_blocking=async_copy),
                 parts.targets.to(device, non_blocking=async_copy),
                 {k: v.to(device, non_blocking=async_copy) for k, v in parts.teacher.items()},
                 parts.params, parts.seed, parts.epoch, parts.row_seeds)


def batch_parts(source: BatchSource, batches: list[np.ndarray], workers: int, pin: bool) -> Iterable[BatchParts]:
    """The batches' parts, built in this process (``workers == 0``) or by ``workers`` forked processes, in order."""
    if workers == 0:
        return (source.__getitems__(ids) for ids in batches)
    if workers < 0:
        raise UsageError(f"--loader-workers {workers}: expected >= 0")
    return torch.utils.data.DataLoader(
        source, batch_sampler=cast(Any, batches), collate_fn=collate, num_workers=workers, pin_memory=pin,
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
