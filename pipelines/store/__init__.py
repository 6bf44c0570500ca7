"""The label store: one zarr group a seed under ``<root>/<cache_key>``, its manifest, the per-seed lease."""

from stillroom.pipelines.core import StoreError
from stillroom.pipelines.store._reader import SeedReader
from stillroom.pipelines.store.label_store import COMPLETE, MANIFEST, LabelStore, SeedLabels, list_stores
from stillroom.pipelines.store.lease import SeedLease
from stillroom.pipelines.store.quality import QualitySums, add_quality
from stillroom.pipelines.store.schema import StoreSchema, cache_key

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
