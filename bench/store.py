"""Label store at ImageNet-1k train size: write, load a seed, gather random batches, bytes on disk.

1,281,167 samples, k = 10, 1,000 classes, one seed; synthetic teacher outputs shaped like real ones
(sorted top-k logits, a tail log-sum-exp ``tail_lse`` and ``lse`` the log-sum-exp of both, as store format 2
holds them) and real view parameters of ``--recipe`` (``imagenet-rrc``: 17 columns; ``deit``: 43, with its
RandAugment, random erasing and the partner's, all stored as the labeling job stores them).
Prints one JSON line. Targets: gather >= 2,000,000 samples/s, a seed loads in <= 2 s, <= 48 bytes/sample for a
recipe without photometric ops and <= 80 for one with them (issue 20; ml-dr's store holds about 73).

    python bench/store.py [--samples N] [--recipe NAME] [--dir DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

import numpy as np

from stillroom.pipelines.store import LabelStore, StoreSchema
from stillroom.pipelines.views import draw_views, get_recipe, num_view_params


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1_281_167)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--chunk-rows", type=int, default=65536)
    ap.add_argument("--recipe", default="imagenet-rrc", help="whose view parameters the store holds (e.g. deit)")
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
    labels["view"] = draw_views(recipe, 0, np.arange(n), n, (375, 500))
    make_s = time.perf_counter() - t

    root = args.dir or tempfile.mkdtemp(prefix="stillroom-bench-store-")
    try:
        schema = StoreSchema(num_samples=n, num_classes=args.classes, top_k=k, chunk_rows=args.chunk_rows,
                             view_params=num_view_params(recipe))
        store = LabelStore.create(root, {"bench": "store", "recipe": recipe.to_dict()}, schema)
        t = time.perf_counter()
        store.begin_seed(0)
        for i, (a, b) in enumerate(schema.pieces()):
            store.write_piece(0, i, a, {name: arr[a:b] for name, arr in labels.items()})
        store.commit_seed(0)
        write_s = time.perf_counter() - t

        t = time.perf_counter()
        seed = LabelStore(store.path).load(0)
        load_s = time.perf_counter() - t
        differs = [name for name in labels if not np.array_equal(seed.arrays[name], labels[name])]
        if differs:
            raise SystemExit(f"bench/store.py: the loaded seed differs from what was written in {differs}")

        batches = [rng.integers(0, n, size=256) for _ in range(50 if args.smoke else 2000)]
        t = time.perf_counter()
        for ids in batches:
            seed.gather(ids)
        gather_s = time.perf_counter() - t
        bytes_on_disk = store.size_on_disk(0)
        view_bytes = (store._seed(0) / "view").size()
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    print(json.dumps({
        "bench": "store", "samples": n, "top_k": k, "classes": args.classes,
        "write_samples_per_s": round(n / write_s), "load_seed_s": round(load_s, 3),
        "gather_samples_per_s": round(256 * len(batches) / gather_s),
        "recipe": recipe.name, "view_params": num_view_params(recipe),
        "bytes_per_sample": round(bytes_on_disk / n, 2), "view_bytes_per_sample": round(view_bytes / n, 2),
        "targets_met": {"gather": 256 * len(batches) / gather_s >= 2_000_000,
                        "bytes": bytes_on_disk / n <= (80 if recipe.photometric else 48), "load": load_s <= 2.0},
        "synthesis_s": round(make_s, 1),
    }))


if __name__ == "__main__":
    main()
