"""The label store: one zarr group a seed under ``<root>/<cache_key>``, its manifest, the per-seed lease."""

from stillroom.pipelines.core import StoreError
from stillroom.pipelines.store._reader import SeedReader
from stillroom.pipelines.store.convert import convert_store
from stillroom.pipelines.store.label_store import COMPLETE, MANIFEST, LabelStore, SeedLabels, list_stores
from stillroom.pipelines.store.lease import SeedLease
from stillroom.pipelines.store.quality import QualitySums, add_quality
from stillroom.pipelines.store.schema import FORMAT_VERSION, StoreSchema, cache_key
from stillroom.pipelines.store.view_digest import check_views

__all__ = [
    "COMPLETE",
    "FORMAT_VERSION",
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
    "convert_store",
    "check_views",
    "list_stores",
]
