"""Data sets as an index, not pixels: the in-memory ones, image folders and Parquet shards, the index cache,
shard staging.
"""

from stillroom.pipelines.data.datasets import (
    DATASET_HELP,
    FASHION_MNIST_DIR,
    DataError,
    Dataset,
    DatasetSpec,
    ImageFolder,
    ParquetShards,
    Synthetic,
    load_dataset,
    open_eval_split,
)
from stillroom.pipelines.data.holdout import holdout_mask, string_hashes
from stillroom.pipelines.data.index_cache import INDEX_CACHE_ENV, use_index_cache
from stillroom.pipelines.data.strings import pack_strings

__all__ = [
    "DATASET_HELP",
    "DataError",
    "Dataset",
    "DatasetSpec",
    "FASHION_MNIST_DIR",
    "INDEX_CACHE_ENV",
    "ImageFolder",
    "ParquetShards",
    "Synthetic",
    "holdout_mask",
    "load_dataset",
    "open_eval_split",
    "pack_strings",
    "string_hashes",
    "use_index_cache",
]
