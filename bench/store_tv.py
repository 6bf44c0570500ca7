"""How far store format 4's top-k codes move a trained teacher's soft targets from float16's (issue 34).

Trains a small Fashion-MNIST teacher with ``stillroom teacher train`` (kept in ``--work`` between runs), labels
``--images`` views of the test split through the labeling worker (``Labeler``: the teacher's float16 top-k, ``lse``
and ``tail_lse``, as format 2 stores them), encodes and decodes them as format 4 does (``pipelines.store.codec``;
``--format 3``: as format 3 did) and rebuilds the targets from both at T = 1 and T = 4. Prints one JSON line: the
total variation's mean, 99th percentile and max, and the teacher's top-1 on those views. Target: at most 0.002 (the
max) at both temperatures.

    python bench/store_tv.py [--work DIR] [--epochs N] [--train-samples N] [--images N] [--top-k K] [--format 3|4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stillroom.pipelines.labeling import LabelConfig, Labeler, prepare_store
from stillroom.pipelines.store.codec import decode_topk, encode_topk
from stillroom.student.losses import soft_targets_from_topk

FMNIST = "/usr/share/datasets/fashion-mnist"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="keeps the teacher between runs (default: a temporary directory)")
    ap.add_argument("--data-root", default=FMNIST)
    ap.add_argument("--model", default="resnet10t")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-samples", type=int, default=20000)
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--top-k", type=int, default=5, help="of Fashion-MNIST's 10 classes (k < 10: a tail to keep)")
    ap.add_argument("--recipe", default="fmnist-rrc-mix", help="the views labeled (mixed views: flatter targets)")
    ap.add_argument("--format", type=int, default=4, choices=(3, 4), help="the store format's codes")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="stillroom-bench-tv-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"{args.model}-{args.epochs}ep-{args.train_samples}.pt"
    t = time.perf_counter()
    if not ckpt.exists():
        cmd = ["teacher", "train", "--dataset", "fashion-mnist", "--data-root", args.data_root, "--model", args.model,
               "--epochs", str(args.epochs), "--train-samples", str(args.train_samples), "--bn-samples", "2000",
               "--out", str(ckpt)]
        subprocess.run([sys.executable, "-m", "stillroom.services.cli", *cmd], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ})
    train_s = time.perf_counter() - t
    config = LabelConfig(dataset="fashion-mnist", split="test", data_root=args.data_root,
                         teachers=(f"{args.model}@{ckpt}",), recipe=args.recipe, top_k=args.top_k,
                         store_root=str(work / "stores"))
    store = prepare_store(config)
    ids = np.arange(min(args.images, store.schema.num_samples))
    labeled = Labeler(config, str(store.path), decode_workers=0).label(0, ids)
    decoded = decode_topk(encode_topk(labeled["topk_logit"], labeled["lse"], labeled["tail_lse"], version=args.format),
                          args.top_k, version=args.format)
    idx = torch.from_numpy(labeled["topk_idx"].astype(np.int64))
    out: dict = {"bench": "store_tv", "teacher": args.model, "epochs": args.epochs, "views": len(ids),
                 "top_k": args.top_k, "recipe": args.recipe, "format": args.format, "train_s": round(train_s, 1)}
    truth = np.asarray(labeled["hard"])
    from stillroom.pipelines.data import load_dataset

    out["teacher_top1_on_views"] = round(float((truth == load_dataset("fashion-mnist", "test", args.data_root)
                                                 .labels[ids]).mean()), 4)
    out["top1_prob_mean"] = round(float(np.exp(labeled["topk_logit"][:, 0].astype(np.float64)
                                              - labeled["lse"]).mean()), 4)
    ok = True
    for T in (1.0, 4.0):
        old = soft_targets_from_topk(idx, torch.from_numpy(labeled["topk_logit"]),
                                     torch.from_numpy(labeled["tail_lse"]), 10, T)
        new = soft_targets_from_topk(idx, torch.from_numpy(decoded["topk_logit"]),
                                     torch.from_numpy(decoded["tail_lse"]), 10, T)
        tv = (0.5 * (old - new).abs().sum(1)).double()
        out[f"tv_t{T:g}"] = {"mean": round(float(tv.mean()), 6), "p99": round(float(tv.quantile(0.99)), 6),
                             "max": round(float(tv.max()), 6)}
        ok = ok and float(tv.max()) <= 0.002
    out["targets_met"] = {"tv_max_within_0.002": ok}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
