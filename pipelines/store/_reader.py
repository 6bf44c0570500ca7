"""``SeedReader``: rows of several complete seeds of one store, each seed's arrays opened once.

A reader that takes a few rows of many seeds (a student epoch that replays, for each sample, the view of a seed
drawn at random: ``--view-order random``) would otherwise open a seed's zarr group and arrays for every row
range it reads (``LabelStore.load``: the seed list, every ``COMPLETE``, the group and each array's metadata),
which at ImageNet's 157 chunks and 64 seeds is about 10,000 opens an epoch, 10^5 metadata requests on object
storage. Every seed of a store has the same arrays (``begin_seed`` makes them from the one schema), so the reader
reads the arrays' metadata once, from the first seed it opens, and opens every other seed's arrays from it with
no request (``zarr.Array.from_dict``); the seeds are checked complete once, when the reader is made.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import FsspecStore, LocalStore, StorePath

from stillroom.pipelines.core import StoreError
from stillroom.pipelines.store.label_store import LabelStore, _array


class SeedReader:
    """Rows ``[start, stop)`` of the arrays ``names`` (of ``schema.arrays()``, decoded from the stored ones) of the
    complete ``seeds`` of ``store`` (``rows``)."""

    def __init__(self, store: LabelStore, seeds: Iterable[int], names: Iterable[str]):
        self.store, self.seeds, self.wanted = store, tuple(int(s) for s in seeds), list(names)
        unknown = sorted(set(self.wanted) - set(store.schema.arrays()))
        if unknown:
            raise StoreError(f"store {store.cache_key} has no arrays {unknown}")
        self.names = store.stored_names(self.wanted)  # the arrays on disk they are decoded from (format 3)
        complete = set(store.seeds())  # listed once, for every seed the reader serves
        missing = sorted(set(self.seeds) - complete)
        if missing:
            raise StoreError(f"seeds {missing} are not in {store.path}: complete seeds are "
                             f"{sorted(complete) or 'none'}")
        self._meta: dict[str, dict[str, Any]] = {}  # name -> the array's metadata, the same in every seed
        self._open: tuple[int, dict[str, zarr.Array]] | None = None  # the last seed's arrays: one seed's at a time

    def arrays(self, seed: int) -> dict[str, zarr.Array]:
        """The seed's open arrays (the first seed read reads their metadata, the others none). Only the last seed's
        are kept: an open array holds a few kilobytes whatever the store's size, and a reader of 64 seeds keeps
        no more of them than a reader of one."""
        seed = int(seed)
        if seed not in self.seeds:
            raise StoreError(f"seed {seed} is not one of this reader's {list(self.seeds)}")
        if self._open is None or self._open[0] != seed:
            where = self.store.seed_dir(seed)
            if not self._meta:
                group = zarr.open_group(store=str(where), mode="r", zarr_format=3)
                opened = {name: _array(group, name) for name in self.names}
                self._meta = {name: a.metadata.to_dict() for name, a in opened.items()}
            else:  # a store object rooted at the seed's group: made without a request
                backend = (LocalStore(where, read_only=True) if isinstance(where, Path)
                           else FsspecStore.from_url(where, read_only=True))
                opened = {name: zarr.Array.from_dict(StorePath(backend, name), dict(meta))
                          for name, meta in self._meta.items()}
            self._open = (seed, opened)
        return self._open[1]

    def rows(self, seed: int, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows ``[start, stop)`` of each array of ``seed`` (a StoreError names an array that cannot be read)."""
        out = {}
        for name, array in self.arrays(seed).items():
            try:
                out[name] = np.asarray(array[start:stop])
            except Exception as e:  # a missing, truncated or edited chunk
                raise StoreError(f"seed {seed} array {name}: cannot be read ({type(e).__name__}: {e})") from None
        return self.store.decode(out, self.wanted)


__all__ = ["SeedReader"]
