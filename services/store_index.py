"""What the service knows of the label stores under its store root, kept in memory.

A cache-hit submission asks this index, not the disk: the index is filled by one scan at start, brought
up to date for a store when a label job of this service ends (``reload``), and rescanned now and then in
the background for stores made outside the service (``stillroom label``). The root may be a URL: only the
scan and reloads (the background thread, a label job's end) read the object store, never a cache hit.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from stillroom.pipelines.core import Location
from stillroom.pipelines.store import LabelStore, StoreError, list_stores


@dataclass(frozen=True)
class StoreEntry:
    cache_key: str
    seeds: frozenset[int]  # the complete seeds
    samples: int
    dataset: str | None  # the data set spec the store was labeled on

    @classmethod
    def of(cls, store: LabelStore) -> StoreEntry:
        return cls(cache_key=store.cache_key, seeds=frozenset(store.seeds()), samples=store.schema.num_samples,
                   dataset=store.provenance.get("dataset", {}).get("spec"))


class StoreIndex:
    def __init__(self, root: str):
        self.root = root
        self._entries: dict[str, StoreEntry] = {}
        self._lock = threading.Lock()

    def scan(self) -> None:
        """Read every store's manifest and complete seeds (at start, then in the background)."""
        entries = {s.cache_key: StoreEntry.of(s) for s in list_stores(self.root)}
        with self._lock:
            self._entries = entries

    def reload(self, cache_key: str) -> StoreEntry | None:
        """Read one store again (its label job ended, or a submission needs seeds the index lacks)."""
        try:
            entry: StoreEntry | None = StoreEntry.of(LabelStore(Location(self.root) / cache_key))
        except StoreError:
            entry = None
        with self._lock:
            if entry is None:
                self._entries.pop(cache_key, None)
            else:
                self._entries[cache_key] = entry
        return entry

    def get(self, cache_key: str) -> StoreEntry | None:
        return self._entries.get(cache_key)

    def has_seeds(self, cache_key: str, seeds: list[int]) -> bool:
        entry = self._entries.get(cache_key)
        return entry is not None and entry.seeds.issuperset(seeds)
