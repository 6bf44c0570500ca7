"""Label store at ImageNet-1k train size: write, load a seed, gather random batches, bytes on disk.

1,281,167 samples, k = 10, 1,000 classes, one seed; synthetic teacher outputs shaped like real ones
(sorted top-k logits, a tail log-sum-exp ``tail_lse`` and ``lse`` the log-sum-exp of both) and real view parameters
of ``--recipe`` (``imagenet-rrc``: 17 columns; ``deit``: 43, with its RandAugment, random erasing and the partner's;
``ml-dr``: torchvision's RandAugment and erasing). Store format 4 (``pipelines.store.codec``) is written twice: as
labeled by default (a digest of each chunk's view parameters, drawn again on read) and with ``--store-views`` (the
parameters kept); ``--format 2`` or ``3`` writes that format instead, for the figures before.

Prints one JSON line. Targets (issue 34): at most 24 bytes a view for a recipe without photometric ops
(``imagenet-rrc``) and 32 with them (``deit``); gather >= 2,000,000 samples/s; a seed loads in <= 2 s, its check of
the view digests included (the first rows of every chunk drawn again). ``redraw_batch_ms`` is what drawing a
256-view batch's parameters again costs a loader worker, beside ``read_batch_ms``, gathering them from a seed that
stores them. ``tv_t1``/``tv_t4``: the rebuilt soft targets' total variation from float16's (mean, max), on these
synthetic logits (a trained teacher's: ``bench/store_tv.py``).

    python bench/store.py [--samples N] [--recipe NAME] [--format 2|3|4] [--dir DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

import numpy as np
import torch

from stillroom.pipelines.store import LabelStore, StoreSchema
from stillroom.pipelines.views import draw_views, get_recipe, num_view_params
from stillroom.student.losses import soft_targets_from_topk

HW = (375, 500)  # every synthetic image's size (the crops' aspect refers to it)
TV_ROWS = 100_000


def synthetic_labels(n: int, k: int, classes: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    steps = rng.integers(1, classes // k, size=(n, k))
    idx = ((rng.integers(0, classes, size=(n, 1)) + np.cumsum(steps, axis=1)) % classes).astype(np.int16)
    top = rng.normal(8.0, 2.0, size=(n, 1))
    logits = top - np.concatenate([np.zeros((n, 1)), np.cumsum(rng.exponential(0.6, size=(n, k - 1)), axis=1)], 1)
    # the classes outside the top-k: their log-sum-exp, around the top logit (a confident or a flat teacher)
    tail_lse = top[:, 0] + rng.normal(-1.0, 1.5, size=n)
    lse = np.logaddexp(np.logaddexp.reduce(logits, axis=1), tail_lse)
    return {"topk_idx": idx, "topk_logit": logits.astype(np.float16), "lse": lse.astype(np.float32),
            "tail_lse": tail_lse.astype(np.float32), "hard": idx[:, 0].copy()}


def total_variation(labels: dict[str, np.ndarray], held: dict[str, np.ndarray], classes: int, T: float
                    ) -> tuple[float, float]:
    """Mean and max total variation between the targets rebuilt from what was written and from what is read."""
    rows = slice(0, TV_ROWS)
    idx = torch.from_numpy(labels["topk_idx"][rows].astype(np.int64))
    old = soft_targets_from_topk(idx, torch.from_numpy(labels["topk_logit"][rows]),
                                 torch.from_numpy(labels["tail_lse"][rows]), classes, T)
    new = soft_targets_from_topk(idx, torch.from_numpy(held["topk_logit"][rows]),
                                 torch.from_numpy(held["tail_lse"][rows]), classes, T)
    tv = 0.5 * (old - new).abs().sum(1)
    return round(float(tv.mean()), 6), round(float(tv.max()), 6)


def write_and_read(root: str, schema: StoreSchema, recipe, labels: dict[str, np.ndarray], batches: list[np.ndarray]
                   ) -> dict:
    """Write one seed, load it (its view digests checked), gather; return the figures."""
    n = schema.num_samples
    store = LabelStore.create(root, {"bench": "store", "recipe": recipe.to_dict()}, schema)
    t = time.perf_counter()
    store.begin_seed(0)
    for i, (a, b) in enumerate(schema.pieces()):
        store.write_piece(0, i, a, {name: arr[a:b] for name, arr in labels.items()})
    store.commit_seed(0)
    write_s = time.perf_counter() - t

    from stillroom.pipelines.store import check_views

    t = time.perf_counter()
    reopened = LabelStore(store.path)
    seed = reopened.load(0)
    if not schema.views_stored:  # what a student's loader does at a seed's load
        check_views(reopened.view_record(0), "bench", recipe, 0, n, schema.chunk_rows, HW)
    load_s = time.perf_counter() - t
    exact = ["topk_idx", "hard", "lse", *(["view"] if schema.views_stored else [])]
    want = {**labels, "lse": labels["lse"].astype(np.float16 if schema.format_version >= 4 else np.float32)}
    differs = [name for name in exact if not np.array_equal(seed.arrays[name], want[name])]
    if differs:
        raise SystemExit(f"bench/store.py: the loaded seed differs from what was written in {differs}")

    t = time.perf_counter()
    for ids in batches:
        seed.gather(ids)
    gather_s = time.perf_counter() - t
    bytes_on_disk = store.size_on_disk(0)
    by_array = {name: round((store._seed(0) / name).size() / n, 2) for name in schema.stored()}
    return {"seed": seed, "write_s": write_s, "load_s": load_s, "gather_s": gather_s, "bytes": bytes_on_disk / n,
            "by_array": by_array}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1_281_167)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--chunk-rows", type=int, default=65536)
    ap.add_argument("--recipe", default="imagenet-rrc", help="whose view parameters the store holds (e.g. deit)")
    ap.add_argument("--format", type=int, default=4, choices=(2, 3, 4), help="the store format to write")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory, removed after)")
    ap.add_argument("--smoke", action="store_true", help="a few thousand samples: checks the bench runs (tests)")
    args = ap.parse_args()
    if args.smoke:
        args.samples, args.chunk_rows = min(args.samples, 5000), min(args.chunk_rows, 2048)
    n, k = args.samples, args.top_k
    rng = np.random.default_rng(0)
    recipe = get_recipe(args.recipe)
    t = time.perf_counter()
    labels = synthetic_labels(n, k, args.classes, rng)
    labels["view"] = draw_views(recipe, 0, np.arange(n), n, HW)
    make_s = time.perf_counter() - t
    batches = [rng.integers(0, n, size=256) for _ in range(50 if args.smoke else 2000)]

    root = args.dir or tempfile.mkdtemp(prefix="stillroom-bench-store-")
    try:
        schema = StoreSchema(num_samples=n, num_classes=args.classes, top_k=k, chunk_rows=args.chunk_rows,
                             view_params=num_view_params(recipe), format_version=args.format)
        run = write_and_read(root, schema, recipe, labels, batches)
        views = (write_and_read(root, StoreSchema(**{**vars(schema), "store_views": True}), recipe, labels, batches)
                 if args.format >= 3 else run)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    # a loader worker's cost for a batch's view parameters: drawn again (formats 3, 4) or gathered (--store-views)
    few = batches[:20]
    t = time.perf_counter()
    for ids in few:
        draw_views(recipe, 0, ids, n, HW)
    redraw_ms = (time.perf_counter() - t) / len(few) * 1e3
    t = time.perf_counter()
    for ids in few:
        np.take(labels["view"], ids, axis=0)
    read_ms = (time.perf_counter() - t) / len(few) * 1e3

    bytes_target = 32 if recipe.photometric else 24
    gather_rate = 256 * len(batches) / run["gather_s"]
    print(json.dumps({
        "bench": "store", "format": args.format, "samples": n, "top_k": k, "classes": args.classes,
        "write_samples_per_s": round(n / run["write_s"]), "load_seed_s": round(run["load_s"], 3),
        "gather_samples_per_s": round(gather_rate),
        "recipe": recipe.name, "view_params": num_view_params(recipe),
        "bytes_per_sample": round(run["bytes"], 2), "bytes_per_sample_store_views": round(views["bytes"], 2),
        "view_bytes_per_sample": views["by_array"].get("view", 0.0), "bytes_by_array": run["by_array"],
        "redraw_batch_ms": round(redraw_ms, 3), "read_batch_ms": round(read_ms, 3),
        "tv_t1": total_variation(labels, run["seed"].arrays, args.classes, 1.0),
        "tv_t4": total_variation(labels, run["seed"].arrays, args.classes, 4.0),
        "targets_met": {"gather": gather_rate >= 2_000_000, "bytes": run["bytes"] <= bytes_target,
                        "load": run["load_s"] <= 2.0},
        "synthesis_s": round(make_s, 1),
    }))


if __name__ == "__main__":
    main()
