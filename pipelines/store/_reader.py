"""``SeedReader``: rows of several complete seeds of one store, each seed's arrays opened once.

A reader that takes a few rows of many seeds (a student epoch that replays, for each sample, the view of a seed
drawn at random: ``--view-order random``) would otherwise open a seed's zarr group and arrays for every row
range it reads (``LabelStore.load``: the seed list, every ``COMPLETE``, the group and each array's metadata),
which at ImageNet's 157 chunks and 64 seeds is about 10,000 opens an epoch, 10^5 metadata requests on object
storage. Every seed of a store has the same arrays (``begin_seed`` makes them from the one schema), so the reader
reads the arrays' metadata once, from the first seed it opens, and opens every other seed's arrays from it with
no request (``zarr.Array.from_dict``); the seeds are checked complete once, when the reader is made, and each
seed's open arrays are kept for the reader's life (S x arrays handles of a few kilobytes each, whatever the
store's size: handles, not the arrays' contents).

On S3 a chunk is one GET: s3fs (2025.x on) sends a HEAD before each whole-object read to decide whether to split
it into concurrent ranges (objects over its 50 MB block size), so the reader's filesystem reads with
``max_concurrency=1``; a label chunk is a few hundred kilobytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore, StorePath

from stillroom.pipelines.core import StoreError
from stillroom.pipelines.store.label_store import DirectLayout, LabelStore, _array, direct_layout, read_rows

_ONE_GET = {"s3": {"max_concurrency": 1}, "s3a": {"max_concurrency": 1}}  # protocol -> options: no HEAD a chunk


def read_only_store(where: Path | str) -> Store:
    """A read-only zarr store rooted at ``where`` (a local path or a URL), made without a request."""
    if isinstance(where, Path):
        return LocalStore(where, read_only=True)
    options = _ONE_GET.get(where.partition("://")[0], {})
    return FsspecStore.from_url(where, storage_options=dict(options), read_only=True)


class SeedReader:
    """Rows ``[start, stop)`` of the arrays ``names`` (of ``schema.arrays()``, decoded from the stored ones) of the
    complete ``seeds`` of ``store`` (``rows``). ``complete``: seeds the caller has already found complete (a
    ``COMPLETE`` marker is never taken back), which spares the reader listing them again."""

    def __init__(self, store: LabelStore, seeds: Iterable[int], names: Iterable[str],
                 complete: Iterable[int] | None = None):
        self.store, self.seeds, self.wanted = store, tuple(int(s) for s in seeds), list(names)
        unknown = sorted(set(self.wanted) - set(store.schema.arrays()))
        if unknown:
            raise StoreError(f"store {store.cache_key} has no arrays {unknown}")
        self.names = store.stored_names(self.wanted)  # the arrays on disk they are decoded from (format 3)
        known = set(int(s) for s in complete) if complete is not None else set()
        if not set(self.seeds) <= known:
            known = set(store.seeds())  # listed once, for every seed the reader serves
        missing = sorted(set(self.seeds) - known)
        if missing:
            raise StoreError(f"seeds {missing} are not in {store.path}: complete seeds are "
                             f"{sorted(known) or 'none'}")
        self._meta: dict[str, dict[str, Any]] = {}  # name -> the array's metadata, the same in every seed
        self._open: dict[int, dict[str, zarr.Array]] = {}  # seed -> its open arrays, for the reader's life
        self._layouts: dict[tuple[int, str], DirectLayout | None] = {}  # (seed, name) -> how read_rows reads it
        self.opens = 0  # seeds opened so far: at most one each

    def arrays(self, seed: int) -> dict[str, zarr.Array]:
        """The seed's open arrays: opened on first use (the first seed read reads their metadata, the others
        none) and kept."""
        seed = int(seed)
        if seed not in self.seeds:
            raise StoreError(f"seed {seed} is not one of this reader's {list(self.seeds)}")
        if seed not in self._open:
            backend = read_only_store(self.store.seed_dir(seed))
            if not self._meta:
                group = zarr.open_group(store=backend, mode="r", zarr_format=3)
                opened = {name: _array(group, name) for name in self.names}
                self._meta = {name: a.metadata.to_dict() for name, a in opened.items()}
            else:  # rooted at the seed's group: made without a request
                opened = {name: zarr.Array.from_dict(StorePath(backend, name), dict(meta))
                          for name, meta in self._meta.items()}
            self._open[seed] = opened
            self.opens += 1
        return self._open[seed]

    def rows(self, seed: int, start: int, stop: int, take: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Rows ``[start, stop)`` of each array of ``seed``, or of them only the rows ``take`` (offsets from
        ``start``), which are all that is decoded (a StoreError names an array that cannot be read)."""
        out = {}
        for name, array in self.arrays(seed).items():
            if (seed, name) not in self._layouts:
                self._layouts[(seed, name)] = direct_layout(array)
            try:
                out[name] = read_rows(array, self._layouts[(seed, name)], start, stop, take)
            except Exception as e:  # a missing, truncated or edited chunk
                raise StoreError(f"seed {seed} array {name}: cannot be read ({type(e).__name__}: {e})") from None
        return self.store.decode(out, self.wanted)


__all__ = ["SeedReader"]
