"""Loading from the label store: one seed's arrays in memory, gathered by sample id, views rebuilt per batch.

Epoch ``e`` uses seed ``seeds[e % len(seeds)]``. The seed's label arrays are loaded once (``LabelStore.load``,
about 50 bytes a sample) and every batch is a numpy gather from them; the views are rebuilt from the
*stored* view parameters with one vectorised ``apply_views`` per batch, so the student sees exactly the
pixels the teacher labeled. The order of an epoch is a permutation drawn from ``(shuffle_seed, epoch)``;
with ``world_size > 1`` each rank takes every ``world_size``-th sample of that permutation (the last
``N % world_size`` are left out of that epoch so every rank runs the same number of steps).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from pipelines.datasets import Dataset
from pipelines.errors import UsageError
from pipelines.store import LabelStore, SeedLabels, StoreError
from pipelines.views import COL, MIX_NONE, Recipe, build_views, get_recipe

log = logging.getLogger("stillroom.student")

LABEL_ARRAYS = ("topk_idx", "topk_logit", "lse", "tail_lse", "hard", "sampled", "features")


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

    def to(self, device: torch.device) -> Batch:
        if device.type == "cpu":
            return self
        return Batch(self.ids, self.views.to(device, non_blocking=True), self.labels.to(device),
                     self.targets.to(device), {k: v.to(device) for k, v in self.teacher.items()},
                     self.params, self.seed, self.epoch)


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


def check_store(store: LabelStore, dataset: Dataset, recipe: str | None = None) -> Recipe:
    """Refuse a store made for other data, another split, another class count or another recipe; return the
    recipe to rebuild views with (the store's, unless ``recipe`` names one, which must then match)."""
    prov = store.provenance
    stored_recipe = prov.get("recipe", {})
    expected = {  # most telling first: the error names the first field that differs
        "schema.num_classes": dataset.num_classes,
        "dataset.split": dataset.split,
        "schema.num_samples": len(dataset),
        "dataset.fingerprint": dataset.fingerprint,
    }
    if recipe is not None:
        expected["recipe.name"] = recipe
    store.check(expected)
    name = recipe or stored_recipe.get("name")
    if not name:
        raise StoreError(f"store {store.cache_key} does not record its view recipe")
    current = get_recipe(str(name))
    if current.digest != stored_recipe.get("digest"):
        raise StoreError(f"store {store.cache_key} was made with recipe {name} digest {stored_recipe.get('digest')}; "
                         f"this stillroom's {name} has digest {current.digest} (the recipe changed: relabel)")
    return current


class StoreStream:
    """Batches of views and stored labels, epoch by epoch.

    Args:
        store: the label store (already checked against ``dataset`` with ``check_store``).
        dataset: the data set the store was labeled from.
        recipe: the store's view recipe (only its output size matters: views come from stored params).
        batch_size: samples per batch on this rank.
        seeds: the store seeds to cycle through (default: every complete seed).
        rank, world_size: this worker's shard of each epoch.
        shuffle_seed: seeds the per-epoch permutation.
        drop_last: drop a last batch shorter than ``batch_size``.
    """

    def __init__(self, store: LabelStore, dataset: Dataset, recipe: Recipe, batch_size: int,
                 seeds: tuple[int, ...] | list[int] | None = None, rank: int = 0, world_size: int = 1,
                 shuffle_seed: int = 0, drop_last: bool = False):
        available = store.seeds()
        self.seeds = tuple(int(s) for s in (seeds if seeds else available))
        if not self.seeds:
            raise StoreError(f"store {store.path} has no complete seed: label one first")
        missing = sorted(set(self.seeds) - set(available))
        if missing:
            raise StoreError(f"seeds {missing} are not in store {store.cache_key}: complete seeds are {available}")
        if batch_size < 1:
            raise UsageError(f"batch size {batch_size}: expected >= 1")
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} out of range for world size {world_size}")
        self.store, self.dataset, self.recipe = store, dataset, recipe
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle_seed, self.drop_last = shuffle_seed, drop_last
        self.num_classes = dataset.num_classes
        self._loaded: SeedLabels | None = None
        self._warned = False

    def seed_for_epoch(self, epoch: int) -> int:
        return self.seeds[epoch % len(self.seeds)]

    def warn_if_repeating(self, epochs: int) -> str | None:
        """One line saying that views repeat when there are more epochs than seeds (also logged)."""
        if epochs <= len(self.seeds):
            return None
        msg = (f"{epochs} epochs but the store has {len(self.seeds)} seed(s) {list(self.seeds)}: views repeat "
               f"every {len(self.seeds)} epoch(s); label more seeds to see new views")
        log.warning(msg)
        return msg

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank sees in one epoch."""
        return len(self.dataset) // self.world_size

    def __len__(self) -> int:
        n = self.samples_per_epoch
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def labels_for(self, seed: int) -> SeedLabels:
        """The seed's arrays in memory (one seed held at a time)."""
        if self._loaded is None or self._loaded.seed != seed:
            self._loaded = None
            self._loaded = self.store.load(seed)
        return self._loaded

    def order(self, epoch: int) -> np.ndarray:
        """This rank's sample ids for ``epoch``, in order."""
        rng = np.random.default_rng([self.shuffle_seed, epoch])
        perm = rng.permutation(len(self.dataset))
        per_rank = len(perm) // self.world_size
        return perm[self.rank :: self.world_size][:per_rank]

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of one epoch."""
        seed = self.seed_for_epoch(epoch)
        labels = self.labels_for(seed)
        ids = self.order(epoch)
        for start in range(0, len(ids), self.batch_size):
            batch_ids = ids[start : start + self.batch_size]
            if self.drop_last and len(batch_ids) < self.batch_size:
                break
            yield self.make_batch(labels, batch_ids, epoch)

    def make_batch(self, labels: SeedLabels, ids: np.ndarray, epoch: int = 0) -> Batch:
        """Gather the stored arrays of ``ids`` and rebuild their views from the stored parameters."""
        arrays = labels.gather(ids)
        params = arrays.pop("view")
        views, _ = build_views(self.dataset, self.recipe, labels.seed, ids, params=params)
        y = self.dataset.labels[ids]
        partners = np.where(params[:, COL["mix_mode"]] != MIX_NONE, params[:, COL["partner"]].astype(np.int64), ids)
        targets = mixed_targets(y, params, self.dataset.labels[partners], self.num_classes)
        return Batch(ids, views, torch.from_numpy(y), torch.from_numpy(targets), label_tensors(arrays), params,
                     labels.seed, epoch)
