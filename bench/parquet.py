"""Rows of Parquet shards read at random: by row group (Parquet's unit) against the node's staged Arrow copies.

A shuffled epoch asks each row group for about one row. ``ParquetShards`` reads a shard that is not staged by
row group (its image column whole, the last ``ROW_GROUP_CACHE`` groups kept), and a staged shard
(``pipelines._shard_stage``: an Arrow IPC copy on the node's disk, memory-mapped) row by row. This bench writes
ImageNet-shaped shards (``--rows-per-group`` rows of ``--image-kb`` KB JPEGs a row group, Hugging Face's layout;
kept under ``--work``, never committed), opens them twice, staging off and staged (every shard copied first:
the copy's seconds are printed), and reads the same shuffled batches of ``--batch`` ids from each, the page
cache warm for both (each way reads every shard once before it is timed), rounds interleaved, the best round of
each. Prints one JSON line: images/s each way and ``staged_over_row_groups`` (target >= 5: a row group's read
must not cost more than decoding its image). On ImageNet (12,800 row groups of 100) the row-group cache almost
never hits; here, with ``--shards x groups`` groups, it hits about ``ROW_GROUP_CACHE / groups`` of the time.

    python bench/parquet.py [--shards 8] [--groups 5] [--rows-per-group 100] [--image-kb 110] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np


def write_shards(out: Path, shards: int, groups: int, rows: int, image_kb: int) -> Path:
    """``out/train/*.parquet``: ``shards`` files of ``groups`` row groups of ``rows`` distinct JPEGs of about
    ``image_kb`` KB (noise, so they do not compress), labels of 10 classes; kept for the next run."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    done = out / f".complete-{shards}-{groups}-{rows}-{image_kb}"
    if done.exists():
        return out
    (out / "train").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    side = int((image_kb * 1024 / 3 / 0.32) ** 0.5)  # noisy RGB at quality 90 keeps about 0.32 of its bytes
    base = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    meta = {"info": {"features": {"image": {"_type": "Image"},
                                  "label": {"names": [str(c) for c in range(10)], "_type": "ClassLabel"}}}}
    for s in range(shards):
        images = []
        for i in range(groups * rows):
            buf = io.BytesIO()
            pixels = np.roll(base, (s * groups * rows + i) * 7, axis=1)  # distinct bytes, the same size
            Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
            images.append({"bytes": buf.getvalue(), "path": f"{s}-{i}.jpg"})
        table = pa.table({"image": images, "label": pa.array(np.arange(len(images)) % 10, pa.int64())})
        pq.write_table(table.replace_schema_metadata({"huggingface": json.dumps(meta)}),
                       out / "train" / f"train-{s:05d}.parquet", row_group_size=rows)
    done.touch()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--groups", type=int, default=5, help="row groups a shard")
    ap.add_argument("--rows-per-group", type=int, default=100, help="100: Hugging Face's for image data sets")
    ap.add_argument("--image-kb", type=int, default=110, help="110: ImageNet's mean JPEG")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=40, help="batches a round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/tmp/stillroom-bench-parquet")
    args = ap.parse_args()

    from stillroom.pipelines.data import ParquetShards
    from stillroom.pipelines.data import stage as _shard_stage

    work = Path(args.work)
    root = write_shards(work / "shards", args.shards, args.groups, args.rows_per_group, args.image_kb)
    os.environ[_shard_stage.ENV] = "off"
    plain = ParquetShards(str(root), "train")
    plain.encoded(np.arange(1))  # its staging decided now: off
    shutil.rmtree(work / "stage", ignore_errors=True)  # the copies made anew: their seconds are measured
    os.environ[_shard_stage.ENV] = str(work / "stage")
    staged = ParquetShards(str(root), "train")
    t = time.perf_counter()
    for s in range(len(staged.files)):
        staged._stage.stage(s)
    stage_s = time.perf_counter() - t
    n = len(plain)
    for ds in (plain, staged):  # the page cache warm for both: every shard read once
        ds.encoded(np.arange(0, n, args.rows_per_group // 2))
    for s in range(len(staged.files)):
        staged._stage.read(s, 0, [0])
    rng = np.random.default_rng(1)
    best = {"row_groups": float("inf"), "staged": float("inf")}
    for r in range(args.rounds):
        batches = [rng.choice(n, args.batch, replace=False) for _ in range(args.batches)]
        ways = [("row_groups", plain), ("staged", staged)]
        for name, ds in ways[r % 2:] + ways[: r % 2]:
            ds._groups.clear()
            t = time.perf_counter()
            for ids in batches:
                ds.encoded(ids)
            best[name] = min(best[name], time.perf_counter() - t)
    images = args.batch * args.batches
    per_s = {name: round(images / s, 1) for name, s in best.items()}
    image_bytes = float(np.mean([len(b) for b, _ in plain.encoded(np.arange(0, n, max(1, n // 64)))]))
    print(json.dumps({
        "bench": "parquet", "shards": args.shards, "row_groups": args.shards * args.groups,
        "rows_per_group": args.rows_per_group, "mean_image_bytes": round(image_bytes),
        "images_per_s": per_s, "ms_per_image": {k: round(1000 / v, 3) for k, v in per_s.items()},
        "staged_over_row_groups": round(per_s["staged"] / per_s["row_groups"], 2), "target": 5.0,
        "stage_seconds": round(stage_s, 2),
        "stage_bytes": sum(p.stat().st_size for p in (work / "stage").glob("*.arrow")),
        "shard_bytes": sum(p.stat().st_size for p in (root / "train").glob("*.parquet")),
    }))


if __name__ == "__main__":
    main()
