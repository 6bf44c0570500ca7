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

import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from stillroom.pipelines.core import NO_METRICS, Metrics, UsageError, progress_bar
from stillroom.pipelines.data import Dataset, load_dataset
from stillroom.pipelines.labeling.config import LabelConfig, index_cache
from stillroom.pipelines.labeling.stream import view_size
from stillroom.pipelines.labeling.targets import pool_features
from stillroom.pipelines.labeling.worker import Labeler, describe_teacher, load_teachers
from stillroom.pipelines.store import LabelStore, SeedLease, StoreSchema
from stillroom.pipelines.teachers import (
    Teacher,
)
from stillroom.pipelines.views import (
    Recipe,
    check_mix_size,
    num_view_params,
    output_size,
    recipe_for,
)


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
    check_mix_size(recipe, len(dataset))  # partner ids float32 cannot hold: refused before the store is made
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
                         view_params=num_view_params(recipe), store_views=config.store_views,
                         format_version=config.store_format)
    return provenance, schema


def prepare_store(config: LabelConfig) -> LabelStore:
    """Validate everything (dataset, recipe, teachers, store root) and open or make the store; no labeling."""
    return _prepare(config)[0]


def _prepare(config: LabelConfig) -> tuple[LabelStore, list[Teacher]]:
    dataset = load_dataset(config.dataset, config.split, config.data_root, index_cache(config))
    recipe = recipe_for(config.recipe, dataset)  # a folder of one square size: views at that size
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
    if backend == "local" and config.gpus_per_worker > 0 and not torch.cuda.is_available():
        # never a silent CPU fallback: the store would be keyed as GPU-decoded and labeled on the CPU
        raise UsageError(f"--gpus-per-worker {config.gpus_per_worker}: torch finds no CUDA device here; --no-ray "
                         "labels in this process, on its GPU with the flag, on its CPUs without it")
    store, teachers = _prepare(config)
    for teacher in teachers:
        print(describe_teacher(teacher, config.compute_dtype), file=sys.stderr)
    reused = [s for s in config.seeds if store.is_complete(s)]
    todo = [s for s in config.seeds if s not in reused]
    if todo and backend == "ray":
        from stillroom.pipelines.labeling.ray_pool import connect

        connect(config.ray_address)  # no Ray there: fail now, before any seed is begun
    result: dict[str, Any] = {
        "cache_key": store.cache_key, "store": str(store.path), "seeds_computed": [], "seeds_reused": reused,
        "views": 0, "images": store.schema.num_samples, "views_per_s": 0.0,  # a view: an image under a seed
        "teachers": [{"name": t.name, "preprocess": t.preprocess.to_dict(), "dtype": config.compute_dtype,
                      "preprocess_from": t.preprocess_from} for t in teachers]}
    if not todo:
        print(f"cache hit: {store.cache_key} holds seeds {reused}; no teacher ran", file=sys.stderr)
        result["quality"] = {str(s): store.quality(s) for s in config.seeds}
        result.update(_skipped(store, config.seeds))
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
                        lease.release(final=True)
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
    result.update(_skipped(store, config.seeds))
    if not computed:
        return {**result, "cache_hit": True, "seconds": round(time.perf_counter() - t0, 3)}
    total, work_s = sum(t["views"] for t in timings), sum(t["work_s"] for t in timings)
    per_node: Counter[str] = Counter()
    for t in timings:
        per_node.update(t.get("pieces_per_node", {"local": t["pieces"]}))
    return {**result, "cache_hit": False, "views": total,
            "views_per_s": round(total / max(work_s, 1e-9), 1),
            "seconds": round(time.perf_counter() - t0, 3), "startup_s": round(sum(t["startup_s"] for t in timings), 3),
            "labeling_s": round(work_s, 3), "nodes": max(int(t.get("nodes", 1)) for t in timings),
            "pieces_per_node": dict(per_node)}


def _skipped(store: LabelStore, seeds: tuple[int, ...]) -> dict[str, Any]:
    """What the job's result says of the views left out under ``,bad=skip`` (their image, or their mixing partner's,
    failed to decode): how many over ``seeds``, and each reason once (the store's records: a resumed run's too)."""
    lost = [store.skipped(seed) for seed in seeds]
    return {"views_skipped": sum(len(ids) for ids in lost),
            "skipped_images": sorted({why for ids in lost for why in ids.values()})}


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
    generations = {seed: lease.generation for seed, lease in leases.items() if lease.generation is not None}
    # each piece's writer is fenced by its seeds' lease generations: a run taken over writes nothing more
    work = [(tuple(seeds), i, *pieces[i], {s: generations[s] for s in seeds if s in generations})
            for i, seeds in sorted(needs.items())]
    total = sum((b - a) * len(seeds) for seeds, _, a, b, _ in work)
    metrics: Metrics = NO_METRICS
    if backend != "local":
        from stillroom.pipelines.labeling.ray_pool import label_metrics, this_job

        metrics = label_metrics(this_job(), str(store.path))
    with progress_bar(total, f"labeling {len(leases)} seed(s)", progress, unit="views") as bar:  # ends before an error
        def piece_done(views: int, record: dict[str, Any]) -> None:
            bar.update(views)
            for seed, lost in (record.get("skipped") or {}).items():
                for i, why in lost.items():  # one line each, in the job's log
                    bar.write(f"stillroom: skipped: seed {seed} sample {i}: {why} (,bad=skip)", file=sys.stderr)

        timing = _label_pieces(config, store, work, backend, piece_done)
    for seed in sorted(leases):
        store.commit_seed(seed, leases[seed])
        leases[seed].release(final=True)
        metrics.add("seeds_committed")
    return {**timing, "views": total, "pieces": sum(len(seeds) for seeds, *_ in work)}


def _label_pieces(config: LabelConfig, store: LabelStore, work: list[tuple[tuple[int, ...], int, int, int, dict]],
                  backend: str, on_done: Callable[[int, dict[str, Any]], None]) -> dict[str, Any]:
    """Label ``work`` in this process (``local``) or on a Ray actor pool, ``on_done(views, record)`` after each
    piece; the seconds it took."""
    if backend == "local":
        t_start = time.perf_counter()
        labeler = Labeler(config, str(store.path), "cuda" if config.gpus_per_worker > 0 else "cpu")
        t_work = time.perf_counter()
        try:
            for seeds, i, a, b, gens in work:
                on_done((b - a) * len(seeds), labeler.label_piece(seeds, i, a, b, gens))
        finally:
            labeler.views.close()
        return {"startup_s": t_work - t_start, "work_s": time.perf_counter() - t_work, "nodes": 1}
    from stillroom.pipelines.labeling.ray_pool import label_on_ray

    return label_on_ray(config, str(store.path), work, on_done=on_done)
