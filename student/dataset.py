"""The public face of the student's loader: a label store's epoch as a torch ``Dataset`` for your own loop.

``ReplayDataset`` is one epoch's replayed views with their teacher labels. It is map-style, one item a *view*
(index ``id``, or ``id * K + j`` for view j of sample ``id`` with ``views_per_image = K``), so any sampler works:
``DataLoader(ds, batch_size=B, shuffle=True, num_workers=N, collate_fn=collate)``, a ``DistributedSampler`` or
your own. It is a thin layer over the very pieces stillroom's own trainer uses: ``StoreStream`` picks the seed
and reads the epoch's label arrays, ``BatchSource`` builds a batch (its ``__getitems__``, which the DataLoader
calls with the whole batch's indices), ``finish`` builds the float views on your device. So a view and its
labels have one definition, and a batch built here equals the trainer's batch of the same ids bit for bit.

Why map-style and not iterable: a sampler (shuffle, DDP's shard, yours) then decides the order, and
``__getitems__`` still sees a whole batch, so each image in it is decoded once and each mixing view's partner
is rendered once per batch. What an arbitrary sampler gives up, against the trainer's own order
(``batch_sampler``): the K views of a sample are decoded once only when they share a batch (the trainer puts
them side by side), and a mixing recipe on images on disk renders each partner view on its own (the trainer's
partner runs take it from the batch: about half the decodes). ``batch_sampler(batch_size, rank, world_size)``
hands you the trainer's order when you want both. An iterable dataset would keep them too, but it fixes the
order itself, so it would not work under ``shuffle=True`` or a ``DistributedSampler``.

Views travel as uint8 (``BatchParts``) from the workers; ``finish(parts, device)`` moves them to ``device``
and builds the float views in [0, 1] there (a ``Batch``). Then ``input_config(model, channels).normalize``,
``soft_targets(batch, T)`` and ``mixing(batch)`` give the student's input, the teacher's distribution and the
mixing of each view.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stillroom.pipelines.core import UsageError
from stillroom.pipelines.data import Dataset, load_dataset
from stillroom.pipelines.store import LabelStore
from stillroom.pipelines.views import COL, MIX_NONE, partner_ids
from stillroom.student._loader import Batch, BatchParts, collate, finish
from stillroom.student.data import StoreStream, check_store, replay_note
from stillroom.student.losses import teacher_targets
from stillroom.student.models import InputConfig, resolve_input_config

log = logging.getLogger("stillroom.student")


def resolve_store(store: str, store_root: str | None = None) -> str:
    """``store``: a label store directory or URL, or the cache key of a store under ``store_root`` (a path or a
    URL); returns the store's location."""
    from stillroom.pipelines.core import Location
    from stillroom.pipelines.store import MANIFEST

    if (Location(store) / MANIFEST).is_file():
        return store
    if store_root is not None and "/" not in store and (Location(store_root) / store / MANIFEST).is_file():
        return str(Location(store_root) / store)
    raise UsageError(f"--store {store}: neither a label store directory nor the cache key of a store under "
                     f"--store-root {store_root} (`stillroom store ls {store_root}` lists them)")


def open_store(store: str | LabelStore, store_root: str | None = None) -> LabelStore:
    """A label store, opened by its directory, its URL (``s3://...``) or its cache key under ``store_root``."""
    return store if isinstance(store, LabelStore) else LabelStore(resolve_store(str(store), store_root))


def dataset_of_store(store: LabelStore) -> tuple[str, str, str | None]:
    """The data set a store was labeled from, as its manifest records it: (spec, split, data root)."""
    dataset = store.provenance.get("dataset", {})
    if not dataset.get("spec"):
        raise UsageError(f"store {store.path} does not record the data set it was labeled from: pass --dataset")
    label_config = store.manifest.get("sources", {}).get("label_config", {})
    return str(dataset["spec"]), str(dataset.get("split", "train")), label_config.get("data_root")


class ReplayDataset(torch.utils.data.Dataset):
    """One epoch's replayed views of a label store, with their teacher labels (see the module docstring).

    Args:
        store: a ``LabelStore``, or its directory, URL or cache key (under ``store_root``).
        epoch: the epoch whose views are replayed (``set_epoch`` moves to another).
        dataset: the data set the store was labeled from (default: the one its manifest records, and
            ``data_root`` where its images lie); checked against the store.
        seeds: the store seeds to replay (default: every complete seed); epoch e replays ``seeds[e % S]``.
        view_order: ``cycle`` (seed by epoch) or ``random`` (each sample's view from a seed drawn per epoch).
        views_per_image: K views of each sample an epoch (FKD's multi-crop): items ``id * K + j``.
        features: deliver the teacher feature maps (TaT), read by each batch's rows.
        shuffle_seed: seeds ``view_order="random"``'s draws and ``batch_sampler``'s order.

    Indexing takes a batch: ``ds.__getitems__(indices)`` (what a DataLoader calls) or ``ds[i]`` return the
    ``BatchParts`` of those views, uint8; ``collate`` is the DataLoader's ``collate_fn``; ``finish`` builds the
    ``Batch``. Call ``set_epoch(e)`` before each epoch's iteration, as with a ``DistributedSampler`` (a
    DataLoader with ``persistent_workers=True`` would keep replaying the epoch its workers started with).
    """

    def __init__(self, store: str | LabelStore, epoch: int = 0, *, store_root: str | None = None,
                 dataset: Dataset | str | None = None, split: str | None = None, data_root: str | None = None,
                 seeds: tuple[int, ...] | list[int] | None = None, view_order: str = "cycle",
                 views_per_image: int = 1, features: bool = False, shuffle_seed: int = 0):
        self.store = open_store(store, store_root)
        if dataset is None or isinstance(dataset, str):
            spec, stored_split, stored_root = dataset_of_store(self.store)
            dataset = load_dataset(dataset or spec, split or stored_split, data_root or stored_root)
        self.dataset = dataset
        self.recipe = check_store(self.store, dataset)
        note = replay_note(self.store)
        if note:
            log.warning("%s", note)
        self._options: dict[str, Any] = {"seeds": seeds, "view_order": view_order, "features": features,
                                         "views_per_image": views_per_image, "shuffle_seed": shuffle_seed}
        self.stream = self._stream(views_per_image)
        self.epoch = epoch
        self.source = self.stream.source(self.stream.labels_for_epoch(epoch), epoch)

    def _stream(self, batch_size: int, rank: int = 0, world_size: int = 1, drop_last: bool = False
                ) -> StoreStream:
        return StoreStream(self.store, self.dataset, self.recipe, batch_size, rank=rank, world_size=world_size,
                           drop_last=drop_last, loader_workers=0, **self._options)

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def seeds(self) -> tuple[int, ...]:
        return self.stream.seeds

    @property
    def left_out(self) -> dict[int, str]:
        """Sample ids whose view failed to decode at labeling (``,bad=skip``) and why: their rows hold no label
        (class indices -1); ``batch_sampler`` leaves them out, an index taken by hand must too."""
        return self.stream.left_out

    def set_epoch(self, epoch: int) -> None:
        """Replay ``epoch``'s views: its seed's label arrays replace the last epoch's."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.source = self.stream.source(self.stream.labels_for_epoch(epoch), epoch)

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, indices: Any) -> BatchParts:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"view index out of range [0, {len(self)}): {indices.min()}..{indices.max()}")
        return self.source.__getitems__(indices)

    def __getitem__(self, index: int) -> BatchParts:
        return self.__getitems__([index])

    def batch_sampler(self, batch_size: int, rank: int = 0, world_size: int = 1, drop_last: bool = False
                      ) -> list[np.ndarray]:
        """The trainer's own order of this epoch, cut into this rank's batches (a ``batch_sampler`` for a
        DataLoader): a shuffle drawn from ``(shuffle_seed, epoch)``, a sample's K views side by side, partner runs
        for a mixing recipe on disk (see ``student.data``); the ranks' shares are disjoint."""
        return self._stream(batch_size, rank, world_size, drop_last).batches(self.epoch)


def input_config(model: torch.nn.Module, channels: int) -> InputConfig:
    """How views in [0, 1] become ``model``'s input, as stillroom's trainer normalises them: the student's timm
    data config (mean/std; for a 1-channel data set their averages). ``input_config(m, c).normalize(views)``."""
    return resolve_input_config(model, channels)


def soft_targets(batch: Batch, T: float = 1.0) -> torch.Tensor:
    """The teacher's full distribution ``softmax(t / T)`` ``(B, C)`` of each view in ``batch``, rebuilt from the
    stored top-k and tail (``student.losses.soft_targets_from_topk``), exactly as the ``kd`` method uses it."""
    return teacher_targets(batch.teacher, batch.targets.shape[1], T)


@dataclass(frozen=True)
class Mixing:
    """What a loss needs of mixed views (mixup/cutmix per pair): each view's ``partner`` sample id, ``lam``
    (the weight of the view's own sample: 1 where the view is not mixed; for cutmix the kept area), ``mixed``
    (which views mix) and ``targets``, the mixed ground truth ``lam * onehot(y) + (1 - lam) * onehot(y_partner)``
    ``(B, C)``. The teacher's labels are of the mixed image itself: no mixing is needed on them."""

    partner: np.ndarray
    lam: torch.Tensor
    mixed: torch.Tensor
    targets: torch.Tensor


def mixing(batch: Batch) -> Mixing:
    """The ``Mixing`` of ``batch``'s views (none mixed: partners are the views' own ids, ``lam`` 1)."""
    device = batch.targets.device
    if batch.params is None:
        n = len(batch.ids)
        return Mixing(np.asarray(batch.ids), torch.ones(n, device=device), torch.zeros(n, dtype=torch.bool,
                      device=device), batch.targets)
    mixed = batch.params[:, COL["mix_mode"]] != MIX_NONE
    lam = np.where(mixed, batch.params[:, COL["lam"]], 1.0).astype(np.float32)
    return Mixing(partner_ids(batch.params, np.asarray(batch.ids)), torch.from_numpy(lam).to(device),
                  torch.from_numpy(mixed).to(device), batch.targets)


__all__ = ["Batch", "BatchParts", "InputConfig", "Mixing", "ReplayDataset", "collate", "dataset_of_store", "finish",
           "input_config", "mixing", "open_store", "resolve_store", "soft_targets"]
