"""Teacher feature maps read by the rows of shuffled batches: stillroom's reader against zarr's own.

Writes one seed's ``features`` array through the label store (sharded: ``chunk_rows`` rows a file in inner
chunks of 16 rows), then reads random batches (a shuffled epoch: each row of a batch in a chunk of its own, as on
ImageNet's 157 chunks) with ``student._loader.FeatureRows`` and with zarr's ``array.oindex[ids]`` on the same
array, and with zarr on the layout stores had before (features chunked by ``chunk_rows`` rows, unsharded).
Prints one JSON line: rows read a second each way and their ratio.

    python bench/features.py [--samples N] [--chunk-rows R] [--shape C,h,w] [--batches B]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from stillroom.pipelines.store import LabelStore, StoreSchema
from stillroom.pipelines.store.label_store import _compressor
from stillroom.student._loader import FeatureRows


def rows_per_s(read, n: int, batch: int, batches: int, rng: np.random.Generator) -> tuple[float, float]:
    """Rows a second of wall time and of this process's CPU time (its threads included): on a shared machine
    the second is the steadier."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        read(rng.choice(n, batch, replace=False))
    return batch * batches / (time.perf_counter() - wall), batch * batches / max(time.process_time() - cpu, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=262_144)
    ap.add_argument("--chunk-rows", type=int, default=8192)
    ap.add_argument("--shape", default="64,4,4", help="C,h,w of the map (64x4x4 f16: 2 KB a sample)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory, removed after)")
    args = ap.parse_args()
    n, rows = args.samples, args.chunk_rows
    try:
        c, h, w = (int(v) for v in args.shape.split(","))
    except ValueError:
        raise SystemExit("stillroom: error: --shape takes C,h,w, e.g. 64,4,4") from None
    shape = (c, h, w)
    rng = np.random.default_rng(0)

    def chunk(start: int) -> np.ndarray:  # rows [start, start + rows), made on the spot: nothing held whole
        return np.random.default_rng(start).normal(0, 2, (min(rows, n - start), *shape)).astype(np.float16)

    root = args.dir or tempfile.mkdtemp(prefix="stillroom-bench-features-")
    try:
        schema = StoreSchema(num_samples=n, num_classes=10, top_k=1, feature_shape=shape, chunk_rows=rows)
        store = LabelStore.create(root, {"bench": "features"}, schema)
        store.begin_seed(0)
        seed_dir = Path(store.seed_dir(0))  # a store in a local directory
        t = time.perf_counter()
        group = zarr.open_group(store=str(seed_dir), mode="r+", zarr_format=3)
        sharded = group["features"]
        if not isinstance(sharded, zarr.Array):
            raise SystemExit(f"stillroom: error: {seed_dir}/features is a zarr group, not the features array")
        for start in range(0, n, rows):
            sharded[start : start + rows] = chunk(start)
        write_s = time.perf_counter() - t
        old = group.create_array("features_unsharded", shape=(n, *shape), dtype="float16",
                                 chunks=(rows, *shape), compressors=_compressor("float16"), fill_value=0)
        t = time.perf_counter()
        for start in range(0, n, rows):
            old[start : start + rows] = chunk(start)
        old_write_s = time.perf_counter() - t

        reader = FeatureRows(seed_dir)
        check = rng.choice(n, args.batch_size, replace=False)
        expected = np.stack([chunk(i // rows * rows)[i % rows] for i in check])
        if not np.array_equal(reader.take(check), expected) or not np.array_equal(old.oindex[check], expected):
            raise SystemExit("stillroom: error: FeatureRows read other values than were written")
        ours = rows_per_s(reader.take, n, args.batch_size, args.batches, rng)
        zarrs = rows_per_s(lambda ids: sharded.oindex[np.sort(ids)], n, args.batch_size, args.batches, rng)
        unsharded = rows_per_s(lambda ids: old.oindex[np.sort(ids)], n, args.batch_size,
                               max(1, args.batches // 10), rng)
        disk = {name: sum(p.stat().st_size for p in (seed_dir / name).rglob("*") if p.is_file())
                for name in ("features", "features_unsharded")}
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({
        "bench": "features", "samples": n, "chunk_rows": rows, "shape": list(shape), "batch_size": args.batch_size,
        "feature_rows_per_s": round(ours[0]), "zarr_oindex_rows_per_s": round(zarrs[0]),
        "zarr_unsharded_rows_per_s": round(unsharded[0]), "ours_over_zarr": round(ours[0] / zarrs[0], 1),
        "cpu_rows_per_s": {"feature_rows": round(ours[1]), "zarr_oindex": round(zarrs[1]),
                           "zarr_unsharded": round(unsharded[1])},
        "cpu_ours_over_zarr": round(ours[1] / zarrs[1], 1),
        "write_rows_per_s": round(n / write_s), "unsharded_write_rows_per_s": round(n / old_write_s),
        "bytes_per_sample": round(disk["features"] / n, 1),
        "unsharded_bytes_per_sample": round(disk["features_unsharded"] / n, 1),
    }))


if __name__ == "__main__":
    main()
