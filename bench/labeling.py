"""Labeling throughput: `stillroom label` on Ray against a plain in-process teacher loop, same views.

In one run, on the same views (Fashion-MNIST, ``fmnist-rrc``, seed 0), batch size, thread count and device:
(a) the limit: a plain loop of teacher forwards over views built beforehand (``torch.inference_mode``);
(b) ``run_labeling(backend="ray")`` with one actor holding every core: steady-state images/s (Ray start and
    the actor's teacher load excluded) and the end-to-end seconds, store writes and view building included.
The teacher has random weights (speed does not depend on them). Prints one JSON line with the ratio.
Target: ratio >= 0.9 for resnet50 at 112 px.

    python bench/labeling.py [--teacher resnet50] [--resolution 112] [--samples 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="resnet50")
    ap.add_argument("--resolution", type=int, default=112)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    import timm

    from pipelines.datasets import load_dataset
    from pipelines.labeling import LabelConfig, run_labeling
    from pipelines.teachers import Preprocess, load_teacher, save_checkpoint
    from pipelines.views import build_views, get_recipe

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="stillroom-bench-labeling-"))
    try:
        kwargs = {"num_classes": 10, "in_chans": 1}
        ckpt = work / "teacher.pt"
        save_checkpoint(ckpt, args.teacher, timm.create_model(args.teacher, **kwargs), kwargs,
                        Preprocess(args.resolution, (0.286,), (0.353,), 1), extra={})
        spec = f"{args.teacher}@{ckpt}"
        dataset = f"fashion-mnist:n={args.samples}"
        ds = load_dataset(dataset)
        recipe = get_recipe("fmnist-rrc")

        teacher = load_teacher(spec, 10)
        batches = [build_views(ds, recipe, 0, np.arange(s, min(s + args.batch_size, len(ds))))[0]
                   for s in range(0, len(ds), args.batch_size)]
        t = time.perf_counter()
        with torch.inference_mode():
            for views in batches:
                teacher.logits(views)
        raw_s = time.perf_counter() - t

        t = time.perf_counter()
        result = run_labeling(LabelConfig(dataset=dataset, teachers=(spec,), recipe="fmnist-rrc", seeds=(0,),
                                          top_k=10, batch_size=args.batch_size, store_root=str(work / "stores"),
                                          num_workers=1, chunk_rows=256), backend="ray", progress=False)
        end_to_end_s = time.perf_counter() - t
        raw_ips = len(ds) / raw_s
        print(json.dumps({
            "bench": "labeling", "teacher": args.teacher, "resolution": args.resolution, "samples": len(ds),
            "batch_size": args.batch_size, "threads": threads, "device": "cpu",
            "raw_ips": round(raw_ips, 1), "pipeline_ips": result["images_per_s"],
            "ratio": round(result["images_per_s"] / raw_ips, 3), "startup_s": result["startup_s"],
            "end_to_end_s": round(end_to_end_s, 1),
        }))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
