"""The labeling job: run the teacher(s) once per augmentation seed and write what they said to the store.

Work is split into pieces of whole chunks (``StoreSchema.pieces``); one worker labels and writes each
piece whole, then marks it done. A piece is the unit of retry and of resumption: a killed worker's piece
is done again by a restarted one (Ray restarts the actor and retries the call), and a run started again
after a crash skips the pieces already done. When every piece of a seed is done the driver commits the
seed (checksums, ``COMPLETE``). A seed already complete is a cache hit and runs no teacher.

``backend="ray"`` runs the pieces on a pool of Ray actors, each of which loads the teachers once (a local
``ray.init()`` when no address is given, an existing cluster otherwise); ``backend="local"`` runs them
in this process, the same code without Ray.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines._label_stream import ViewBatch, ViewStream, decode_views_torch, view_size
from pipelines._readers import DATASET_HELP, INDEX_CACHE_ENV
from pipelines.datasets import Dataset, load_dataset
from pipelines.errors import UsageError
from pipelines.options import check_options, option
from pipelines.progress import progress_bar
from pipelines.store import LabelStore, QualitySums, SeedLease, StoreSchema, add_quality
from pipelines.teachers import (
    INTERPOLATIONS,
    Teacher,
    as_feature_map,
    ensemble_log_probs,
    load_teacher,
    read_class_map,
)
from pipelines.views import (
    COL,
    MIX_NONE,
    Recipe,
    _key,
    _uniforms,
    get_recipe,
    mix_views,
    num_view_params,
    output_size,
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
    store_root: str = option("stores", help="the store root: the store goes to <root>/<cache_key> (--store: the "
                                            "older name)", flags=("--store-root", "--store"))
    batch_size: int = option(256, help="teacher batch size", ge=1, le=65536)
    chunk_rows: int = option(8192, help="rows per store chunk (the unit of a piece of work)", ge=1, le=1 << 20)
    ray_address: str | None = option(None, help="an existing cluster (default: a local Ray)")
    num_workers: int = option(1, help="Ray actors labeling pieces in parallel", ge=1, le=4096)
    gpus_per_worker: float = option(0.0, help="GPUs each Ray actor asks for (0: CPU)", ge=0, le=16)
    extra: dict[str, Any] = field(default_factory=dict)
    decode_workers: int = option(-1, help="processes per label worker that decode and crop ahead of the teacher "
                                          "(-1: a quarter of the worker's CPUs, at least one)", ge=-1, le=256)
    decode: str = option("auto", help="where JPEGs are decoded: cpu (PIL in the decode processes), gpu (nvJPEG and "
                                      "crops on the teacher's GPU), auto (gpu when --gpus-per-worker > 0)",
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
                               "label it with --decode cpu (or auto)")]
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
        """Where JPEGs are decoded: ``gpu`` when asked, or by default when the teacher runs on a GPU and the recipe
        has no photometric ops (they run on the CPU views)."""
        if self.decode == "gpu":
            return "gpu"
        auto_gpu = self.decode == "auto" and self.gpus_per_worker > 0 and not get_recipe(self.recipe).photometric
        return "gpu" if auto_gpu else "cpu"

    def decode_processes(self, cpus: int) -> int:
        """Decode processes of one label worker holding ``cpus`` CPUs: ``decode_workers``, or by default a
        quarter of them (at least one). At 224 px a CPU teacher costs far more per image than a JPEG decode
        (resnet50: about 4 GFLOPs against about 1.5 ms of a core), so most cores go to the teacher's threads."""
        return self.decode_workers if self.decode_workers >= 0 else max(1, cpus // 4)


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


def load_teachers(config: LabelConfig, dataset: Dataset, device: str = "cpu") -> list[Teacher]:
    """The config's teachers for ``dataset``: its class count and names checked (or mapped by ``class_map``), the
    preprocessing options applied."""
    names = getattr(dataset, "class_names", None)
    class_map = read_class_map(config.class_map, dataset.num_classes, names) if config.class_map else None
    return [load_teacher(t, dataset.num_classes, device, class_names=names, class_map=class_map,
                         preprocess=config.preprocess_overrides()) for t in config.teachers]


def describe_teacher(teacher: Teacher, dtype: str) -> str:
    """One line saying what a teacher's input is: what ``stillroom label`` prints for each."""
    p = teacher.preprocess
    floats = lambda v: ",".join(f"{x:g}" for x in v)  # noqa: E731
    mapped = f", classes mapped {teacher.num_classes} of {teacher.teacher_classes}" if teacher.class_map else ""
    return (f"teacher {teacher.name} ({teacher.source}): input {p.resolution} px, mean {floats(p.mean)}, "
            f"std {floats(p.std)}, interpolation {p.interpolation}, crop_pct {p.crop_pct}, {dtype}{mapped}; "
            f"preprocessing from {teacher.preprocess_from}")


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


class Labeler:
    """Labels pieces: opens the dataset's index and loads the teachers once, then turns row ranges into store
    arrays, the views streamed to the teacher by ``decode_workers`` processes (``pipelines._label_stream``)."""

    def __init__(self, config: LabelConfig, store_path: str, device: str = "cpu", decode_workers: int | None = None):
        self.config = config
        self.dataset: Dataset = load_dataset(config.dataset, config.split, config.data_root, index_cache(config))
        self.recipe: Recipe = get_recipe(config.recipe)
        self.teachers: list[Teacher] = load_teachers(config, self.dataset, device)
        self.store = LabelStore(store_path)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one input size: the fastest kernels are found once
            for teacher in self.teachers:  # the uint8 views arrive channels-last: convolutions run in that layout
                teacher.model.to(memory_format=torch.channels_last)
        self.decode_workers = (config.decode_processes(torch.get_num_threads()) if decode_workers is None
                               else decode_workers)
        self.decode = config.decode_on if self.device.type == "cuda" else "cpu"
        # each teacher's input rendered from the source at its own size, from the same boxes
        self.views = ViewStream(self.dataset, self.recipe, self.decode_workers, self.decode,
                                pin_memory=self.device.type == "cuda",
                                sizes=tuple(t.preprocess.resolution for t in self.teachers))

    def label(self, seed: int, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The store arrays for ``ids`` under ``seed``, computed in batches."""
        return self.label_with_quality(seed, ids)[0]

    def label_with_quality(self, seed: int, ids: np.ndarray) -> tuple[dict[str, np.ndarray], QualitySums]:
        """The store arrays for ``ids`` under ``seed`` and their label-quality sums (``quality_sums``)."""
        return self.label_seeds((seed,), ids)[seed]

    def label_seeds(self, seeds: tuple[int, ...], ids: np.ndarray
                    ) -> dict[int, tuple[dict[str, np.ndarray], QualitySums]]:
        """``label_with_quality`` for several seeds in one pass: each batch holds the views of some ids under every
        seed, so each image is read and decoded once for all its seeds and the teacher sees views of several
        images at once."""
        parts: dict[int, list[dict[str, np.ndarray]]] = {seed: [] for seed in seeds}
        quality: dict[int, QualitySums] = {seed: {} for seed in seeds}
        for batch in self.views.batches(seeds, ids, self.config.batch_size):
            for seed, (arrays, sums) in zip(seeds, self._label_batch(seeds, batch), strict=True):
                parts[seed].append(arrays)
                quality[seed] = add_quality(quality[seed], sums)
        return {seed: ({k: np.concatenate([p[k] for p in parts[seed]]) for k in parts[seed][0]}, quality[seed])
                for seed in seeds}

    def _device_views(self, batch: ViewBatch) -> dict[int, torch.Tensor]:
        """The batch's float views in [0, 1] on the teacher's device, by size (uint8 travels; floats are made
        there)."""
        if batch.views is not None:
            return {size: v.to(self.device) for size, v in batch.views.items()}
        out = {}
        for size in self.views.sizes:
            partner = None
            if batch.encoded is not None:  # decode="gpu"
                own = decode_views_torch(batch.encoded, batch.params[:, 0:5], size, self.device)
                if batch.partner_encoded is not None:
                    rows = np.flatnonzero(batch.params[:, COL["mix_mode"]] != MIX_NONE)
                    partner = own.clone()
                    partner[torch.from_numpy(rows).to(self.device)] = decode_views_torch(
                        batch.partner_encoded, batch.params[rows, 8:13], size, self.device)
            else:
                own = batch.own[size].to(self.device, non_blocking=True)  # type: ignore[index]
                if batch.partner is not None:
                    partner = batch.partner[size].to(self.device, non_blocking=True)
            out[size] = mix_views(own, partner, batch.params)
        return out

    @torch.inference_mode()
    def _label_batch(self, seeds: tuple[int, ...], batch: ViewBatch) -> list[tuple[dict[str, np.ndarray], QualitySums]]:
        """One forward over the batch's views (its ids under each of ``seeds``, seed after seed), then each seed's
        store arrays and quality sums."""
        cfg = self.config
        views = self._device_views(batch)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.config.compute_dtype == "bf16"
                    else _null())
        member_logits, fmap = [], None
        with autocast:
            for i, teacher in enumerate(self.teachers):
                x = views[teacher.preprocess.resolution]
                if i == 0 and cfg.features:
                    logits, fmap = teacher.features(x, cfg.features)
                else:
                    logits = teacher.logits(x)
                member_logits.append(logits.float())
        logits = ensemble_log_probs(member_logits)
        n = len(batch.ids) // len(seeds)
        return [self._seed_arrays(seed, batch.ids[j * n : (j + 1) * n], batch.params[j * n : (j + 1) * n],
                                  logits[j * n : (j + 1) * n], [m[j * n : (j + 1) * n] for m in member_logits],
                                  fmap[j * n : (j + 1) * n] if fmap is not None else None)
                for j, seed in enumerate(seeds)]

    def _seed_arrays(self, seed: int, ids: np.ndarray, params: np.ndarray, logits: torch.Tensor,
                     member_logits: list[torch.Tensor], fmap: torch.Tensor | None
                     ) -> tuple[dict[str, np.ndarray], QualitySums]:
        cfg, schema = self.config, self.store.schema
        out = {"view": params, **topk_arrays(logits, schema.top_k)}
        if schema.sampled:
            out["sampled"] = sample_classes(logits, self.recipe, seed, ids, schema.sampled)
        if fmap is not None:
            out["features"] = pool_features(fmap, cfg.feature_grid).cpu().numpy().astype(np.float16)
        for t in range(schema.per_teacher):
            own = topk_arrays(member_logits[t], schema.top_k)
            out.update({f"teacher{t}_{name}": own[name] for name in ("topk_idx", "topk_logit", "lse", "tail_lse")})
        area = params[:, COL["h"]] * params[:, COL["w"]]
        return out, quality_sums(logits, self.dataset.labels[ids], area, schema.top_k)

    def label_piece(self, seeds: int | tuple[int, ...], piece: int, start: int, stop: int) -> dict[str, Any]:
        """Label rows ``[start, stop)`` under each of ``seeds`` in one pass (``label_seeds``) and write each seed's
        piece whole; return counts for progress."""
        t = time.perf_counter()
        seeds = (seeds,) if isinstance(seeds, int) else tuple(seeds)
        for seed, (arrays, quality) in self.label_seeds(seeds, np.arange(start, stop, dtype=np.int64)).items():
            self.store.write_piece(seed, piece, start, arrays, quality=quality)
        return {"seed": seeds[0] if len(seeds) == 1 else seeds, "piece": piece, "samples": (stop - start) * len(seeds),
                "seconds": time.perf_counter() - t, "pid": os.getpid()}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def topk_arrays(logits: torch.Tensor, k: int) -> dict[str, np.ndarray]:
    """Top-k indices (best first) and logits (float16), the exact log-sum-exp over all classes (``lse``), the
    log-sum-exp over the classes outside the top-k (``tail_lse``; ``-inf`` when ``k = C``), both float32 and
    computed from the full float32 logits, and the argmax.

    ``tail_lse`` is what rebuilding the tempered teacher needs: ``1 - sum_topk exp(t - lse)`` from float16
    logits is below float16's rounding for a confident teacher. For an ensemble, ``logits`` are
    ``ensemble_log_probs``, so ``tail_lse - lse`` is the log of the averaged probabilities' tail mass.
    """
    logits = logits.float()
    values, idx = logits.topk(k, dim=-1)
    tail = logits.scatter(-1, idx, float("-inf"))
    return {"topk_idx": idx.cpu().numpy(), "topk_logit": values.cpu().numpy().astype(np.float16),
            "lse": torch.logsumexp(logits, -1).cpu().numpy().astype(np.float32),
            "tail_lse": torch.logsumexp(tail, -1).cpu().numpy().astype(np.float32),
            "hard": idx[:, 0].cpu().numpy()}


def quality_sums(logits: torch.Tensor, truth: np.ndarray, crop_area: np.ndarray, k: int) -> QualitySums:
    """What ``stillroom store inspect`` reports about the labels, as sums over views (added up per piece and
    per seed, turned into means by ``pipelines.store.quality_report``), overall and by the crop's area
    (fraction of the image; ``area<0.5`` and ``area>=0.5``):

    ``views``; ``top1``: the teacher's argmax is the ground truth; ``in_topk``: the ground truth is among the
    stored top-k; ``entropy``: of the full teacher distribution, in nats; ``topk_mass``: the probability the
    stored top-k holds. A mixed view (mixup, cutmix) counts its own sample's class as the ground truth.
    """
    logits = logits.float()
    log_p = logits.log_softmax(-1)
    y = torch.from_numpy(np.asarray(truth, dtype=np.int64)).to(logits.device)
    top = logits.topk(k, dim=-1).indices
    per_view = {
        "top1": (top[:, 0] == y).double(),
        "in_topk": (top == y[:, None]).any(1).double(),
        "entropy": -(log_p.exp() * log_p).nan_to_num().sum(-1).double(),
        "topk_mass": log_p.gather(1, top).exp().sum(-1).double(),
    }
    small = torch.from_numpy(np.asarray(crop_area) < 0.5).to(logits.device)
    groups = {"all": torch.ones_like(small), "area<0.5": small, "area>=0.5": ~small}
    # the 15 sums in one tensor, brought to the host at once (one synchronisation on CUDA, not 15)
    sums = torch.stack([torch.stack([rows.sum().double(), *(v[rows].sum() for v in per_view.values())])
                        for rows in groups.values()]).tolist()
    return {group: dict(zip(("views", *per_view), row, strict=True)) for group, row in zip(groups, sums, strict=True)}


def sample_classes(logits: torch.Tensor, recipe: Recipe, seed: int, ids: np.ndarray, m: int) -> np.ndarray:
    """``m`` classes per view drawn with replacement from softmax(logits), by inverse CDF on uniforms from a
    counter-based generator keyed by the view (recipe, seed, sample id): the same view draws the same classes."""
    probs = logits.float().softmax(-1).cpu().double()
    cdf = probs.cumsum(-1)
    cdf[:, -1] = 1.0
    u = torch.from_numpy(_uniforms(_key(recipe, seed, "sampled"), ids, m))
    return torch.searchsorted(cdf, u).clamp_max(probs.shape[1] - 1).numpy()


def pool_features(fmap: torch.Tensor, grid: int) -> torch.Tensor:
    """A teacher feature map ``(B, C, H, W)`` (or ViT tokens ``(B, N, C)``) average-pooled to ``grid x grid``."""
    return F.adaptive_avg_pool2d(as_feature_map(fmap).float(), grid)


def describe_labels(config: LabelConfig, teachers: list[Teacher], dataset: Dataset, recipe: Recipe
                    ) -> tuple[dict[str, Any], StoreSchema]:
    """The store's provenance (what goes into the cache key) and schema for this job."""
    feature_shape = None
    if config.features:
        size = teachers[0].preprocess.resolution  # its input: rendered at its own size
        probe = torch.zeros(1, dataset.channels, size, size)  # only the map's shape matters: nothing is decoded
        with torch.inference_mode():
            _, fmap = teachers[0].features(probe, config.features)
        feature_shape = tuple(pool_features(fmap, config.feature_grid).shape[1:])
    output_size(recipe, dataset)  # a recipe without an output size on images of many sizes: refused here
    described: dict[str, Any] = {"spec": dataset.spec, "split": dataset.split, "fingerprint": dataset.fingerprint,
                                 "num_samples": len(dataset), "num_classes": dataset.num_classes}
    if dataset.in_memory:
        described["image_shape"] = list(dataset.image_shape)
    else:  # images of many sizes: the recipe's output size is the views' size; bad=skip records what it left out
        described["skipped"] = len(dataset.skipped)
    provenance: dict[str, Any] = {
        "dataset": described,
        "recipe": recipe.to_dict(),
        "teachers": [t.describe() for t in teachers],
        "labels": {"top_k": config.top_k, "sampled": config.sampled, "ensemble": "mean-probability",
                   "features": {"layer": config.features, "grid": config.feature_grid} if config.features else None,
                   "per_teacher": config.per_teacher, "dtype": config.compute_dtype},
    }
    if config.decode_on == "gpu" and not dataset.in_memory:  # other pixels than the PIL views: another key
        provenance["labels"]["decode"] = "torchvision.io.decode_jpeg+roi_align"
    if any(t.preprocess.resolution != view_size(recipe, dataset) for t in teachers):  # once: upsampled views
        provenance["labels"]["teacher_input"] = "rendered from the source at each teacher's size"
    schema = StoreSchema(num_samples=len(dataset), num_classes=dataset.num_classes, top_k=config.top_k,
                         sampled=config.sampled, feature_shape=feature_shape,  # type: ignore[arg-type]
                         per_teacher=len(teachers) if config.per_teacher else 0, chunk_rows=config.chunk_rows,
                         view_params=num_view_params(recipe))
    return provenance, schema


def prepare_store(config: LabelConfig) -> LabelStore:
    """Validate everything (dataset, recipe, teachers, store root) and open or make the store; no labeling."""
    return _prepare(config)[0]


def index_cache(config: LabelConfig) -> str:
    """Where the index of data on a URL is shared when its own prefix is read-only: $STILLROOM_INDEX_CACHE, else the
    store root (every actor and node of the job knows it)."""
    return os.environ.get(INDEX_CACHE_ENV) or config.store_root


def _prepare(config: LabelConfig) -> tuple[LabelStore, list[Teacher]]:
    dataset = load_dataset(config.dataset, config.split, config.data_root, index_cache(config))
    recipe = get_recipe(config.recipe)
    teachers = load_teachers(config, dataset)
    provenance, schema = describe_labels(config, teachers, dataset, recipe)
    # where each teacher's preprocessing came from: said, not keyed (the same values from anywhere: the same labels)
    preprocess_from = [t.preprocess_from for t in teachers]
    return LabelStore.create(config.store_root, provenance, schema,
                             sources={"teachers": list(config.teachers), "preprocess_from": preprocess_from,
                                      "label_config": _jsonable(config)}), teachers


def _jsonable(config: LabelConfig) -> dict[str, Any]:
    d = asdict(config)
    d["teachers"], d["seeds"] = list(config.teachers), list(config.seeds)
    return d


LEASE_POLL_S = 2.0  # how often a run waiting for a seed another run labels looks again


def run_labeling(config: LabelConfig, backend: str = "ray", progress: bool = True) -> dict[str, Any]:
    """Label every seed of ``config`` that the store does not hold yet; return the job's result record.

    Each seed is labeled under its lease (``LabelStore.lease``): a seed that another run is labeling now is
    waited for and then reused (``seeds_reused``), while this run labels the seeds nobody holds; a lease whose
    holder died or went silent is taken over, keeping the pieces it finished."""
    t0 = time.perf_counter()
    if backend not in ("ray", "local"):
        raise UsageError(f"unknown backend {backend!r}: expected ray or local")
    if backend == "local" and config.gpus_per_worker > 0:  # a store keyed as GPU-decoded, labeled on the CPU
        raise UsageError("--gpus-per-worker asks Ray for GPUs; --no-ray labels in this process on the CPU")
    store, teachers = _prepare(config)
    for teacher in teachers:
        print(describe_teacher(teacher, config.compute_dtype), file=sys.stderr)
    reused = [s for s in config.seeds if store.is_complete(s)]
    todo = [s for s in config.seeds if s not in reused]
    if todo and backend == "ray":
        from pipelines._ray_labeling import connect

        connect(config.ray_address)  # no Ray there: fail now, before any seed is begun
    result: dict[str, Any] = {
        "cache_key": store.cache_key, "store": str(store.path), "seeds_computed": [], "seeds_reused": reused,
        "samples": 0, "images_per_s": 0.0,
        "teachers": [{"name": t.name, "preprocess": t.preprocess.to_dict(), "dtype": config.compute_dtype,
                      "preprocess_from": t.preprocess_from} for t in teachers]}
    if not todo:
        print(f"cache hit: {store.cache_key} holds seeds {reused}; no teacher ran", file=sys.stderr)
        result["quality"] = {str(s): store.quality(s) for s in config.seeds}
        return {**result, "cache_hit": True, "seconds": round(time.perf_counter() - t0, 3)}

    computed: list[int] = []
    timings: list[dict[str, Any]] = []
    held: dict[int, SeedLease] = {}
    told: set[int] = set()
    try:
        while todo:
            for seed in todo:
                lease = store.lease(seed)
                if lease.acquire():
                    if store.is_complete(seed):  # committed by the run that held the lease before
                        lease.release()
                        reused.append(seed)
                        continue
                    held[seed] = lease
                    if lease.taken_over is not None:
                        was = lease.taken_over
                        print(f"seed {seed}: took over the lease of pid {was.get('pid')} on {was.get('host')} "
                              "(gone, or silent past the timeout); its finished pieces are kept", file=sys.stderr)
                elif store.is_complete(seed):
                    reused.append(seed)
                elif seed not in told:
                    told.add(seed)
                    print(f"seed {seed} is being labeled by {lease.describe()}: waiting for it", file=sys.stderr)
            todo = [s for s in todo if s not in held and s not in reused]
            if held:
                timings.append(_label_seeds(config, store, held, backend, progress))
                computed += sorted(held)
                held.clear()
            elif todo:
                time.sleep(LEASE_POLL_S)
    finally:  # a failed run lets the next one take its seeds at once
        for lease in held.values():
            lease.release()
    result.update(seeds_computed=sorted(computed), seeds_reused=sorted(reused))
    result["quality"] = {str(s): store.quality(s) for s in config.seeds}
    if not computed:
        return {**result, "cache_hit": True, "seconds": round(time.perf_counter() - t0, 3)}
    total, work_s = sum(t["samples"] for t in timings), sum(t["work_s"] for t in timings)
    per_node: Counter[str] = Counter()
    for t in timings:
        per_node.update(t.get("pieces_per_node", {"local": t["pieces"]}))
    return {**result, "cache_hit": False, "samples": total,
            "images_per_s": round(total / max(work_s, 1e-9), 1),
            "seconds": round(time.perf_counter() - t0, 3), "startup_s": round(sum(t["startup_s"] for t in timings), 3),
            "labeling_s": round(work_s, 3), "nodes": max(int(t.get("nodes", 1)) for t in timings),
            "pieces_per_node": dict(per_node)}


def _label_seeds(config: LabelConfig, store: LabelStore, leases: dict[int, SeedLease], backend: str,
                 progress: bool) -> dict[str, Any]:
    """Label and commit the seeds whose leases this run holds (then released); return the timing record. One
    work item per piece, for every held seed that still needs it: its images are decoded once for all of them."""
    pieces = store.schema.pieces()
    needs: dict[int, list[int]] = {}
    for seed in sorted(leases):
        store.begin_seed(seed)
        done = store.done_pieces(seed)
        for i in range(len(pieces)):
            if i not in done:
                needs.setdefault(i, []).append(seed)
    work = [(tuple(seeds), i, *pieces[i]) for i, seeds in sorted(needs.items())]
    total = sum((b - a) * len(seeds) for seeds, _, a, b in work)
    bar = progress_bar(total, f"labeling {len(leases)} seed(s)", progress)
    if backend == "local":
        t_start = time.perf_counter()
        labeler = Labeler(config, str(store.path))
        t_work = time.perf_counter()
        try:
            for seeds, i, a, b in work:
                labeler.label_piece(seeds, i, a, b)
                bar.update((b - a) * len(seeds))
        finally:
            labeler.views.close()
        timing: dict[str, Any] = {"startup_s": t_work - t_start, "work_s": time.perf_counter() - t_work, "nodes": 1}
    else:
        from pipelines._ray_labeling import label_on_ray

        timing = label_on_ray(config, str(store.path), work, on_done=lambda n: bar.update(n))
    bar.close()
    for seed in sorted(leases):
        store.commit_seed(seed, leases[seed])
        leases[seed].release()
    return {**timing, "samples": total, "pieces": sum(len(seeds) for seeds, *_ in work)}
