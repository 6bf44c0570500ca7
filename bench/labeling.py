"""Labeling throughput: `stillroom label` on Ray against a plain in-process teacher loop, same views.

In one run, on the same views (Fashion-MNIST slice, ``fmnist-rrc``, seed 0), batch size, thread count and device:
(a) the limit: a plain loop of teacher forwards (``torch.inference_mode``) over views built beforehand with
    ``build_views``, on as many torch threads as the pipeline's one actor gets (every core);
(b) ``run_labeling(backend="ray")`` on a local Ray started beforehand (``ray_start_s``) with one actor holding
    every core: steady-state images/s (the actor's start and teacher load excluded; view building, top-k and
    store writes included), and the first run's actor start (``startup_s``) and end-to-end seconds.
(a) and (b) are interleaved ``--repeats`` times and the best of each is compared, so that load from other
processes on a shared machine (which hits a multi-threaded torch loop hard) biases neither side. The
teacher has random weights (speed does not depend on them). Prints one JSON line with the ratio.
Target: ratio >= 0.9 for resnet50 at 112 px.

    python bench/labeling.py [--teacher resnet50] [--resolution 112] [--samples 1024] [--repeats 2] [--threads N]
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
    ap.add_argument("--teacher", default="resnet50", help="a timm model name (random weights)")
    ap.add_argument("--resolution", type=int, default=112, help="the teacher's input size (views are upsampled)")
    ap.add_argument("--samples", type=int, default=1024, help="label the first N Fashion-MNIST training images")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--chunk-rows", type=int, default=8192, help="store chunk (and piece) rows; the CLI default")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved (a), (b) rounds; the best of each counts")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads of the loop and CPUs of the local Ray (its one actor's threads)")
    args = ap.parse_args()

    import ray
    import timm

    from pipelines.datasets import load_dataset
    from pipelines.labeling import LabelConfig, run_labeling
    from pipelines.teachers import Preprocess, load_teacher, save_checkpoint
    from pipelines.views import build_views, get_recipe

    threads = args.threads  # one actor on a local Ray of `threads` CPUs runs torch on that many threads
    torch.set_num_threads(threads)
    t = time.perf_counter()
    ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - t
    work = Path(tempfile.mkdtemp(prefix="stillroom-bench-labeling-"))
    try:
        kwargs = {"num_classes": 10, "in_chans": 1}
        ckpt = work / "teacher.pt"
        save_checkpoint(ckpt, args.teacher, timm.create_model(args.teacher, **kwargs), kwargs,
                        Preprocess(args.resolution, (0.286,), (0.353,), 1), extra={})
        spec = f"{args.teacher}@{ckpt}"
        dataset = f"fashion-mnist:n={args.samples}"
        ds = load_dataset(dataset)
        teacher = load_teacher(spec, 10)
        batches = [build_views(ds, get_recipe("fmnist-rrc"), 0, np.arange(s, min(s + args.batch_size, len(ds))))[0]
                   for s in range(0, len(ds), args.batch_size)]
        with torch.inference_mode():
            teacher.logits(batches[0])  # warm-up: kernels chosen, memory allocated

        def raw_pass() -> float:
            t = time.perf_counter()
            with torch.inference_mode():
                for views in batches:
                    teacher.logits(views)
            return len(ds) / (time.perf_counter() - t)

        raw_runs, pipeline_runs, cold = [], [], None
        for r in range(args.repeats):
            raw_runs.append(raw_pass())
            config = LabelConfig(dataset=dataset, teachers=(spec,), recipe="fmnist-rrc", seeds=(0,), top_k=10,
                                 batch_size=args.batch_size, chunk_rows=args.chunk_rows, num_workers=1,
                                 store_root=str(work / f"stores{r}"))
            t = time.perf_counter()
            result = run_labeling(config, backend="ray", progress=False)
            if cold is None:
                cold = {"startup_s": result["startup_s"], "end_to_end_s": round(time.perf_counter() - t, 1)}
            pipeline_runs.append(result["images_per_s"])
        raw_ips, pipeline_ips = max(raw_runs), max(pipeline_runs)
        print(json.dumps({
            "bench": "labeling", "teacher": args.teacher, "resolution": args.resolution, "samples": len(ds),
            "batch_size": args.batch_size, "threads": threads, "device": "cpu",
            "raw_ips": round(raw_ips, 1), "pipeline_ips": round(pipeline_ips, 1),
            "ratio": round(pipeline_ips / raw_ips, 3), **(cold or {}),
            "raw_ips_runs": [round(x, 1) for x in raw_runs], "pipeline_ips_runs": pipeline_runs,
            "ray_start_s": round(ray_start_s, 1), "load_avg_1m": round(os.getloadavg()[0], 2),
        }))
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
