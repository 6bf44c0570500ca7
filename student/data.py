"""Loading from the label store: one seed's arrays in memory, gathered by sample id, views rebuilt per batch.

Epoch ``e`` uses seed ``seeds[e % len(seeds)]`` (``view_order="cycle"``), or each sample's view from one of
the seeds drawn at random per epoch and sample (``"random"``, ml-dr's). The label arrays are loaded once an
epoch (``read_labels``, about 50 bytes a sample; teacher feature maps stay on disk and are read by the batch's
rows) and every batch is a numpy gather from them; the views are rebuilt from the *stored* view parameters, so
the student sees exactly the pixels the teacher labeled. Batches are built by ``loader_workers`` processes
(``student._loader``: a DataLoader whose batch sampler is the epoch's order) as uint8 and finished on the
training device. The order of an epoch is a permutation of the whole split drawn from ``(shuffle_seed, epoch)``,
whatever arrays are read (on ids sorted by class, anything less leaves batches of a few classes); with
``world_size > 1`` each rank takes every ``world_size``-th sample of that permutation (the last
``N % world_size`` are left out of that epoch so every rank runs the same number of steps) and reads only those
samples' images.

One exception, where it saves work: a recipe that mixes, replayed in seed order (one seed an epoch, one view a
sample) from images on disk. A mixing view's partner is the next sample along the seed's cyclic order of the split
(``pipelines.views.partners_of``), and its partner view is that sample's own view under the same seed. So the epoch
is that cycle cut into runs of ``batch_size`` consecutive samples (``partner_run_order``): each batch holds its
views' partners but the last one's, renders ``batch_size + 1`` views instead of ``2 * batch_size`` and takes each
partner view from the batch (``pipelines.views.in_batch_partners``: bit-identical to rendering it alone). DeiT
mixes every pair, so that halves the decodes and RandAugments of a ``deit`` epoch (timm mixes within the batch and
renders none). Alternatives weighed: timm's batch-level mixing (flip the batch) would make a view depend on its
batch, which the store's per-pair views exclude; a cache of rendered views across batches would need the partner's
batch in the same worker at the same time, which a shuffled epoch does not give. A run is a pseudo-random subset
of the split (the cycle is a keyed permutation), as class-balanced as a shuffle's batch (tests/student: at
ImageNet's 1.28 M class-sorted ids); the cut offset and the runs' order are drawn from ``(shuffle_seed, epoch)``.
What it gives up: a sample and its partner always share a batch, and when a seed comes round again (epoch e and
e + S) the batches are the same runs cut at another offset. ``--view-order random`` and ``--views-per-image K > 1``
take rows from several seeds, whose cycles differ: they keep the shuffle and render each partner view; in-memory
data too (its partners are source images cropped on the device, cheap).
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from stillroom.pipelines.core import UsageError
from stillroom.pipelines.data import Dataset
from stillroom.pipelines.store import LabelStore, SeedLabels, SeedReader, StoreError, check_views
from stillroom.pipelines.views import Recipe, get_recipe, output_size, partner_cycle
from stillroom.student._loader import (
    LABEL_ARRAYS,
    Batch,
    BatchSource,
    FeatureRows,
    batch_parts,
    default_loader_workers,
    finish,
    label_tensors,
    mixed_targets,
    on_device,
    usable_cores,
    view_hw,
)

log = logging.getLogger("stillroom.student")
VIEW_ORDERS = ("cycle", "random")
GATHER_ROWS = 1 << 17  # --view-order random: the rows of one seed read at once (a few MB at k = 10)


def _check_same_data(store: LabelStore, dataset: Dataset) -> None:
    """Refuse a store labeled on other data, saying what differs in a person's words: the data set's name, split,
    number of images and classes, or, where those agree, that the images or labels themselves differ."""
    made = store.provenance.get("dataset", {})
    theirs = (made.get("spec"), made.get("split"), store.schema.num_samples, store.schema.num_classes)
    ours = (dataset.spec, dataset.split, len(dataset), dataset.num_classes)
    if made.get("fingerprint") == dataset.fingerprint and theirs[1:] == ours[1:]:
        return

    def said(spec: object, split: object, n: int, classes: int) -> str:
        return f"{spec} ({split} split, {n:,} images, {classes} classes)"

    labels = ["split", "number of images", "number of classes"]
    differ = [name for name, a, b in zip(labels, theirs[1:], ours[1:], strict=True) if a != b]
    why = (("the " + " and the ".join(differ) + (" differ" if len(differ) > 1 else " differs")) if differ
           else "the same split and sizes, other images or labels")
    raise StoreError(f"store {store.cache_key} was labeled on {said(*theirs)}; this run reads {said(*ours)}: {why}")


def check_store(store: LabelStore, dataset: Dataset, recipe: str | None = None) -> Recipe:
    """Refuse a store made for other data, another split, another class count or another recipe; return the
    recipe to rebuild views with (the store's, unless ``recipe`` names one, which must then match)."""
    prov = store.provenance
    stored_recipe = prov.get("recipe", {})
    _check_same_data(store, dataset)
    if recipe is not None:
        store.check({"recipe.name": recipe})
    name = recipe or stored_recipe.get("name")
    if not name:
        raise StoreError(f"store {store.cache_key} does not record its view recipe")
    current = get_recipe(str(name))
    if current.digest != stored_recipe.get("digest"):
        raise StoreError(f"store {store.cache_key} was made with recipe {name} digest {stored_recipe.get('digest')}; "
                         f"this stillroom's {name} has digest {current.digest} (the recipe changed: relabel)")
    return current


def replay_note(store: LabelStore) -> str | None:
    """One line where the store's teacher saw other pixels than a student replays: views decoded on the GPU
    (``label --decode gpu``: nvJPEG and roi_align, recorded in the provenance and the key) where every student
    decodes with PIL; None where they are the same views."""
    decode = store.provenance.get("labels", {}).get("decode")
    if not decode:
        return None
    return (f"store {store.cache_key} was labeled on views decoded by {decode} (label --decode gpu); this run "
            "replays PIL's views of the same parameters, about a grey level apart, so its teacher labels describe "
            "slightly other pixels (label with --decode cpu for the very pixels)")


class StoreStream:
    """Batches of views and stored labels, epoch by epoch.

    Args:
        store: the label store (already checked against ``dataset`` with ``check_store``).
        dataset: the data set the store was labeled from.
        recipe: the store's view recipe (its output size, draft decoding, filter and photometric ops matter:
            the views come from the stored params).
        batch_size: samples per batch on this rank.
        seeds: the store seeds to cycle through (default: every complete seed).
        rank, world_size: this worker's shard of each epoch; a rank reads only its own ids.
        shuffle_seed: seeds the per-epoch permutation.
        drop_last: drop a last batch shorter than ``batch_size``.
        loader_workers: processes that build batches (``None``: ``default_loader_workers``; 0: this process).
        device: where batches are finished (views built from uint8) and handed over (default: CPU).
        features: deliver the teacher feature maps (default: when the store has them), read by the batch's rows.
        view_order: which stored view an epoch replays: ``cycle`` (epoch e: seed ``seeds[e % S]``) or
            ``random`` (ml-dr's: for each epoch and sample, one of the seeds at random: ``seed_index``).
        views_per_image: K views of each sample in a batch (FKD's multi-crop), from the seeds ``view_seeds``:
            a batch of ``batch_size`` views holds ``batch_size / K`` images, each decoded once for its K crops.
    """

    def __init__(self, store: LabelStore, dataset: Dataset, recipe: Recipe, batch_size: int,
                 seeds: tuple[int, ...] | list[int] | None = None, rank: int = 0, world_size: int = 1,
                 shuffle_seed: int = 0, drop_last: bool = False, loader_workers: int | None = None,
                 device: torch.device | str | None = None, features: bool | None = None,
                 view_order: str = "cycle", views_per_image: int = 1):
        if view_order not in VIEW_ORDERS:
            raise UsageError(f"view order {view_order!r}: expected one of {', '.join(VIEW_ORDERS)}")
        if views_per_image < 1 or batch_size % views_per_image:
            raise UsageError(f"--views-per-image {views_per_image}: expected >= 1 and a divisor of the batch size "
                             f"{batch_size}")
        if views_per_image > 1 and view_order != "cycle":
            raise UsageError("--views-per-image > 1 takes the seeds in order: use --view-order cycle")
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
        if loader_workers is not None and loader_workers < 0:
            raise UsageError(f"--loader-workers {loader_workers}: expected >= 0 (0: batches built in the "
                             "training process)")
        has_features = "features" in store.schema.arrays()
        if features and not has_features:
            raise StoreError(f"store {store.cache_key} holds no teacher feature maps")
        self.store, self.dataset, self.recipe = store, dataset, recipe
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle_seed, self.drop_last = shuffle_seed, drop_last
        self.num_classes = dataset.num_classes
        self.out_size = output_size(recipe, dataset)
        self.loader_workers = (default_loader_workers(dataset.in_memory, world_size) if loader_workers is None
                               else loader_workers)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.features = has_features if features is None else features
        self.view_order, self.views_per_image = view_order, views_per_image
        if views_per_image > len(self.seeds):
            raise UsageError(f"--views-per-image {views_per_image}: the run has {len(self.seeds)} seed(s); each view "
                             "of an image comes from a seed of its own")
        # ,bad=skip at labeling: the ids whose view under some seed of the run failed to decode (their rows hold
        # no label), left out of every epoch, and why (the first seed's reason)
        self.left_out = left_out_of(store, self.seeds)
        self._left_out = np.fromiter(sorted(self.left_out), dtype=np.int64, count=len(self.left_out))
        self._loaded: SeedLabels | None = None
        self._reader: SeedReader | None = None  # view_order="random": the seeds' arrays, opened once
        self._warned = False
        self._views_checked: set[int] = set()

    def seed_for_epoch(self, epoch: int) -> int | None:
        """The store seed every view of ``epoch`` comes from (None under ``view_order="random"``: each sample's)."""
        if self.view_order != "cycle" or self.views_per_image > 1:
            return None
        return self.seeds[epoch % len(self.seeds)]

    def view_seeds(self, epoch: int) -> tuple[int, ...]:
        """In seed order, the seeds of the K views of each sample in ``epoch``: ``seeds[(e K + j) % S]``."""
        k = self.views_per_image
        return tuple(self.seeds[(epoch * k + j) % len(self.seeds)] for j in range(k))

    def seed_index(self, epoch: int) -> np.ndarray:
        """``view_order="random"``: for each sample id, the index in ``seeds`` of the stored view ``epoch`` replays,
        uniform, drawn from ``(shuffle_seed, epoch)`` and the id (the id-th draw): the same on every rank."""
        rng = np.random.default_rng([self.shuffle_seed, epoch, 1])
        return rng.integers(0, len(self.seeds), len(self.dataset), dtype=np.uint8 if len(self.seeds) <= 256
                            else np.int32)

    def distinct_views(self, epochs: int) -> float:
        """How many distinct stored views of a sample ``epochs`` epochs replay: ``min(epochs, S)`` in seed order;
        at random, on average ``S * (1 - (1 - 1/S)^epochs)``."""
        s = len(self.seeds)
        if self.view_order == "cycle":
            return float(min(epochs * self.views_per_image, s))
        return s * (1 - (1 - 1 / s) ** epochs)

    def warn_if_repeating(self, epochs: int) -> str | None:
        """One line saying that views repeat when there are more epochs than seeds, and how many distinct views
        of each sample the run sees (returned, not logged: the caller says it once)."""
        s = len(self.seeds)
        if self.view_order == "random":
            msg = (f"{epochs} epochs, each sample's view drawn at random among {s} seed(s) {list(self.seeds)}: "
                   f"about {self.distinct_views(epochs):.1f} distinct views of each sample")
            return msg if epochs > 1 else None
        k = self.views_per_image
        if epochs * k <= s:
            return None
        each = f" of {k} views" if k > 1 else ""
        msg = (f"{epochs} epochs{each} but the store has {s} seed(s) {list(self.seeds)}: views repeat "
               f"every {s / k:g} epoch(s); label more seeds to see new views")
        return msg  # the caller says it once (the trainer: "stillroom: note:"), not a log line as well

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank sees in one epoch (those ``left_out`` aside)."""
        return (len(self.dataset) - len(self.left_out)) // self.world_size

    def __len__(self) -> int:
        n, per_batch = self.samples_per_epoch, self.batch_size // self.views_per_image
        return n // per_batch if self.drop_last else -(-n // per_batch)

    def labels_for(self, seed: int) -> SeedLabels:
        """The seed's label arrays in memory (one seed held at a time), feature maps left on disk: about 50 bytes
        a sample, gathered by numpy indexing (``features``, about 2 KB a sample, are read by the batch's rows)."""
        if self._loaded is None or self._loaded.seed != seed:
            self._loaded = None
            self.check_views((seed,))
            self._loaded = read_labels(self.store, seed)
        return self._loaded

    def check_views(self, seeds: tuple[int, ...], share: tuple[int, int] | None = None) -> None:
        """A store that keeps a digest of its views, not the views (format 3 on): check, once a seed, that this
        stillroom draws what was labeled (``pipelines.store.check_views``: the first rows of every chunk), or refuse
        in one line. ``share=(i, S)``: the seed is the i-th of S read together (a random-order epoch), which share
        the chunks' checks (64 seeds of ImageNet: 3,500 rows redrawn instead of 160,000, 1 s of CPU under the GIL
        before, issue 32). A drawing that changed differs on every row of every seed; each chunk's sizes are still
        checked once."""
        if self.store.schema.views_stored:
            return
        for seed in seeds:
            if seed not in self._views_checked:
                check_views(self.store.view_record(seed), f"store {self.store.cache_key}", self.recipe, seed,
                            len(self.dataset), self.store.schema.chunk_rows, view_hw(self.dataset), share=share)
                self._views_checked.add(seed)

    def labels_for_epoch(self, epoch: int) -> SeedLabels:
        """The label arrays ``epoch`` reads: one seed's (in seed order), or at random each sample's row from the
        seed ``seed_index`` picks, gathered seed by seed a block of ``GATHER_ROWS`` rows at a time (whole chunks),
        keeping the rows taken from it: besides the epoch's arrays, one block of one seed is held at a time, whatever
        the seed count, and each seed's arrays are opened once a run (``SeedReader``, issue 32)."""
        seed = self.seed_for_epoch(epoch)
        if seed is not None:
            return self.labels_for(seed)
        self._loaded = None  # the epoch's arrays replace the last epoch's before any seed is read
        if self.views_per_image > 1:
            self.check_views(self.seeds)
            return self._views_labels(epoch)
        index = self.seed_index(epoch)
        shapes = self.store.schema.arrays()
        merged = {name: np.empty(shapes[name][0], dtype=shapes[name][1]) for name in label_names(self.store)}
        if self._reader is None:  # the stream's seeds were found complete when it was made
            self._reader = SeedReader(self.store, self.seeds, list(merged), complete=self.seeds)
        reader = self._reader
        rows = self.store.schema.chunk_rows
        block = rows * max(1, GATHER_ROWS // rows)
        by_seed = np.argsort(index, kind="stable")  # the ids of seed i, ascending: by_seed[bounds[i]:bounds[i + 1]]
        bounds = np.searchsorted(index[by_seed], np.arange(len(self.seeds) + 1))

        def gather(i: int) -> None:  # seed i's views checked, its rows of the epoch read into rows no other seed's
            self.check_views((self.seeds[i],), share=(i, len(self.seeds)))
            ids = by_seed[bounds[i] : bounds[i + 1]]
            for start in range(0, len(index), block):
                lo, hi = np.searchsorted(ids, (start, start + block))
                if hi > lo:
                    taken = ids[lo:hi]
                    for name, a in reader.rows(self.seeds[i], start, min(start + block, len(index)),
                                               taken - start).items():
                        merged[name][taken] = a

        for s in self.seeds:  # opened here, once a run: the threads below only read
            reader.arrays(s)
        # Blosc decodes outside the GIL: a thread a core reads the seeds side by side (an epoch at 64 seeds of
        # ImageNet decodes every chunk of every seed, 2.9 GB at top-10: bench/view_order.py)
        with ThreadPoolExecutor(max(1, min(usable_cores(), len(self.seeds)))) as pool:
            list(pool.map(gather, range(len(self.seeds))))
        return SeedLabels(-1, merged)

    def _views_labels(self, epoch: int) -> SeedLabels:
        """``views_per_image = K``: the K seeds' arrays of ``epoch`` interleaved, row ``id * K + j`` holding view j of
        sample ``id`` (K seeds' labels in memory, as FKD keeps K crops an image)."""
        k, merged = self.views_per_image, {}
        for j, seed in enumerate(self.view_seeds(epoch)):
            for name, a in read_labels(self.store, seed).arrays.items():
                if name not in merged:
                    merged[name] = np.empty((len(a) * k, *a.shape[1:]), dtype=a.dtype)
                merged[name][j::k] = a
        return SeedLabels(-1, merged)

    def feature_rows(self, seed: int | None) -> dict[int, FeatureRows] | None:
        """The feature maps of ``seed`` (None: of every seed of the stream), read by the batch's rows; None when
        the stream does not deliver them."""
        if not self.features:
            return None
        return {s: FeatureRows(self.store.seed_dir(s)) for s in (self.seeds if seed is None else (seed,))}

    @property
    def partner_runs(self) -> bool:
        """Whether an epoch's batches are runs of the seed's partner cycle (``partner_run_order``; see the module
        docstring): a mixing recipe in seed order, one view a sample, images on disk."""
        return (self.recipe.mixes and self.view_order == "cycle" and self.views_per_image == 1
                and not self.dataset.in_memory and len(self.dataset) >= 2)

    def order(self, epoch: int) -> np.ndarray:
        """This rank's sample ids for ``epoch``, in order: a permutation of the whole split drawn from
        ``(shuffle_seed, epoch)``, this rank's share of it (``partner_runs``: the epoch seed's partner cycle cut
        into runs of ``batch_size``, ``partner_run_order``), the ids ``left_out`` taken out before it is shared."""
        seed = self.seed_for_epoch(epoch)
        if self.partner_runs and seed is not None:
            return partner_run_order(self.recipe, seed, len(self.dataset), self.batch_size, self.shuffle_seed, epoch,
                                     self.rank, self.world_size, self._left_out)
        perm = np.random.default_rng([self.shuffle_seed, epoch]).permutation(len(self.dataset))
        if self._left_out.size:
            perm = perm[~np.isin(perm, self._left_out)]
        per_rank = len(perm) // self.world_size
        return perm[self.rank :: self.world_size][:per_rank]

    def batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's order cut into this rank's batches (the DataLoader's batch sampler). With ``views_per_image
        = K`` a batch holds ``batch_size / K`` samples, each K times in a row, as view keys ``id * K + j``."""
        ids, k = self.order(epoch), self.views_per_image
        per_batch = self.batch_size // k
        out = [ids[start : start + per_batch] for start in range(0, len(ids), per_batch)]
        if self.drop_last and out and len(out[-1]) < per_batch:
            out.pop()
        if k > 1:
            out = [np.repeat(b, k) * k + np.tile(np.arange(k), len(b)) for b in out]
        return out

    def source(self, labels: SeedLabels, epoch: int = 0) -> BatchSource:
        """What builds a batch from its ids, in this process or in a loader worker."""
        if labels.seed >= 0:
            return BatchSource(self.dataset, labels.arrays, labels.seed, epoch, self.out_size, self.recipe.draft,
                               self.num_classes, self.feature_rows(labels.seed), recipe=self.recipe)
        if self.views_per_image > 1:
            return BatchSource(self.dataset, labels.arrays, -1, epoch, self.out_size, self.recipe.draft,
                               self.num_classes, self.feature_rows(None), None, self.view_seeds(epoch),
                               self.views_per_image, recipe=self.recipe)
        return BatchSource(self.dataset, labels.arrays, -1, epoch, self.out_size, self.recipe.draft,
                           self.num_classes, self.feature_rows(None), self.seed_index(epoch), self.seeds,
                           recipe=self.recipe)

    def epoch(self, epoch: int) -> Generator[Batch, None, None]:
        """The batches of one epoch, finished on the stream's device, built by ``loader_workers`` processes."""
        source = self.source(self.labels_for_epoch(epoch), epoch)
        parts = batch_parts(source, self.batches(epoch), self.loader_workers, pin=self.device.type == "cuda")
        yield from on_device(parts, self.device)

    def make_batch(self, labels: SeedLabels, ids: np.ndarray, epoch: int = 0) -> Batch:
        """Gather the stored arrays of ``ids`` and rebuild their views from the stored parameters (on CPU)."""
        return finish(self.source(labels, epoch).__getitems__(ids), torch.device("cpu"))


def partner_run_order(recipe: Recipe, seed: int, num_samples: int, batch_size: int, shuffle_seed: int, epoch: int,
                      rank: int = 0, world_size: int = 1, left_out: np.ndarray | None = None) -> np.ndarray:
    """This rank's ids of an epoch as runs of ``batch_size`` consecutive samples of the partner cycle of
    (recipe, seed) (``pipelines.views.partner_cycle``): the cycle rotated by an offset drawn from
    ``(shuffle_seed, epoch)``, cut into ``world_size`` arcs of ``N // world_size`` (the last ``N % world_size``
    left out, as the shuffle leaves them), this rank's arc cut into runs from its start, the full runs in an order
    drawn from the same generator and a shorter one last. Cut into batches of ``batch_size`` (``StoreStream.
    batches``), every batch is a run: each sample's partner is the next sample of its batch, but the last's.
    ``left_out`` (ids of views that failed to decode, ``,bad=skip``) are taken out of the cycle before it is cut."""
    if batch_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"batch size {batch_size}, rank {rank} of {world_size}: expected >= 1 and 0 <= rank < "
                         "world size")
    rng = np.random.default_rng([shuffle_seed, epoch, 2])
    cycle = np.roll(partner_cycle(recipe, seed, num_samples), -int(rng.integers(max(num_samples, 1))))
    if left_out is not None and left_out.size:
        cycle = cycle[~np.isin(cycle, left_out)]
    per_rank = len(cycle) // world_size
    arc = cycle[rank * per_rank : (rank + 1) * per_rank]
    full = per_rank // batch_size
    runs = arc[: full * batch_size].reshape(full, batch_size)[rng.permutation(full)]
    return np.concatenate([runs.reshape(-1), arc[full * batch_size :]])


def left_out_of(store: LabelStore, seeds: tuple[int, ...] | list[int]) -> dict[int, str]:
    """The sample ids a run of ``seeds`` leaves out of every epoch and why: those whose view under any of the seeds
    failed to decode at labeling (``,bad=skip``: their rows hold no label), the first such seed's reason."""
    out: dict[int, str] = {}
    for seed in reversed(tuple(seeds)):
        out.update(store.skipped(seed))
    return dict(sorted(out.items()))


def read_labels(store: LabelStore, seed: int) -> SeedLabels:
    """What the student reads of a complete seed: the view parameters and the label arrays it trains on, not
    ``features`` (read by the batch's rows: ``FeatureRows``) nor an ensemble's per-member arrays."""
    return store.load(seed, label_names(store))


def label_names(store: LabelStore) -> list[str]:
    """The arrays of a seed the student holds in memory (``read_labels``)."""
    wanted = {"view", *LABEL_ARRAYS} - {"features"}  # "view": where stored (else redrawn a batch)
    return [name for name in store.schema.arrays() if name in wanted]


__all__ = ["Batch", "StoreStream", "check_store", "label_tensors", "left_out_of", "mixed_targets", "partner_run_order",
           "read_labels", "replay_note"]
