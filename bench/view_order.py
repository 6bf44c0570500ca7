"""``--view-order random``: the time (and on S3 the requests) to gather an epoch's label rows from S seeds.

A store of ``--samples`` rows (default ImageNet-1k train's 1,281,167) and ``--seeds`` seeds (default 64), k = 10
at 1,000 classes, with synthetic teacher outputs (``bench/store.py``'s) and ``imagenet-rrc`` view parameters,
written once through the store's API and copied to the other seeds (their files are real copies, not links).
``StoreStream.labels_for_epoch`` is timed as it runs now (each seed opened once a run:
``pipelines.store.SeedReader``) and as it ran before (``LabelStore.load`` per chunk and seed: ``before``); each
gathers every sample's row of the seed drawn for it, and the two must agree. ``--s3`` puts the store on the
counting S3 server (``bench/_s3.py``) and counts the requests an epoch sends beyond the chunks it reads.
Targets (issue 32): under 10 s locally, under 100 requests an epoch per rank beyond the chunks.

    python bench/view_order.py [--samples N] [--seeds S] [--chunk-rows R] [--s3] [--skip-before] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store import synthetic_labels  # noqa: E402

from stillroom.pipelines.data import load_dataset  # noqa: E402
from stillroom.pipelines.store import LabelStore, SeedLabels, StoreSchema  # noqa: E402
from stillroom.pipelines.views import draw_views, get_recipe, num_view_params  # noqa: E402
from stillroom.student.data import StoreStream, label_names  # noqa: E402


def make_store(root: str, n: int, seeds: int, chunk_rows: int, k: int = 10, classes: int = 1000) -> LabelStore:
    """Seed 0 written through the store's API, the others its copies (their own COMPLETE, the same checksums). The
    views are stored (``--store-views``): a copy's digests would be seed 0's, and what is timed here is gathering
    the labels (format 3's redraw and digest check are timed in bench/store.py)."""
    recipe = get_recipe("imagenet-rrc")
    labels = synthetic_labels(n, k, classes, np.random.default_rng(0))
    labels["view"] = draw_views(recipe, 0, np.arange(n), n, (375, 500))
    schema = StoreSchema(num_samples=n, num_classes=classes, top_k=k, chunk_rows=chunk_rows,
                         view_params=num_view_params(recipe), store_views=True)
    store = LabelStore.create(root, {"bench": "view_order", "recipe": recipe.to_dict()}, schema)
    store.begin_seed(0)
    for i, (a, b) in enumerate(schema.pieces()):
        store.write_piece(0, i, a, {name: arr[a:b] for name, arr in labels.items()})
    store.commit_seed(0)
    for s in range(1, seeds):
        src, dst = store.seed_dir(0), store.seed_dir(s)
        if isinstance(src, Path):
            shutil.copytree(src, dst)
        else:
            import fsspec

            fs = fsspec.core.url_to_fs(src)[0]
            fs.copy(src, str(dst), recursive=True)
    return LabelStore(store.path)


def before(stream: StoreStream, epoch: int) -> SeedLabels:
    """``labels_for_epoch`` as it was: ``LabelStore.load`` (the seed list, every COMPLETE, the group, its arrays)
    for each chunk and seed."""
    index, store = stream.seed_index(epoch), stream.store
    shapes = store.schema.arrays()
    merged = {name: np.empty(shapes[name][0], dtype=shapes[name][1]) for name in label_names(store)}
    rows = store.schema.chunk_rows
    for start in range(0, len(index), rows):
        stop = min(start + rows, len(index))
        for i, s in enumerate(stream.seeds):
            taken = np.flatnonzero(index[start:stop] == i)
            if taken.size:
                for name, a in store.load(s, list(merged), (start, stop)).arrays.items():
                    merged[name][start + taken] = a[taken]
    return SeedLabels(-1, merged)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1_281_167)
    ap.add_argument("--seeds", type=int, default=64)
    ap.add_argument("--chunk-rows", type=int, default=8192)
    ap.add_argument("--epochs", type=int, default=2, help="epochs timed after the change (the first opens seeds)")
    ap.add_argument("--s3", action="store_true", help="the store on the counting S3 server (bench/_s3.py)")
    ap.add_argument("--skip-before", action="store_true", help="time only the current way")
    ap.add_argument("--smoke", action="store_true", help="a few thousand samples, 4 seeds: checks the bench runs")
    args = ap.parse_args()
    if args.smoke:
        args.samples, args.seeds, args.chunk_rows = min(args.samples, 4096), min(args.seeds, 4), 1024
    n, seeds = args.samples, args.seeds
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's TERM still removes the store (finally)
    server = None
    local = tempfile.mkdtemp(prefix="stillroom-bench-view-order-")
    try:
        root = local
        if args.s3:
            from _s3 import S3Bench

            server = S3Bench()
            import s3fs

            s3fs.S3FileSystem().mkdir("bench")
            root = "s3://bench/stores"
        t = time.perf_counter()
        store = make_store(root, n, seeds, args.chunk_rows)
        write_s = time.perf_counter() - t
        # the data set is only its size here: labels_for_epoch reads no image
        ds = load_dataset(f"synthetic:n={n},classes={store.schema.num_classes},size=4")
        stream = StoreStream(store, ds, get_recipe("identity"), 256, loader_workers=0, view_order="random")

        def timed(fn, epoch: int) -> tuple[float, SeedLabels, int | None]:
            if server is not None:
                server.counts(reset=True)
            t0 = time.perf_counter()
            out = fn(epoch)
            seconds = time.perf_counter() - t0
            requests = sum(server.counts()["requests"].values()) if server is not None else None
            return seconds, out, requests

        chunk_reads = -(-n // args.chunk_rows) * seeds * len(label_names(store))
        result: dict = {"bench": "view_order", "samples": n, "seeds": seeds, "chunk_rows": args.chunk_rows,
                        "chunks_per_epoch": chunk_reads, "s3": args.s3, "store_write_s": round(write_s, 1)}
        after_s, after_req, last = [], [], None
        for epoch in range(args.epochs):
            seconds, last, req = timed(stream.labels_for_epoch, epoch)
            after_s.append(round(seconds, 2))
            after_req.append(req)
        result.update(after_s=after_s)
        if not args.skip_before:
            seconds, old, req = timed(lambda e: before(stream, e), args.epochs - 1)
            for name, a in old.arrays.items():
                if last is not None and not np.array_equal(a, last.arrays[name]):
                    raise SystemExit(f"bench/view_order.py: the old and new ways gather different {name}")
            result.update(before_s=round(seconds, 2))
            if req is not None:
                result.update(before_requests=req)
        if args.s3:
            result.update(after_requests=after_req)
        targets = {"under_10_s": max(after_s) < 10}
        if args.s3 and len(after_req) > 1:  # later epochs send the chunks alone: the first's extra is the opening
            result["first_epoch_requests_beyond_chunks"] = after_req[0] - after_req[-1]
            targets["requests_beyond_chunks_under_100"] = after_req[0] - after_req[-1] < 100
        result["targets_met"] = targets
        print(json.dumps(result))
    finally:
        shutil.rmtree(local, ignore_errors=True)
        if server is not None:
            server.close()


if __name__ == "__main__":
    main()
