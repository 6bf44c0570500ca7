"""``Labeler``: one worker's teachers and data set, loaded once; it labels a piece (whole chunks) of one or more
seeds and writes it to the store.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from stillroom.pipelines.core import NO_METRICS, Metrics
from stillroom.pipelines.data import Dataset, load_dataset
from stillroom.pipelines.labeling.config import LabelConfig, index_cache
from stillroom.pipelines.labeling.stream import ViewBatch, ViewStream, decode_views_torch
from stillroom.pipelines.labeling.targets import (
    blank_rows,
    pool_features,
    quality_sums,
    sample_classes,
    topk_arrays,
)
from stillroom.pipelines.store import LabelStore, QualitySums, add_quality
from stillroom.pipelines.teachers import (
    Teacher,
    ensemble_log_probs,
    load_teacher,
    read_class_map,
)
from stillroom.pipelines.views import (
    COL,
    MIX_NONE,
    Recipe,
    get_recipe,
    mix_views,
)


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


class Labeler:
    """Labels pieces: opens the dataset's index and loads the teachers once, then turns row ranges into store
    arrays, the views streamed to the teacher by ``decode_workers`` processes (``pipelines._label_stream``)."""

    def __init__(self, config: LabelConfig, store_path: str, device: str = "cpu", decode_workers: int | None = None):
        self.config = config
        self.metrics: Metrics = NO_METRICS  # the Ray actor hands it Ray's (``pipelines.labeling.ray_pool``)
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
        # decode="gpu" on a CPU device: the same path on the CPU (torchvision's decoder and roi_align), the pixels
        # its store's key says
        self.decode = config.decode_on
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
        images at once. Under ``,bad=skip`` a view whose image failed to decode is left out: its rows are blanked
        (``blank_rows``), kept out of the quality sums and listed in ``self.skipped[seed]`` (id -> why)."""
        self.skipped: dict[int, dict[int, str]] = {seed: {} for seed in seeds}
        parts: dict[int, list[dict[str, np.ndarray]]] = {seed: [] for seed in seeds}
        quality: dict[int, QualitySums] = {seed: {} for seed in seeds}
        batches = iter(self.views.batches(seeds, ids, self.config.batch_size))
        while True:
            t = time.perf_counter()
            batch = next(batches, None)  # the wait for the decode processes' next batch
            if batch is None:
                break
            self.metrics.observe("decode_seconds", time.perf_counter() - t)
            t = time.perf_counter()
            labeled = self._label_batch(seeds, batch)
            self.metrics.observe("forward_seconds", time.perf_counter() - t)
            for seed, (arrays, sums) in zip(seeds, labeled, strict=True):
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
        lost = np.zeros(len(batch.ids), dtype=bool)
        for row, why in (batch.failed or {}).items():
            lost[row] = True
            self.skipped[seeds[row // n]][int(batch.ids[row])] = why
        return [self._seed_arrays(seed, batch.ids[j * n : (j + 1) * n], batch.params[j * n : (j + 1) * n],
                                  logits[j * n : (j + 1) * n], [m[j * n : (j + 1) * n] for m in member_logits],
                                  fmap[j * n : (j + 1) * n] if fmap is not None else None, lost[j * n : (j + 1) * n])
                for j, seed in enumerate(seeds)]

    def _seed_arrays(self, seed: int, ids: np.ndarray, params: np.ndarray, logits: torch.Tensor,
                     member_logits: list[torch.Tensor], fmap: torch.Tensor | None, lost: np.ndarray
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
        if not lost.any():
            return out, quality_sums(logits, self.dataset.labels[ids], area, schema.top_k)
        blank_rows(out, np.flatnonzero(lost))
        keep = ~lost
        return out, quality_sums(logits[torch.from_numpy(keep).to(logits.device)], self.dataset.labels[ids[keep]],
                                 area[keep], schema.top_k)

    def label_piece(self, seeds: int | tuple[int, ...], piece: int, start: int, stop: int,
                    generations: dict[int, int] | None = None) -> dict[str, Any]:
        """Label rows ``[start, stop)`` under each of ``seeds`` in one pass (``label_seeds``) and write each seed's
        piece whole, fenced by the seed's lease generation in ``generations`` (``LabelStore.write_piece``); return
        counts for progress."""
        t = time.perf_counter()
        seeds = (seeds,) if isinstance(seeds, int) else tuple(seeds)
        gens = {int(k): int(v) for k, v in (generations or {}).items()}
        for seed, (arrays, quality) in self.label_seeds(seeds, np.arange(start, stop, dtype=np.int64)).items():
            t_write = time.perf_counter()
            self.store.write_piece(seed, piece, start, arrays, quality=quality, generation=gens.get(seed),
                                   skipped=self.skipped[seed])
            self.metrics.observe("write_seconds", time.perf_counter() - t_write)
            self.metrics.add("bytes_written", sum(a.nbytes for a in arrays.values()))
        skipped = sum(len(lost) for lost in self.skipped.values())
        views = (stop - start) * len(seeds) - skipped
        self.metrics.add("views_labeled", views)
        if skipped:
            self.metrics.add("views_skipped", skipped)
        self.metrics.set("images_per_s", views / max(time.perf_counter() - t, 1e-9))
        return {"seed": seeds[0] if len(seeds) == 1 else seeds, "piece": piece, "samples": (stop - start) * len(seeds),
                "seconds": time.perf_counter() - t, "pid": os.getpid(),
                "skipped": {seed: {int(i): why for i, why in lost.items()} for seed, lost in self.skipped.items()
                            if lost}}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
