"""Student training speed: supervised vs cached distillation from the store vs the teacher in the loop.

One run, the same student, data, batches and views (the same store seed and shuffle), three ways:
(a) ``ce`` (ground truth only), (b) cached ``deit-hard`` (labels gathered from the store), (c) ``deit-hard``
``--online`` (the teacher labels each batch live). The teacher is a randomly initialised timm model saved as a
checkpoint here (its accuracy does not matter for speed); it labels the data once (timed apart), and the
students train on it. Each way runs ``--repeats`` times, interleaved, and the order rotates every round (a, b,
c; b, c, a; ...) so that no way always runs first or after the same one on a shared, noisy machine; the fastest
epoch of each way counts, and every epoch time is printed beside it. Prints one JSON line.

``--data memory`` (the default): the Fashion-MNIST test split (10,000 images, in memory), ``fmnist-rrc`` views.
Target: cached_over_supervised <= 1.05.

``--data jpeg``: a folder of variable-size JPEGs that ``bench/data.py``'s generator writes (160-512 px, kept
under ``--work`` for the next run), ``imagenet-rrc`` views at ``--size`` px, the student's loader with
``--loader-workers`` processes; a fourth way, (d) ``torchvision``: the loop a user would write for the same
student and transforms (``ImageFolder`` + ``RandomResizedCrop(size)`` + ``RandomHorizontalFlip`` +
``PILToTensor`` through a ``DataLoader`` with the same worker count, uint8 to the device, the same
normalisation, AdamW and cross-entropy, the same steps). Targets: cached_over_supervised <= 1.05 and
loader_over_torchvision (the torchvision epoch's seconds over stillroom's supervised epoch's: a speed ratio)
>= 1.0.

``--threads-ways``: one more way, the cached run with torch's default threads (every core) beside its loader
workers, as ``stillroom train`` ran before it picked them (``student._loader.set_training_threads``: the cores
less the loader workers). ``all_threads_over_auto``: that epoch over the cached way's (> 1: the default loses).

``--recipe-ways``: two more ways, the cached run with ``--model-ema`` (EMA updated after every step) and with
``--amp-dtype bfloat16`` (autocast; on CPU too), and ``recipe_step_ms``: one step of the recipe fp32, fp32 with
the EMA and bf16, interleaved in one process (``recipe_step_ms``). Target: recipe_ema_over_fp32_step <= 1.05.

    python bench/training.py [--steps 40] [--batch-size 128] [--teacher resnet50] [--student resnet18]
    python bench/training.py --recipe-ways [--ways cached,cached_ema,cached_bf16]
    python bench/training.py --data jpeg [--images 480] [--size 224] [--steps 20] [--batch-size 32]
    python bench/training.py --data parquet-s3 [--images 480] [--rows-per-group 100] [--shards 4]

``--data parquet-s3``: the same JPEGs as Parquet shards (Hugging Face's layout: ``train/*.parquet``, an ``image``
{bytes, path} struct and a ``label``, ``--rows-per-group`` rows a row group), on a local S3 server that the bench
starts (moto's, ``bench/_s3.py``, counting the bytes it sends) and the same shards on disk, side by side in one
run: the cached way trains from each (one store serves both: the fingerprint covers the bytes, not where they
lie). Shards read at random are staged on the node's disk as Arrow IPC copies (``pipelines._shard_stage``), from
either place, so each place runs twice: ``disk`` and ``s3`` on a fresh node (the copies removed before each run:
the epoch reads by row group and stages meanwhile), ``disk_warm`` and ``s3_warm`` with the copies an earlier run
left (every later epoch). Prints ``s3_over_disk`` (the fresh node's epoch, target <= 1.15), ``s3_warm_over_disk``
and the bytes the object store sent each epoch (``s3_bytes_per_epoch``) beside the encoded bytes of the images
the epoch took (``epoch_image_bytes``).

``--views-per-image K``: K seeds are labeled and the cached way trains with K views of each image a batch (FKD's
multi-crop: each image decoded once for its K crops); the batches hold as many views as the supervised way's, so
``cached_over_supervised`` is the time per view against one view per decode. Target at K = 4 on JPEGs: <= 0.85
(FKD's 0.84); at K = 1: <= 1.05. On a CPU the student's step (about 15 ms a 224 px view for ``test_resnet`` on 2
cores) bounds both epochs, and the loader runs beside it; FKD's figure is that of GPUs waiting on their loaders.
``--loader-ways`` (with ``--data jpeg``) measures that regime here: two more ways, ``supervised_loader`` and
``cached_loader``, run the same ``StoreStream`` epochs (the same loader workers decoding and cropping, the views
finished on the device) with the student's step left out, which is what a student whose step is faster than its
loader waits for; each is timed from its first batch to its ``--steps``-th (the workers' start aside, as it is
once a run), and ``loader_cached_over_supervised`` is their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from stillroom.pipelines.data import load_dataset
from stillroom.pipelines.labeling import LabelConfig, run_labeling
from stillroom.pipelines.teachers import Preprocess, save_checkpoint
from stillroom.student.config import TrainConfig
from stillroom.student.run import train


def make_teacher(path: Path, name: str, num_classes: int, resolution: int, in_chans: int = 1) -> str:
    import timm

    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
    model = timm.create_model(name, pretrained=False, **kwargs)
    mean, std = ((0.286,), (0.353,)) if in_chans == 1 else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    save_checkpoint(path, name, model, kwargs, Preprocess(resolution, mean, std, in_chans), extra={})
    return f"{name}@{path}"


def torchvision_epoch(root: Path, student: str, num_classes: int, size: int, batch_size: int, steps: int,
                      workers: int, lr: float, device: str, seed: int) -> float:
    """Seconds of one epoch of the loop a user would write: ImageFolder + RandomResizedCrop + flip + DataLoader,
    the same student, normalisation, optimizer and loss as ``stillroom train --loss ce`` (timed from the
    loader's start, as the trainer's epoch is), at the torch threads stillroom's trainer picks beside ``workers``
    loader workers: the ratio compares the loaders, not thread settings (``--threads-ways`` measures those)."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from stillroom.student._loader import set_training_threads
    from stillroom.student.models import build_student, normalize

    set_training_threads(None, workers)

    dev = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    model = build_student(student, num_classes, 3, size).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    data = datasets.ImageFolder(str(root / "train"), transforms.Compose([
        transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.PILToTensor()]))
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=dev.type == "cuda",
                        generator=torch.Generator().manual_seed(seed))
    t = time.perf_counter()
    for done, (images, labels) in enumerate(loader):
        if done >= steps:
            break
        x = normalize(images.to(dev, non_blocking=True).float() / 255.0)
        loss = F.cross_entropy(model(x), labels.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        float(loss.detach())
    seconds = time.perf_counter() - t
    del loader
    return seconds


def recipe_step_ms(student: str, num_classes: int, in_chans: int, size: int, batch_size: int, steps: int,
                   rounds: int, device: str) -> dict[str, float]:
    """Milliseconds of one training step through the recipe (``pipelines.train_recipe.TrainingRecipe``: forward
    in its autocast, backward, ``step()``) of the same student three ways, fp32, fp32 with the EMA updated every
    step, bf16 autocast, interleaved in rounds of ``steps`` steps in this one process (whole epochs on a shared
    machine vary more than the EMA costs); the fastest round of each."""
    import copy

    import torch.nn.functional as F

    from stillroom.pipelines.training import RecipeOptions, TrainingRecipe, resolve_device
    from stillroom.student.models import build_student

    dev = resolve_device(device)
    torch.manual_seed(0)
    base = build_student(student, num_classes, in_chans, size).to(dev).train()
    x = torch.rand(batch_size, in_chans, size, size, device=dev)
    y = torch.randint(0, num_classes, (batch_size,), device=dev)
    kinds = {"fp32": RecipeOptions(amp_dtype="float32"), "fp32_ema": RecipeOptions(amp_dtype="float32", model_ema=True),
             "bf16": RecipeOptions(amp_dtype="bfloat16")}
    runs = {}
    for name, opts in kinds.items():
        model = copy.deepcopy(base)
        runs[name] = (model, TrainingRecipe.build(model, opts, epochs=1, updates_per_epoch=steps * rounds + 1,
                                                  global_batch=batch_size, device=dev))
    best = {name: float("inf") for name in kinds}
    for r in range(rounds + 1):  # round 0 warms up
        names = list(kinds)
        for name in names[r % len(names):] + names[: r % len(names)]:
            model, recipe = runs[name]
            t = time.perf_counter()
            for _ in range(steps):
                with recipe.autocast():
                    loss = F.cross_entropy(model(x).float(), y)
                recipe.scaled({"loss": loss})["loss"].backward()
                recipe.step()
            float(loss.detach())
            if r:
                best[name] = min(best[name], (time.perf_counter() - t) / steps * 1000)
    return {k: round(v, 2) for k, v in best.items()}


def write_shards(folder: Path, out: Path, rows_per_group: int, shards: int) -> Path:
    """The image folder's train split as Hugging Face-style Parquet shards, ``out/train/*.parquet`` (kept: the
    same folder gives the same shards)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = out / f".complete-g{rows_per_group}-s{shards}"
    if done.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    classes = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
    files = [(p, c) for c, name in enumerate(classes) for p in sorted((folder / "train" / name).iterdir())]
    meta = {"info": {"features": {"image": {"_type": "Image"}, "label": {"names": classes, "_type": "ClassLabel"}}}}
    (out / "train").mkdir(parents=True)
    per = -(-len(files) // shards)
    for s in range(shards):
        part = files[s * per : (s + 1) * per]
        table = pa.table({"image": [{"bytes": p.read_bytes(), "path": p.name} for p, _ in part],
                          "label": pa.array([c for _, c in part], pa.int64())})
        table = table.replace_schema_metadata({"huggingface": json.dumps(meta)})
        pq.write_table(table, out / "train" / f"train-{s:05d}-of-{shards:05d}.parquet", row_group_size=rows_per_group)
    done.touch()
    return out


def upload(local: Path, url: str) -> str:
    """Every Parquet file under ``local`` to ``url`` (its bucket made first); the URL."""
    from stillroom.pipelines.core import filesystem

    fs, path = filesystem(url)
    fs.mkdir(path.split("/")[0])
    for p in sorted(local.rglob("*.parquet")):
        fs.put_file(str(p), f"{path}/{p.relative_to(local)}")
    return url


def loader_epoch(config: TrainConfig, steps: int) -> float:
    """Seconds from the first batch of epoch 0 of the student's stream (``StoreStream``, as ``stillroom train``
    opens it) to its ``steps``-th, with no training step: the time a student faster than its loader waits."""
    from stillroom.pipelines.training import resolve_device
    from stillroom.student.data import StoreStream
    from stillroom.student.trainer import prepare

    setup = prepare(config)
    stream = StoreStream(setup.store, setup.dataset, setup.recipe, config.batch_size, config.seeds,
                         shuffle_seed=config.seed, loader_workers=config.loader_workers,
                         device=resolve_device(config.device), views_per_image=config.views_per_image)
    batches = stream.epoch(0)
    next(batches)  # each batch's views are finished (on the device) before it is handed over
    t, done = time.perf_counter(), 1
    for _ in batches:
        done += 1
        if done >= steps:
            break
    if stream.device.type == "cuda":
        torch.cuda.synchronize(stream.device)
    seconds = time.perf_counter() - t
    batches.close()
    return seconds * steps / max(done - 1, 1)


def run_ways(ways: dict[str, Any], repeats: int) -> dict[str, list[float]]:
    """Each way once a round, the order rotating every round; every epoch's seconds."""
    names = list(ways)
    runs: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            runs[name].append(ways[name](repeat))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="memory", choices=("memory", "jpeg", "parquet-s3"))
    ap.add_argument("--dataset", default="fashion-mnist", help="--data memory: the data set")
    ap.add_argument("--split", default="test", help="--data memory: the split labeled and trained on")
    ap.add_argument("--teacher", default=None, help="default: resnet50 (memory), test_resnet (jpeg)")
    ap.add_argument("--student", default=None, help="default: resnet18 (memory), test_resnet (jpeg)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per epoch (default: 40 memory, 20 jpeg)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 128 (memory), 32 (jpeg)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="rounds; each way runs once a round (3 memory, 5 jpeg: a JPEG epoch is short and noisy)")
    ap.add_argument("--images", type=int, default=480, help="--data jpeg: images in the folder")
    ap.add_argument("--size", type=int, default=224, help="--data jpeg: the views' side in pixels")
    ap.add_argument("--rows-per-group", type=int, default=100,
                    help="--data parquet-s3: rows a Parquet row group (100: Hugging Face's for image data sets)")
    ap.add_argument("--shards", type=int, default=4, help="--data parquet-s3: Parquet files")
    ap.add_argument("--loader-workers", type=int, default=None,
                    help="--data jpeg: loader processes of stillroom and of torchvision (default: stillroom's)")
    ap.add_argument("--work", default="/tmp/stillroom-bench-training",
                    help="--data jpeg: where the JPEG folder is kept between runs")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--recipe-ways", action="store_true",
                    help="also time the cached run with --model-ema and with --amp-dtype bfloat16")
    ap.add_argument("--threads-ways", action="store_true",
                    help="also the cached way at torch's default threads (every core) beside its loader workers: "
                         "all_threads_over_auto is its epoch over the cached way's (threads picked beside them)")
    ap.add_argument("--ways", default=None, help="only these ways, comma-separated (default: all)")
    ap.add_argument("--recipe-steps", type=int, default=5, help="--recipe-ways: steps per round of the step timing")
    ap.add_argument("--views-per-image", type=int, default=1, help="the cached way's K views of each image a batch")
    ap.add_argument("--loader-ways", action="store_true",
                    help="--data jpeg: also time the supervised and cached ways' loaders with no training step")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed after)")
    args = ap.parse_args()
    parquet = args.data == "parquet-s3"
    jpeg = args.data == "jpeg" or parquet  # the same JPEGs, in a folder or in Parquet shards
    teacher_name = args.teacher or ("test_resnet" if jpeg else "resnet50")
    student = args.student or ("test_resnet" if jpeg else "resnet18")
    steps = args.steps or (20 if jpeg else 40)
    batch_size = args.batch_size or (32 if jpeg else 128)
    repeats = args.repeats or (5 if jpeg else 3)
    work = Path(args.dir or tempfile.mkdtemp(prefix="stillroom-bench-training-"))
    work.mkdir(parents=True, exist_ok=True)
    server: Any = None
    try:
        extra: dict[str, Any] = {}
        if jpeg:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from data import make_folder  # bench/data.py: the same generator as the data bench

            from stillroom.student._loader import default_loader_workers

            workers = args.loader_workers if args.loader_workers is not None else default_loader_workers(False)
            t = time.perf_counter()
            root = make_folder(Path(args.work) / f"jpeg-n{args.images}", args.images, None,
                               max(1, os.cpu_count() or 1))
            extra["make_data_s"] = round(time.perf_counter() - t, 1)
            dataset, split, recipe, num_classes = f"imagefolder:{root}", "train", f"imagenet-rrc:size={args.size}", 10
            if parquet:
                from _s3 import S3Bench

                shards = write_shards(root, work / "parquet", args.rows_per_group, args.shards)
                server = S3Bench()
                s3_url = upload(shards, "s3://stillroom-bench/parquet")
                dataset = f"parquet:{shards}"
                t = time.perf_counter()
                load_dataset(f"parquet:{s3_url}")  # its index, built here once (not in an epoch's bytes)
                extra["s3_index_open_s"] = round(time.perf_counter() - t, 2)
                extra.update(rows_per_group=args.rows_per_group, shards=args.shards,
                             shard_bytes=sum(p.stat().st_size for p in shards.rglob("*.parquet")))
            teacher = make_teacher(work / "teacher.pt", teacher_name, num_classes, args.size, in_chans=3)
        else:
            workers, dataset, split, recipe, num_classes = 0, args.dataset, args.split, "fmnist-rrc", 10
            teacher = make_teacher(work / "teacher.pt", teacher_name, num_classes, 28)
        t = time.perf_counter()
        labeled = run_labeling(LabelConfig(dataset=dataset, split=split, teachers=(teacher,), recipe=recipe,
                                           seeds=tuple(range(args.views_per_image)),
                                           top_k=10, store_root=str(work / "stores"), batch_size=64 if jpeg else 512),
                               backend="local", progress=False)
        label_s = time.perf_counter() - t
        # every way runs the same number of views: no more steps than a one-view-a-sample epoch holds (a way of
        # K views an image holds K times as many batches; the others' epochs would end first)
        full_batches = len(load_dataset(dataset, split)) // batch_size
        if steps > full_batches:
            extra["steps_asked"] = steps
            steps = full_batches
        base: dict[str, Any] = dict(
            store=labeled["store"], dataset=dataset, split=split, eval_split=split, student=student, epochs=1,
            batch_size=batch_size, max_steps=steps, eval_limit=32 if jpeg else 512, progress=False,
            device=args.device, loader_workers=workers if jpeg else None)
        configs: dict[str, dict[str, Any]] = {"supervised": dict(loss="ce", seeds=(0,)),
                   "cached": dict(loss="deit-hard", views_per_image=args.views_per_image),
                   "online": dict(loss="deit-hard", online=True, seeds=(0,))}
        if args.recipe_ways:
            configs.update(cached_ema=dict(loss="deit-hard", model_ema=True),
                           cached_bf16=dict(loss="deit-hard", amp_dtype="bfloat16"))
        if args.threads_ways:  # the cached way at torch's default threads (every core), as the CLI ran before
            configs["cached_all_threads"] = dict(loss="deit-hard", threads=os.cpu_count() or 1)
        if args.ways:
            configs = {name: configs[name] for name in args.ways.split(",") if name in configs}
        if args.recipe_ways:
            steps_ms = recipe_step_ms(student, num_classes, 3 if jpeg else 1, args.size if jpeg else 28, batch_size,
                                      args.recipe_steps, repeats * 2, args.device)
            extra.update(recipe_step_ms=steps_ms,
                         recipe_ema_over_fp32_step=round(steps_ms["fp32_ema"] / steps_ms["fp32"], 3),
                         recipe_bf16_over_fp32_step=round(steps_ms["bf16"] / steps_ms["fp32"], 3),
                         target_recipe_ema_over_fp32_step=1.05)

        def trainer_way(name: str):
            def run(repeat: int) -> float:
                config = TrainConfig(**{**base, **configs[name], "out": str(work / f"run-{name}-{repeat}")})  # type: ignore[arg-type]
                return float(train(config)["epoch_seconds"][0])
            return run

        ways: dict[str, Any] = {name: trainer_way(name) for name in configs}
        s3_bytes: list[int] = []
        s3_warm_bytes: list[int] = []
        if parquet:  # the cached way from the shards on disk and from the same shards on S3, nothing else
            on_s3 = {**configs["cached"], "dataset": f"parquet:{s3_url}"}
            configs = {"disk": configs["cached"], "s3": on_s3, "disk_warm": configs["cached"], "s3_warm": on_s3}

            def parquet_way(name: str, counted: list[int] | None):
                """A way on its own stage folder (pipelines._shard_stage: the node's copies of the shards read at
                random), emptied first unless the way is warm; the bytes the S3 server sent during the run."""
                stage = work / f"shard-stage-{name.removesuffix('_warm')}"

                def run(repeat: int) -> float:
                    if not name.endswith("_warm"):  # a fresh node: the epoch reads in place and stages meanwhile
                        shutil.rmtree(stage, ignore_errors=True)
                    os.environ["STILLROOM_SHARD_STAGE"] = str(stage)  # read by the loader worker forked next
                    server.counts(reset=True)
                    seconds = trainer_way(name)(repeat)
                    if counted is not None:
                        counted.append(int(server.counts()["bytes"]))
                    return seconds
                return run

            ways = {"disk": parquet_way("disk", None), "s3": parquet_way("s3", s3_bytes),
                    "disk_warm": parquet_way("disk_warm", None), "s3_warm": parquet_way("s3_warm", s3_warm_bytes)}
        if jpeg and not parquet and args.loader_ways:
            def loader_way(name: str):
                config = TrainConfig(**{**base, **configs[name], "out": str(work / f"run-{name}-loader")})  # type: ignore[arg-type]
                return lambda repeat: loader_epoch(config, steps)

            ways.update({f"{name}_loader": loader_way(name) for name in ("supervised", "cached") if name in configs})
        if jpeg and not parquet:
            ways["torchvision"] = lambda repeat: torchvision_epoch(root, student, num_classes, args.size, batch_size,
                                                                   steps, workers, 1e-3, args.device, 0)
        runs = run_ways(ways, repeats)
        seconds = {name: min(times) for name, times in runs.items()}
        result: dict[str, Any] = {
            "bench": "training", "data": args.data,
            "dataset": f"{args.images} JPEGs 160-512 px" if jpeg else f"{args.dataset}/{args.split}",
            "student": student, "teacher": teacher_name, "teacher_weights": "random init (speed only)",
            "steps": steps, "batch_size": batch_size, "views_per_image": args.views_per_image,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "device": "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu",
            **({"size": args.size, "recipe": recipe, "loader_workers": workers} if jpeg else {}), **extra,
            "labeling_seconds": round(label_s, 2), "labeling_images_per_s": labeled["views_per_s"],
            "epoch_seconds": {k: round(v, 3) for k, v in seconds.items()},
            "epoch_seconds_all": {k: [round(v, 3) for v in times] for k, times in runs.items()},
            "samples_per_s": {k: round(steps * batch_size / v, 1) for k, v in seconds.items()},
        }
        ratios = {"cached_over_supervised": ("cached", "supervised"), "online_over_cached": ("online", "cached"),
                  "loader_cached_over_supervised": ("cached_loader", "supervised_loader"),
                  "ema_over_cached": ("cached_ema", "cached"),
                  "bf16_over_cached": ("cached_bf16", "cached"),
                  "all_threads_over_auto": ("cached_all_threads", "cached")}
        result.update({k: round(seconds[a] / seconds[b], 3) for k, (a, b) in ratios.items()
                       if a in seconds and b in seconds})
        result["target_cached_over_supervised"] = 0.85 if args.views_per_image >= 4 else 1.05
        if "loader_cached_over_supervised" in result:
            result["target_loader_cached_over_supervised"] = result["target_cached_over_supervised"]
        if "ema_over_cached" in result:
            result["target_ema_over_cached"] = 1.05
        if parquet:
            import numpy as np

            ds = load_dataset(dataset)
            mean_image = float(np.mean([len(b) for b, _ in ds.encoded(np.arange(len(ds)))]))
            result.update(s3_over_disk=round(seconds["s3"] / seconds["disk"], 3), target_s3_over_disk=1.15,
                          s3_warm_over_disk=round(seconds["s3_warm"] / seconds["disk_warm"], 3),
                          s3_bytes_per_epoch=s3_bytes, s3_warm_bytes_per_epoch=s3_warm_bytes,
                          epoch_image_bytes=int(steps * batch_size * mean_image),
                          note="disk, s3: a fresh node (nothing staged: the epoch reads by row group and stages "
                               "the shards, pipelines._shard_stage); disk_warm, s3_warm: the copies an earlier run "
                               "staged on the node (the rotation may run them fresh in round one; the fastest "
                               "counts). s3_bytes_per_epoch: every response body the S3 server sent during each run "
                               "(its epoch, and the run's start: listing, cached index, footers); the store is on "
                               "disk")
            for key in ("cached_over_supervised", "target_cached_over_supervised"):
                result.pop(key, None)
        elif jpeg:
            result["loader_over_torchvision"] = round(seconds["torchvision"] / seconds["supervised"], 3)
            result["target_loader_over_torchvision"] = 1.0
        print(json.dumps(result))
    finally:
        if server is not None:
            server.close()
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
