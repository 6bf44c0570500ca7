"""The training recipe teacher and student share (timm's optimizer, schedule, EMA, precision), and accuracy."""

from stillroom.pipelines.training.accuracy import eval_subset, top1_top5, topk_hits
from stillroom.pipelines.training.recipe import (
    RecipeOptions,
    TrainingRecipe,
    amp_dtype,
    input_format,
    precision_name,
    prepare_model,
    resolve_device,
    resolve_lr,
    to_memory_format,
)

__all__ = [
    "RecipeOptions",
    "TrainingRecipe",
    "amp_dtype",
    "eval_subset",
    "input_format",
    "precision_name",
    "prepare_model",
    "resolve_device",
    "resolve_lr",
    "to_memory_format",
    "top1_top5",
    "topk_hits",
]
