"""Labeling throughput: `stillroom label` on Ray against the loop a user would write, on the same cores.

``--data fmnist`` (in memory, the default): on the same views (Fashion-MNIST slice, ``fmnist-rrc``, seed 0),
batch size, thread count and device: (a) the limit, a plain loop of teacher forwards (``torch.inference_mode``)
over views built beforehand with ``build_views``, on as many torch threads as the pipeline's one actor gets;
(b) ``run_labeling(backend="ray")`` on a local Ray started beforehand (``ray_start_s``) with one actor holding
every core: steady-state images/s (actor start and teacher load excluded; view building, top-k and store
writes included). (a) and (b) are interleaved ``--repeats`` times and the best of each compared. Target:
ratio >= 0.9 for resnet50 at 112 px.

``--data jpeg``: a variable-size JPEG folder written once under ``--work`` by ``bench/data.py``'s generator
(Fashion-MNIST pixels at 160-512 px, random aspect, quality 90), a resnet50 teacher (random weights, 10
classes) at 224 px. ``plain_ips``: torchvision ``ImageFolder`` + ``RandomResizedCrop(224)`` +
``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize`` through a ``DataLoader`` into the teacher under
``torch.inference_mode``, the best of 1 and 2 loader workers (on CUDA: of half and all the cores), the same
torch threads. ``pipeline_ips``: ``stillroom label`` (``imagenet-rrc``) on a local Ray of ``--threads`` CPUs,
one label worker: its decode processes build uint8 views ahead of the teacher; start-up (actor, teacher,
index) excluded and reported as ``startup_s``. Target: ``ratio`` = pipeline / plain >= 1.0. ``peak_pss_mb``:
the peak memory of each side, its processes' summed proportional set size (PSS: pages forked processes share
counted once), sampled every 50 ms: the plain loop's process (which also holds the bench) and its loader
workers; the label actor and its decode processes.

``--store-root s3://BUCKET/prefix`` (jpeg): the pipeline also labels into a store under that URL (through s3fs,
credentials and ``AWS_ENDPOINT_URL`` from the environment), interleaved with local stores ``--repeats`` times;
``url_vs_local_ratio`` = the best of each (target >= 0.95). The stores made under the URL are removed.

``--device cuda`` (needs a GPU): the same with the teacher on the GPU (bf16 autocast, pinned memory, uint8
views; stillroom decodes the JPEGs on the GPU with nvJPEG), 20,000 images by default; under 5 minutes on one
GPU with the folder written.

Prints one JSON line.

``--data jpeg --seeds S`` (S > 1, CPU): S seeds labeled in one pass (``Labeler.label_seeds``: each image decoded
once for all its seeds) against one seed at a time, views/s over the labeling time of each. Target: ratio >= 1.3
with a resnet18 teacher at 224 px.

    python bench/labeling.py [--data fmnist|jpeg] [--device cpu|cuda] [--teacher resnet50] [--resolution N]
                             [--samples N] [--batch-size N] [--threads N] [--work DIR] [--store-root URL] [--seeds S]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _pss_mb(pids: set[int]) -> float:
    """The processes' summed proportional set size (a page shared by forked processes counted once in all)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    out = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            out[int(d.name)] = (ppid, (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, IndexError, ValueError):
            continue
    return out


class PeakRss:
    """Samples the summed PSS of some processes and all their descendants every 50 ms; ``peak_mb`` the largest.
    The roots: this process, or every process whose command line starts with ``prefix`` (a Ray actor's title)."""

    def __init__(self, prefix: str | None = None):
        self.prefix, self.peak_mb, self._stop = prefix, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            procs = _processes()
            roots = ({pid for pid, (_, cmd) in procs.items() if cmd.startswith(self.prefix)} if self.prefix
                     else {os.getpid()})
            tree, grew = set(roots), True
            while grew:
                more = {pid for pid, (ppid, _) in procs.items() if ppid in tree} - tree
                tree |= more
                grew = bool(more)
            self.peak_mb = max(self.peak_mb, _pss_mb(tree))


def plain_pass(folder: Path, model: torch.nn.Module, size: int, workers: int, batch: int, device: str) -> float:
    """The loop a user would write: torchvision ImageFolder + RandomResizedCrop(size) + DataLoader -> teacher."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    data = datasets.ImageFolder(str(folder / "train"), tf)
    cuda = device == "cuda"
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=cuda)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    n, t = 0, time.perf_counter()
    with torch.inference_mode(), autocast:
        for x, _ in loader:
            model(x.to(device, non_blocking=True))
            n += len(x)
    if cuda:
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def bench_jpeg(args: argparse.Namespace) -> None:
    """A JPEG folder at 224 px: the plain torchvision loop against stillroom label, same cores (and GPU)."""
    import ray
    import timm

    from stillroom.pipelines.labeling import LabelConfig, run_labeling
    from stillroom.pipelines.teachers import Preprocess, load_teacher, save_checkpoint

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from data import make_folder  # bench/data.py: the same generator as the data bench

    cuda = args.device == "cuda"
    threads = args.threads
    torch.set_num_threads(threads)
    work = Path(args.work)
    t = time.perf_counter()
    folder = make_folder(work / f"jpeg{args.samples}", args.samples, None, max(1, os.cpu_count() or 1))
    make_s = time.perf_counter() - t
    kwargs: dict[str, Any] = {"num_classes": 10, "in_chans": 3}
    ckpt = work / f"{args.teacher}.pt"
    torch.manual_seed(0)
    save_checkpoint(ckpt, args.teacher, timm.create_model(args.teacher, **kwargs), kwargs,
                    Preprocess(args.resolution, IMAGENET_MEAN, IMAGENET_STD, 3), extra={})
    spec = f"{args.teacher}@{ckpt}"
    model = load_teacher(spec, 10, args.device).model
    workers = (max(1, threads // 2), threads) if cuda else (1, 2)
    plain, plain_rss = {}, 0.0
    for w in workers:
        with PeakRss() as rss:
            plain[w] = plain_pass(folder, model, args.resolution, w, args.batch_size, args.device)
        plain_rss = max(plain_rss, rss.peak_mb)
    del model
    t = time.perf_counter()
    ray.init(num_cpus=threads, num_gpus=1 if cuda else 0, include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - t
    stores = Path(tempfile.mkdtemp(prefix="stillroom-bench-labeling-stores-"))
    recipe = "imagenet-rrc" if args.resolution == 224 else f"imagenet-rrc:size={args.resolution}"
    config = LabelConfig(dataset=f"imagefolder:{folder}", teachers=(spec,), recipe=recipe, seeds=(0,), top_k=10,
                         batch_size=args.batch_size, chunk_rows=args.chunk_rows, num_workers=1,
                         gpus_per_worker=1.0 if cuda else 0.0, store_root=str(stores),
                         teacher_dtype="bf16" if cuda else "fp32")  # as the plain loop: bf16 autocast on CUDA
    by_root: dict[str, list[float]] = {"local": [], "url": []}
    try:
        # with --store-root URL: a local store and one under the URL, interleaved --repeats times (each run a
        # new store: the same root again would be a cache hit); the best of each compared
        rounds = [("local", str(stores / str(r))) for r in range(args.repeats if args.store_root else 1)]
        if args.store_root:
            url = f"{args.store_root.rstrip('/')}/bench-labeling-{os.getpid()}"
            rounds = [x for r, local in enumerate(rounds) for x in (local, ("url", f"{url}/{r}"))]
        for kind, root in rounds:
            t = time.perf_counter()
            with PeakRss(prefix="ray::LabelWorker") as rss:
                result = run_labeling(replace(config, store_root=root), backend="ray", progress=False)
            by_root[kind].append(result["views_per_s"])
            if kind == "local":
                end_to_end_s, local_result = time.perf_counter() - t, result
    finally:
        ray.shutdown()
        shutil.rmtree(stores, ignore_errors=True)
        if args.store_root:
            from stillroom.pipelines.core import Location

            Location(url).remove(recursive=True)
    result = {**local_result, "views_per_s": max(by_root["local"])}
    url_fields = {"store_root_url": args.store_root, "url_pipeline_ips": max(by_root["url"]),
                  "url_vs_local_ratio": round(max(by_root["url"]) / max(by_root["local"]), 3),
                  "pipeline_ips_rounds": by_root} if args.store_root else {}
    plain_ips = max(plain.values())
    print(json.dumps({
        "bench": "labeling", "data": "jpeg", "device": args.device,
        "card": torch.cuda.get_device_name(0) if cuda else None, "teacher": args.teacher,
        "resolution": args.resolution, "samples": result["views"], "batch_size": args.batch_size,
        "threads": threads, "plain_ips": round(plain_ips, 1), "pipeline_ips": result["views_per_s"],
        "ratio": round(result["views_per_s"] / plain_ips, 3),
        "plain_ips_by_workers": {str(w): round(v, 1) for w, v in plain.items()},
        "startup_s": result["startup_s"], "end_to_end_s": round(end_to_end_s, 1),
        "decode": config.decode_on, "decode_workers": config.decode_processes(threads),
        "peak_pss_mb": {"plain": round(plain_rss), "pipeline_actor": round(rss.peak_mb)},
        "ray_start_s": round(ray_start_s, 1), "folder_write_s": round(make_s, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2), **url_fields,
    }))


def bench_seeds(args: argparse.Namespace) -> None:
    """``--data jpeg --seeds S``: labeling S seeds in one pass (each image decoded once for all its seeds, the
    teacher's batches holding views of several images under several seeds) against one seed at a time (S runs of
    one seed): views/s over the labeling time of each (actor start-up excluded), same folder, teacher, cores."""
    import ray
    import timm

    from stillroom.pipelines.labeling import LabelConfig, run_labeling
    from stillroom.pipelines.teachers import Preprocess, save_checkpoint

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from data import make_folder

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    folder = make_folder(work / f"jpeg{args.samples}", args.samples, None, max(1, os.cpu_count() or 1))
    kwargs: dict[str, Any] = {"num_classes": 10, "in_chans": 3}
    ckpt = work / f"{args.teacher}.pt"
    torch.manual_seed(0)
    save_checkpoint(ckpt, args.teacher, timm.create_model(args.teacher, **kwargs), kwargs,
                    Preprocess(args.resolution, IMAGENET_MEAN, IMAGENET_STD, 3), extra={})
    recipe = "imagenet-rrc" if args.resolution == 224 else f"imagenet-rrc:size={args.resolution}"
    stores = Path(tempfile.mkdtemp(prefix="stillroom-bench-labeling-stores-"))
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    try:
        def label(root: str, seeds: tuple[int, ...]) -> dict:
            return run_labeling(LabelConfig(dataset=f"imagefolder:{folder}", teachers=(f"{args.teacher}@{ckpt}",),
                                            recipe=recipe, seeds=seeds, top_k=10, batch_size=args.batch_size,
                                            chunk_rows=args.chunk_rows, num_workers=1, store_root=str(stores / root)),
                                backend="ray", progress=False)

        seeds = tuple(range(args.seeds))
        alone = [label(f"alone{seed}", (seed,)) for seed in seeds]
        together = label("together", seeds)
    finally:
        ray.shutdown()
        shutil.rmtree(stores, ignore_errors=True)
    alone_vps = sum(r["views"] for r in alone) / sum(r["labeling_s"] for r in alone)
    together_vps = together["views"] / together["labeling_s"]
    profile = seeds_profile(folder, args.teacher, kwargs, recipe, args.resolution, args.seeds, args.batch_size)
    print(json.dumps({
        "bench": "labeling", "data": "jpeg", "mode": "seeds", "seeds": args.seeds, "teacher": args.teacher,
        "resolution": args.resolution, "images": args.samples, "views": together["views"],
        "batch_size": args.batch_size, "threads": args.threads,
        "one_pass_views_per_s": round(together_vps, 1), "seed_at_a_time_views_per_s": round(alone_vps, 1),
        "ratio": round(together_vps / alone_vps, 3), "load_avg_1m": round(os.getloadavg()[0], 2),
        "profile": profile,
    }))


def seeds_profile(folder: Path, teacher: str, kwargs: dict, recipe_name: str, size: int, seeds: int, batch: int,
                  images: int = 64) -> dict:
    """Where a view's labeling time goes, in this process on the bench's threads: ``decode_ms`` an image and
    ``crop_ms`` a view (``decode_views`` of one view, and of the image's S views, over the first ``images``
    images, without DCT-scaled decoding so that the S views take one decode: one view costs decode + crop, S
    views decode + S crops; the pipeline's draft decoding makes ``d`` smaller), ``forward_ms`` a view (the teacher at
    ``batch``, ``torch.inference_mode``). From them, the ratio one pass would give if nothing else cost:
    ``S (d + c + f) / (d + S (c + f))`` with ``f`` as measured and with ``f / 50`` (a GPU's teacher, about 50x
    faster than this CPU's): a model, not a measurement."""
    import timm

    from stillroom.pipelines.data import load_dataset
    from stillroom.pipelines.views import decode_views, draw_views, get_recipe

    ds = load_dataset(f"imagefolder:{folder}")
    recipe = get_recipe(recipe_name)
    ids = np.arange(min(images, len(ds)))
    rows = [draw_views(recipe, s, ids, len(ds), ds.sizes)[:, :5] for s in range(seeds)]
    encoded = list(ds.encoded(ids))
    t = time.perf_counter()
    for i, (data, where) in enumerate(encoded):
        decode_views(data, where, [(rows[0][i], size)], False, recipe)
    one = (time.perf_counter() - t) / len(ids)
    t = time.perf_counter()
    for i, (data, where) in enumerate(encoded):
        decode_views(data, where, [(r[i], size) for r in rows], False, recipe)
    all_seeds = (time.perf_counter() - t) / len(ids)
    crop = max(all_seeds - one, 0.0) / (seeds - 1)
    decode = max(one - crop, 0.0)
    model = timm.create_model(teacher, **kwargs).eval()
    x = torch.rand(batch, 3, size, size)
    with torch.inference_mode():
        model(x)  # warm-up
        t = time.perf_counter()
        for _ in range(3):
            model(x)
    forward = (time.perf_counter() - t) / (3 * batch)

    def modelled(f: float) -> float:
        return round(seeds * (decode + crop + f) / (decode + seeds * (crop + f)), 3)

    return {"decode_ms": round(decode * 1e3, 2), "crop_ms": round(crop * 1e3, 2), "forward_ms": round(forward * 1e3, 2),
            "forward_share_of_a_view": round(forward / (decode + crop + forward), 3),
            "modelled_ratio": modelled(forward), "modelled_ratio_forward_50x_faster": modelled(forward / 50)}


def bench_fmnist(args: argparse.Namespace) -> None:
    """The in-memory mode: a plain teacher loop on prebuilt views against run_labeling on Ray."""

    import ray
    import timm

    from stillroom.pipelines.data import load_dataset
    from stillroom.pipelines.labeling import LabelConfig, run_labeling
    from stillroom.pipelines.teachers import Preprocess, load_teacher, save_checkpoint
    from stillroom.pipelines.views import build_views, get_recipe

    threads = args.threads  # one actor on a local Ray of `threads` CPUs runs torch on that many threads
    torch.set_num_threads(threads)
    t = time.perf_counter()
    ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - t
    work = Path(tempfile.mkdtemp(prefix="stillroom-bench-labeling-"))
    try:
        kwargs: dict[str, Any] = {"num_classes": 10, "in_chans": 1}
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
            pipeline_runs.append(result["views_per_s"])
        raw_ips, pipeline_ips = max(raw_runs), max(pipeline_runs)
        print(json.dumps({
            "bench": "labeling", "data": "fmnist", "teacher": args.teacher, "resolution": args.resolution,
            "samples": len(ds),
            "batch_size": args.batch_size, "threads": threads, "device": "cpu",
            "raw_ips": round(raw_ips, 1), "pipeline_ips": round(pipeline_ips, 1),
            "ratio": round(pipeline_ips / raw_ips, 3), **(cold or {}),
            "raw_ips_runs": [round(x, 1) for x in raw_runs], "pipeline_ips_runs": pipeline_runs,
            "ray_start_s": round(ray_start_s, 1), "load_avg_1m": round(os.getloadavg()[0], 2),
        }))
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=("fmnist", "jpeg"), default="fmnist")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="the teacher's device (jpeg only)")
    ap.add_argument("--teacher", default="resnet50", help="a timm model name (random weights)")
    ap.add_argument("--resolution", type=int, help="the teacher's input size (default: 112 fmnist, 224 jpeg)")
    ap.add_argument("--samples", type=int,
                    help="images labeled (default: 1024 fmnist, 192 jpeg on cpu, 20000 jpeg on cuda)")
    ap.add_argument("--batch-size", type=int, help="default: 64 fmnist, 32 jpeg on cpu, 256 on cuda")
    ap.add_argument("--chunk-rows", type=int, default=8192, help="store chunk (and piece) rows; the CLI default")
    ap.add_argument("--repeats", type=int, default=2, help="fmnist: interleaved rounds; the best of each counts")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads of the loop and CPUs of the local Ray (its one actor's threads)")
    ap.add_argument("--work", default="/tmp/stillroom-bench-labeling", help="jpeg: where the folder is written")
    ap.add_argument("--store-root", help="jpeg: also label into this URL (s3://BUCKET/prefix; credentials and "
                                         "AWS_ENDPOINT_URL from the environment) and compare with a local store")
    ap.add_argument("--seeds", type=int, default=1, help="jpeg: S > 1 compares S seeds labeled in one pass against "
                                                          "one seed at a time (views/s)")
    args = ap.parse_args()
    if args.data == "fmnist":
        if args.device != "cpu":
            raise SystemExit("bench/labeling.py: error: --device cuda is for --data jpeg")
        args.resolution, args.samples = args.resolution or 112, args.samples or 1024
        args.batch_size = args.batch_size or 64
        bench_fmnist(args)
    else:
        cuda = args.device == "cuda"
        if cuda and not torch.cuda.is_available():
            raise SystemExit("bench/labeling.py: error: --device cuda: torch sees no CUDA device")
        args.resolution = args.resolution or 224
        args.samples = args.samples or (20_000 if cuda else 192)
        args.batch_size = args.batch_size or (256 if cuda else 32)
        if args.seeds > 1:
            if cuda:
                raise SystemExit("bench/labeling.py: error: --seeds is measured on the CPU here")
            bench_seeds(args)
        else:
            bench_jpeg(args)


if __name__ == "__main__":
    main()
