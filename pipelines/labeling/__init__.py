"""Labeling: the job's config, the teacher's targets, the worker, the view stream, the Ray pool and the job."""

from stillroom.pipelines.labeling.config import LabelConfig, parse_seeds
from stillroom.pipelines.labeling.job import prepare_store, run_labeling
from stillroom.pipelines.labeling.stream import decode_views_torch
from stillroom.pipelines.labeling.targets import pool_features, sample_classes, topk_arrays
from stillroom.pipelines.labeling.worker import Labeler

__all__ = [
    "LabelConfig",
    "Labeler",
    "decode_views_torch",
    "parse_seeds",
    "pool_features",
    "prepare_store",
    "run_labeling",
    "sample_classes",
    "topk_arrays",
]
