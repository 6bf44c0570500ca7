"""The labeling job's options (``LabelConfig``): one definition from which ``stillroom label``, its config file and
``POST /v1/label-jobs`` come.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from stillroom.pipelines.core import UsageError, check_options, option
from stillroom.pipelines.data import DATASET_HELP, INDEX_CACHE_ENV
from stillroom.pipelines.teachers import (
    INTERPOLATIONS,
)
from stillroom.pipelines.views import (
    get_recipe,
)

# teacher_dtype=auto: fp32 on every device. bench/precision.py (README, "Teacher precision"): under bf16 autocast
# the targets of a ResNet-50 and a ViT-B/16 with ImageNet-sized logits move by more than 0.01 total variation from
# fp32's at T = 1 (within it at T = 4); bf16 stays available, and keyed, as --teacher-dtype bf16
AUTO_DTYPE = {"cpu": "fp32", "cuda": "fp32"}


AUTO_DTYPE_HELP = "fp32: bf16 moves T=1 targets by over 0.01 total variation"


@dataclass(frozen=True, kw_only=True)
class LabelConfig:
    """Everything ``stillroom label`` and ``POST /v1/label-jobs`` take (``pipelines.options``). Saved beside the
    store's manifest as ``sources``."""

    dataset: str = option("fashion-mnist", help=DATASET_HELP)
    split: str = option("train", help="the split to label", choices=("train", "val", "test"))
    data_root: str | None = option(None, help="where the data set's files are (fashion-mnist: its idx files)")
    teachers: tuple[str, ...] = option(help="NAME@CHECKPOINT or NAME (timm weights); repeat for an ensemble",
                                       flags=("--teacher",), cli={"action": "append"})
    recipe: str = option("fmnist-rrc", help="the view recipe: the augmentations the teachers see")
    seeds: tuple[int, ...] = option((0,), help="augmentation seeds to label, e.g. 0-3 or 0,2,5",
                                    cli={"default": "0"})
    top_k: int = option(10, help="classes kept per view (the rest: one tail mass)", ge=1, le=100000)
    sampled: int = option(0, help="also store m classes drawn from the teacher", ge=0, le=4096)
    # "final" (timm forward_features) or a module name
    features: str | None = option(None, help="store a teacher feature map: 'final' or a module name")
    # the feature map is average-pooled to feature_grid x feature_grid
    feature_grid: int = option(4, help="pool the feature map to GRID x GRID", ge=1, le=64)
    per_teacher: bool = option(False, help="keep each ensemble member's top-k too")
    store_views: bool = option(False, help="keep each view's parameters in the store (by default a digest a chunk: "
                                           "readers draw them again), e.g. for exports and other tools")
    store_format: int = option(4, help="the store format written: 4 (the top-k in 8- and 16-bit codes, the view "
                                       "parameters redrawn) or 2 (float16 logits and the parameters, about 1.7x "
                                       "the bytes; for tools that read format 2)", choices=(4, 2))
    store_root: str = option("stores", help="the store root: the store goes to <root>/<cache_key>",
                             flags=("--store-root",))
    batch_size: int = option(256, help="teacher batch size", ge=1, le=65536)
    chunk_rows: int = option(8192, help="rows per store chunk (the unit of a piece of work)", ge=1, le=1 << 20)
    ray_address: str | None = option(None, help="an existing cluster (default: a local Ray)")
    num_workers: int = option(1, help="Ray actors labeling pieces in parallel", ge=1, le=4096)
    gpus_per_worker: float = option(0.0, help="GPUs each Ray actor asks for (0: CPU)", ge=0, le=16)
    extra: dict[str, Any] = field(default_factory=dict)
    decode_workers: int = option(-1, help="processes per label worker that decode and crop ahead of the teacher "
                                          "(-1: a quarter of the worker's CPUs with a CPU teacher, all but one with "
                                          "a GPU teacher; at least one)", ge=-1, le=256)
    # gpu only when asked: nvJPEG and roi_align give other pixels than the PIL views students replay (issue 32)
    decode: str = option("cpu", help="where JPEGs are decoded: cpu (PIL in the decode processes: the pixels students "
                                     "replay), gpu (nvJPEG and roi_align crops on the teacher's GPU: faster, other "
                                     "pixels by a grey level or so, recorded in the store's key; a student replaying "
                                     "it is told), auto (the same as cpu; kept for older configs)",
                         choices=("auto", "cpu", "gpu"))
    gpu_wait_s: float = option(60.0, help="how long --gpus-per-worker waits for the cluster's GPUs before refusing",
                               ge=0, le=86400)
    class_map: str | None = option(None, help="a teacher trained on a superset of the dataset's classes (e.g. "
                                              "ImageNet-1k for ImageNet-100): a file with one line per dataset class, "
                                              "in order, INDEX or NAME INDEX (the teacher's class index); applies to "
                                              "every teacher. Without it a teacher of another class count is refused")
    # preprocessing of every teacher (None: the checkpoint's, else timm's config of the teacher's tag)
    teacher_input_size: int | None = option(None, help="the teachers' input size in px (default: each teacher's own); "
                                                       "each teacher's input is rendered from the source image at it",
                                            ge=8, le=2048)
    teacher_mean: tuple[float, ...] | None = option(None, help="the teachers' normalisation mean, e.g. "
                                                               "0.485,0.456,0.406 (default: each teacher's own)")
    teacher_std: tuple[float, ...] | None = option(None, help="the teachers' normalisation std, e.g. 0.229,0.224,0.225 "
                                                              "(default: each teacher's own)")
    teacher_interpolation: str | None = option(None, help="the filter of a resize inside the teacher (default: each "
                                                          "teacher's own)", choices=INTERPOLATIONS)
    teacher_crop_pct: float | None = option(None, help="the teachers' eval centre-crop fraction, recorded (a view's "
                                                       "stored box is what a teacher sees; default: each teacher's "
                                                       "own)", gt=0, le=1)
    teacher_dtype: str = option("auto", help="the teachers' compute precision: fp32, bf16 (autocast), auto ("
                                + AUTO_DTYPE_HELP + ")", choices=("auto", "fp32", "bf16"))

    def __post_init__(self) -> None:
        for name in ("teacher_mean", "teacher_std"):  # the CLI's text, or a REST spec's list
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, parse_floats(value, "--" + name.replace("_", "-")))
        if not self.teachers:
            raise UsageError("give at least one --teacher NAME@CHECKPOINT")
        if not self.seeds:
            raise UsageError("give at least one seed, e.g. --seeds 0-3")
        check_options(self)
        for _, why in self.conflicts(vars(self)):
            raise UsageError(why)

    @staticmethod
    def conflicts(values: dict[str, Any]) -> list[tuple[str, str]]:
        """Options each valid alone but not together, as ``(field, why)``: the config and the REST spec both ask."""
        if values.get("decode") == "gpu" and not (values.get("gpus_per_worker") or 0) > 0:
            return [("decode", "decode=gpu needs --gpus-per-worker > 0: the JPEGs are decoded on the teacher's GPU")]
        if values.get("decode") == "gpu" and _photometric(values.get("recipe")):
            return [("decode", f"recipe {values.get('recipe')} has photometric ops, which run on the CPU views: "
                               "label it with --decode cpu")]
        return []

    @property
    def compute_dtype(self) -> str:
        """The teachers' precision, ``teacher_dtype`` resolved for where they run (``auto``: ``AUTO_DTYPE``)."""
        if self.teacher_dtype != "auto":
            return self.teacher_dtype
        return AUTO_DTYPE["cuda" if self.gpus_per_worker > 0 else "cpu"]

    def preprocess_overrides(self) -> dict[str, Any]:
        """The preprocessing fields the options set (``pipelines.teachers.with_overrides``)."""
        return {"resolution": self.teacher_input_size, "mean": self.teacher_mean, "std": self.teacher_std,
                "interpolation": self.teacher_interpolation, "crop_pct": self.teacher_crop_pct}

    @property
    def decode_on(self) -> str:
        """Where JPEGs are decoded: ``gpu`` only when asked (``--decode gpu``); else PIL, on the CPUs, whatever runs
        the teacher: the pixels a student replays (``auto`` once meant gpu on GPU workers)."""
        return "gpu" if self.decode == "gpu" else "cpu"

    def decode_processes(self, cpus: int) -> int:
        """Decode processes of one label worker holding ``cpus`` CPUs: ``decode_workers``, or by default a
        quarter of them with a CPU teacher, all but one with a GPU teacher that PIL feeds (at least one). At 224 px
        a CPU teacher costs far more per image than a JPEG decode (resnet50: about 4 GFLOPs against about 1.5 ms
        of a core), so most cores go to the teacher's threads; a GPU teacher labels thousands of images a second
        and PIL decodes 550-850 a core, so the cores go to decoding."""
        if self.decode_workers >= 0:
            return self.decode_workers
        if self.gpus_per_worker > 0 and self.decode_on == "cpu":
            return max(1, cpus - 1)
        return max(1, cpus // 4)


def _photometric(recipe: Any) -> bool:
    """Whether a recipe name (None or unknown: no) has photometric ops."""
    try:
        return isinstance(recipe, str) and get_recipe(recipe).photometric
    except UsageError:
        return False


def parse_floats(value: Any, flag: str) -> tuple[float, ...]:
    """``0.485,0.456,0.406`` (or a list of numbers) -> a tuple of floats."""
    parts = [p for p in value.split(",") if p.strip()] if isinstance(value, str) else list(value)
    try:
        return tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise UsageError(f"{flag} {value!r}: expected comma-separated numbers, e.g. 0.485,0.456,0.406") from None


def parse_seeds(text: str) -> tuple[int, ...]:
    """``0-3`` -> (0, 1, 2, 3); ``0,2,5`` -> (0, 2, 5); mixed forms allowed."""
    seeds: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, sep, hi = part.partition("-")
            seeds.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError:
        raise UsageError(f"--seeds {text!r}: expected e.g. 0-3 or 0,1,5") from None
    if not seeds or min(seeds) < 0:
        raise UsageError(f"--seeds {text!r}: expected non-negative seeds")
    return tuple(sorted(set(seeds)))


def index_cache(config: LabelConfig) -> str:
    """Where the index of data on a URL is shared when its own prefix is read-only: $STILLROOM_INDEX_CACHE, else the
    store root (every actor and node of the job knows it)."""
    return os.environ.get(INDEX_CACHE_ENV) or config.store_root
