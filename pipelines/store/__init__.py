"""The label store: one zarr group a seed under ``<root>/<cache_key>``, its manifest, the per-seed lease."""

from stillroom.pipelines.store._reader import SeedReader
from stillroom.pipelines.store._store import (
    COMPLETE,
    MANIFEST,
    LabelStore,
    QualitySums,
    SeedLabels,
    SeedLease,
    StoreError,
    StoreSchema,
    add_quality,
    cache_key,
    list_stores,
)

__all__ = [
    "COMPLETE",
    "LabelStore",
    "MANIFEST",
    "QualitySums",
    "SeedLabels",
    "SeedLease",
    "SeedReader",
    "StoreError",
    "StoreSchema",
    "add_quality",
    "cache_key",
    "list_stores",
]
