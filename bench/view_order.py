"""``--view-order random``: the time (and on S3 the requests) to gather an epoch's label rows from S seeds.

A store of ``--samples`` rows (default ImageNet-1k train's 1,281,167) and ``--seeds`` seeds (default 64), k = 10
at 1,000 classes, with synthetic teacher outputs (``bench/store.py``'s) and ``imagenet-rrc`` views (their digests,
as a label job writes them; ``--store-views``: the parameters), written once through the store's API and copied to
the other seeds (their files are real copies, not links). ``StoreStream.labels_for_epoch`` is timed as it runs now
(each seed opened once a run and kept: ``pipelines.store.SeedReader``; each seed read a block of chunks at a time,
the chunk files decoded by Blosc directly, a thread a core; the first epoch also checks each seed's view digests)
for ``--epochs`` epochs, and as it
ran before (``LabelStore.load`` per chunk and seed, every seed listed and opened again: ``before``); each
gathers every sample's row of the seed drawn for it, and the two must agree. ``--s3`` puts the store on the
counting S3 server (``bench/_s3.py``) and counts the requests of each epoch (one process: one rank) and those
beyond the chunks it reads (``chunks_per_epoch``: one GET each). Targets (issue 32): under 10 s an epoch locally,
under 100 requests an epoch beyond the chunks once the seeds are open (``first_epoch_beyond_chunks``: opening them).

    python bench/view_order.py [--samples N] [--seeds S] [--chunk-rows R] [--s3] [--skip-before] [--store-views]
                               [--smoke]
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
from stillroom.pipelines.store import COMPLETE, LabelStore, SeedLabels, StoreSchema  # noqa: E402
from stillroom.pipelines.store.view_digest import PROBE_ROWS, view_digests  # noqa: E402
from stillroom.pipelines.views import draw_views, get_recipe, num_view_params  # noqa: E402
from stillroom.student.data import StoreStream, label_names  # noqa: E402


def make_store(root: str, n: int, seeds: int, chunk_rows: int, hw: tuple[int, int], store_views: bool = False,
               k: int = 10, classes: int = 1000) -> LabelStore:
    """Seed 0 written through the store's API, the others its copies (their own COMPLETE, the same checksums). By
    default the store is as a label job writes it (format 4, the views' digests, not the views): each copy's
    ``COMPLETE`` then gets the probe digests of its own seed's views, which a reader checks when it opens a seed
    (the full digests stay seed 0's: drawing 64 seeds of ImageNet's views takes minutes, and nothing here reads
    them). ``store_views``: the parameters stored instead (read with the labels every epoch)."""
    recipe = get_recipe("imagenet-rrc")
    labels = synthetic_labels(n, k, classes, np.random.default_rng(0))
    labels["view"] = draw_views(recipe, 0, np.arange(n), n, hw)
    schema = StoreSchema(num_samples=n, num_classes=classes, top_k=k, chunk_rows=chunk_rows,
                         view_params=num_view_params(recipe), store_views=store_views)
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
        if not store_views:
            complete = store._seed(s) / COMPLETE
            record = complete.read_json()
            probes = [np.arange(c, min(c + PROBE_ROWS, n)) for c in range(0, n, chunk_rows)]
            drawn = np.split(draw_views(recipe, s, np.concatenate(probes), n, hw), np.cumsum([len(p) for p in probes]))
            record["seed"] = s
            record["views"]["probe_sha256"] = [view_digests(d, len(d))["chunk_sha256"][0] for d in drawn[:-1]]
            complete.write_json(record)
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
    ap.add_argument("--store-views", action="store_true",
                    help="store the view parameters (read every epoch) instead of their digests")
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
        # the data set is only its size here: labels_for_epoch reads no image
        ds = load_dataset(f"synthetic:n={n},classes=1000,size=4")
        t = time.perf_counter()
        store = make_store(root, n, seeds, args.chunk_rows, (4, 4), args.store_views)
        write_s = time.perf_counter() - t
        stream = StoreStream(store, ds, get_recipe("imagenet-rrc"), 256, loader_workers=0, view_order="random")

        cpu: list[float] = []  # each timed call's CPU seconds, all its threads (a loaded machine's wall time is not)

        def timed(fn, epoch: int) -> tuple[float, SeedLabels, int | None]:
            if server is not None:
                server.counts(reset=True)
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn(epoch)
            seconds = time.perf_counter() - t0
            cpu.append(round(time.process_time() - c0, 2))
            requests = sum(server.counts()["requests"].values()) if server is not None else None
            return seconds, out, requests

        chunk_reads = -(-n // args.chunk_rows) * seeds * len(store.stored_names(label_names(store)))
        result: dict = {"bench": "view_order", "samples": n, "seeds": seeds, "chunk_rows": args.chunk_rows,
                        "store_views": args.store_views, "chunks_per_epoch": chunk_reads, "s3": args.s3,
                        "store_write_s": round(write_s, 1)}
        after_s: list[float] = []
        after_req: list[int] = []  # with --s3 alone: the requests the server saw
        last = None
        for epoch in range(args.epochs):
            seconds, last, req = timed(stream.labels_for_epoch, epoch)
            after_s.append(round(seconds, 2))
            if req is not None:
                after_req.append(req)
        result.update(after_s=after_s, after_cpu_s=cpu[:])
        if not args.skip_before:
            seconds, old, req = timed(lambda e: before(stream, e), args.epochs - 1)
            for name, a in old.arrays.items():
                if last is not None and not np.array_equal(a, last.arrays[name]):
                    raise SystemExit(f"bench/view_order.py: the old and new ways gather different {name}")
            result.update(before_s=round(seconds, 2), before_cpu_s=cpu[-1])
            if req is not None:
                result.update(before_requests=req, before_beyond_chunks=req - chunk_reads)
        targets = {"under_10_s": max(after_s) < 10}
        if args.s3:
            beyond = [r - chunk_reads for r in after_req]
            result.update(after_requests=after_req, first_epoch_beyond_chunks=beyond[0], after_beyond_chunks=beyond)
            targets["requests_beyond_chunks_under_100"] = max(beyond[1:] or beyond) < 100
        result["targets_met"] = targets
        print(json.dumps(result))
    finally:
        shutil.rmtree(local, ignore_errors=True)
        if server is not None:
            server.close()


if __name__ == "__main__":
    main()
