"""The whole GPU path in one run: labeling, several seeds, students, fidelity, teacher training, GPU tests.

One process tree, one JSON line (the last line of stdout, also ``OUT/gpu.json``), plots and a log under ``--out``.
It writes its own ImageNet-shaped JPEGs (smooth noise at 160-512 px, random aspect, quality 90; a label is the
image's index mod 10), so it needs no data set, and imports only what a bare GPU machine has (torch, torchvision,
timm, Pillow, numpy, matplotlib) and the wheels ``bench/gpu_wheels.sh`` sends (zarr, numcodecs, pytest,
stillroom): no Ray, so stillroom labels in this process (``run_labeling(backend="local")``, what
``stillroom label --no-ray`` runs) and trains without Ray Train.

Each measurement is guarded: one that fails records its one-line error under its key and the rest still run; one
that the time budget (``--budget-s``) leaves no room for records ``{"skipped": ...}``. Measurements, in order:

- ``labeling``: per teacher (``resnet50``, ``vit_base_patch16_224`` at 224 px), the loop a user writes
  (torchvision ``ImageFolder`` + ``RandomResizedCrop`` + flip + ``DataLoader(num_workers=W, pin_memory=True)``, the
  model on the device, bf16 autocast and channels-last on CUDA) against ``run_labeling`` fp32 and bf16 (the decode
  stillroom chooses: nvJPEG on CUDA): images/s, their ratio, GPU utilisation (``nvidia-smi``, sampled), and where
  a labeling run's time goes (a second, synchronised run: waiting for decoded views, decode + crop on the GPU,
  host-to-device, forward, top-k and quality, store writes). Targets: ratio >= 1.5, >= 5,000 images/s (resnet50).
- ``seeds``: S seeds in one pass (each image decoded once for all) against S runs of one seed. Target >= 1.3.
- ``student``: epochs of ``--max-steps`` on the device from the S-seed store: supervised (``ce``), cached KD
  (``deit-hard``), online KD (the resnet50 teacher in the loop), cached with K views an image; the loader alone
  (no step) says what bounds each. Targets: cached/supervised <= 1.05, K views' time a view <= 0.85 of one's.
- ``fidelity``: the GPU-decoded views (nvJPEG, ``roi_align``) against the CPU views a student replays (grey levels;
  the total variation between the teacher's softmax on each), and the normalised views on the CPU and on the
  device, bit for bit.
- ``teacher_train``: ``stillroom teacher train`` (resnet18, the generated set) on the device: images/s.
- ``pytest_gpu``: ``pytest -m gpu`` over the test files that hold GPU tests.

    python bench/gpu.py --scale smoke --device cpu --out /tmp/gpu-smoke     # under a minute, any machine
    python bench/gpu.py --scale full --device cuda --out OUT               # one GPU, under 8 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
log = logging.getLogger("bench.gpu")

# every size the run depends on, by scale; `full` is sized for one H100/H200 and 16 cores in under 8 minutes
SCALES: dict[str, dict[str, Any]] = {
    # smoke: every measurement's code path on tiny inputs (its budget is large: a slow machine skips nothing)
    "smoke": dict(images=24, px=(40, 96), size=32, teachers=("test_resnet", "test_vit"), batch=8, loader_workers=0,
                  seeds=2, seed_images=16, student="test_resnet", student_batch=8, steps=2, views_per_image=2,
                  fidelity_images=8, train_samples=16, train_batch=8, budget_s=900, chunk_rows=16, decode_workers=0,
                  student_loader_workers=0),
    "full": dict(images=20_000, px=(160, 512), size=224, teachers=("resnet50", "vit_base_patch16_224"), batch=256,
                 loader_workers=16, seeds=4, seed_images=5_000, student="resnet18", student_batch=256, steps=40,
                 views_per_image=4, fidelity_images=256, train_samples=5_000, train_batch=256, budget_s=450,
                 chunk_rows=4096, decode_workers=-1, student_loader_workers=None),
}


def refuse_imports(names: tuple[str, ...]) -> None:
    """From now on, importing any of ``names`` (or their submodules) raises ImportError: what a bare GPU machine
    would do (``--bare``; processes forked later inherit it)."""
    import importlib.abc

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
            if name.split(".")[0] in names:
                raise ImportError(f"{name}: not on a bare GPU machine (bench/gpu.py --bare)")
            return None

    sys.meta_path.insert(0, Refuse())


# ---- data -------------------------------------------------------------------------------------------------------

def _write_jpegs(job: tuple[str, list[tuple[int, int, int]]]) -> None:
    """Smooth noise (a coarse random grid, bicubic-upscaled, plus fine grain) as JPEGs, one per (index, h, w)."""
    from PIL import Image

    root, items = job
    for i, h, w in items:
        rng = np.random.default_rng(1000 + i)
        grid = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        coarse = grid.resize((w, h), Image.Resampling.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
            Path(root) / "train" / f"class{i % 10:02d}" / f"img_{i:07d}.JPEG", quality=90)


def make_folder(root: Path, n: int, px: tuple[int, int], workers: int) -> Path:
    """An ImageNet-layout folder (``train/classNN/*.JPEG``) of ``n`` images, kept: ready once ``.complete`` is."""
    if (root / ".complete").exists():
        return root
    for c in range(10):
        (root / "train" / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    sizes = np.random.default_rng(12).integers(px[0], px[1] + 1, size=(n, 2))
    items = [(i, int(sizes[i, 0]), int(sizes[i, 1])) for i in range(n)]
    jobs = [(str(root), items[k : k + 250]) for k in range(0, n, 250)]
    with get_context("fork").Pool(max(1, workers)) as pool:
        pool.map(_write_jpegs, jobs)
    (root / ".complete").touch()
    return root


def subset_folder(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` images of ``src`` (by index), hard-linked into another folder."""
    if (dst / ".complete").exists():
        return dst
    for path in sorted(src.glob("train/*/*.JPEG")):
        if int(path.stem.split("_")[1]) < n:
            (dst / path.parent.relative_to(src)).mkdir(parents=True, exist_ok=True)
            target = dst / path.relative_to(src)
            if not target.exists():
                os.link(path, target)
    (dst / ".complete").touch()
    return dst


def make_teacher(work: Path, name: str, size: int) -> str:
    """A randomly initialised timm model (speed only) as a stillroom checkpoint; its ``NAME@PATH`` spec."""
    import timm

    from stillroom.pipelines.teachers import Preprocess, save_checkpoint

    path = work / f"{name}-{size}.pt"
    if not path.exists():
        kwargs: dict[str, Any] = {"num_classes": 10, "in_chans": 3}
        if "vit" in name and size != 224:
            kwargs["img_size"] = size
        torch.manual_seed(0)
        save_checkpoint(path, name, timm.create_model(name, pretrained=False, **kwargs), kwargs,
                        Preprocess(size, MEAN, STD, 3), extra={})
    return f"{name}@{path}"


# ---- measuring --------------------------------------------------------------------------------------------------

class GpuUtilisation:
    """``nvidia-smi``'s utilisation.gpu, sampled every 200 ms while the block runs: mean and max percent (None
    without a GPU or the tool)."""

    def __init__(self, device: str):
        self.tool = shutil.which("nvidia-smi") if device == "cuda" else None
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GpuUtilisation:
        if self.tool:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.tool:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                out = subprocess.run([self.tool or "", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return

    def summary(self) -> dict[str, float] | None:
        if not self.samples:
            return None
        return {"mean_pct": round(float(np.mean(self.samples)), 1), "max_pct": max(self.samples)}


class Stages:
    """Seconds spent in named functions while the block runs, the device synchronised around each call so that
    the time is the work's, not its launch's (a profiling run: slower than the throughput run)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.seconds: dict[str, float] = {}
        self._undo: list[Callable[[], None]] = []

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self._sync()
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._sync()
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

        setattr(owner, attr, timed)
        self._undo.append(lambda: setattr(owner, attr, original))

    def wrap_iterator(self, owner: Any, attr: str, name: str) -> None:
        """Time each ``next()`` of the iterators a generator method returns (waiting for its items)."""
        original = getattr(owner, attr)
        stages = self

        def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
            it = original(*args, **kwargs)
            while True:
                t = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    stages.seconds[name] = stages.seconds.get(name, 0.0) + time.perf_counter() - t
                yield item

        setattr(owner, attr, timed)
        self._undo.append(lambda: setattr(owner, attr, original))

    def __enter__(self) -> Stages:
        return self

    def __exit__(self, *exc: object) -> None:
        for undo in reversed(self._undo):
            undo()


def cpu_seconds() -> float:
    """CPU seconds of this process and its ended children (each measurement's share, in the log)."""
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


class Run:
    """The run's measurements: each under its key, guarded, within the time budget."""

    def __init__(self, args: argparse.Namespace, scale: dict[str, Any], out: Path):
        self.args, self.scale, self.out = args, scale, out
        self.t0 = time.perf_counter()
        self.result: dict[str, Any] = {}
        self.store: str | None = None  # the S-seed store the seeds measurement makes, for the students

    def left_s(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def save(self) -> None:
        """The results so far to ``OUT/gpu.json``: a run stopped from outside still leaves what it measured."""
        (self.out / "gpu.json").write_text(json.dumps(self.result) + "\n")

    def measure(self, key: str, fn: Callable[[], Any], need_s: float = 0.0) -> Any:
        if self.args.only and key not in self.args.only.split(","):
            return None
        if self.left_s() < need_s:
            self.result[key] = {"skipped": f"time budget: {self.left_s():.0f} s left, {need_s:.0f} s needed"}
            log.info("%s: skipped (time budget)", key)
            return None
        log.info("%s: start (%.0f s left)", key, self.left_s())
        t, cpu = time.perf_counter(), cpu_seconds()
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - one failure is recorded and the rest still run
            first = (str(e).strip().splitlines() or [""])[0][:300]
            self.result[key] = {"error": f"{type(e).__name__}: {first}", "seconds": round(time.perf_counter() - t, 1)}
            log.exception("%s failed", key)
            self.save()
            return None
        self.result[key] = value
        self.save()
        log.info("%s: done in %.1f s (%.1f CPU s): %s", key, time.perf_counter() - t, cpu_seconds() - cpu,
                 json.dumps(value)[:400])
        return value


def label_config(folder: Path, teacher: str, store_root: Path, s: dict[str, Any], device: str, dtype: str,
                 seeds: tuple[int, ...] = (0,)) -> Any:
    from stillroom.pipelines.labeling import LabelConfig

    recipe = "imagenet-rrc" if s["size"] == 224 else f"imagenet-rrc:size={s['size']}"
    return LabelConfig(dataset=f"imagefolder:{folder}", teachers=(teacher,), recipe=recipe, seeds=seeds, top_k=10,
                       batch_size=s["batch"], chunk_rows=s["chunk_rows"], store_root=str(store_root),
                       gpus_per_worker=1.0 if device == "cuda" else 0.0, teacher_dtype=dtype,
                       decode_workers=s["decode_workers"],
                       decode="gpu" if device == "cuda" else "cpu")  # nvJPEG is asked for now (PIL by default)


def plain_loop(folder: Path, spec: str, s: dict[str, Any], device: str) -> float:
    """images/s of the loop a user writes, timed from its first batch (its workers' start aside)."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from stillroom.pipelines.teachers import load_teacher

    cuda = device == "cuda"
    model = load_teacher(spec, 10, device).model.eval()
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    tf = transforms.Compose([transforms.RandomResizedCrop(s["size"]), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    loader = DataLoader(datasets.ImageFolder(str(folder / "train"), tf), batch_size=s["batch"], shuffle=True,
                        num_workers=s["loader_workers"], pin_memory=cuda, drop_last=False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    n, t = 0, 0.0
    with torch.inference_mode(), autocast:
        for i, (x, _) in enumerate(loader):
            x = x.to(device, non_blocking=True)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            model(x)
            if i == 0:
                if cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
            else:
                n += len(x)
    if cuda:
        torch.cuda.synchronize()
    return n / max(time.perf_counter() - t, 1e-9)


def labeling_profile(config: Any, device: str) -> dict[str, float]:
    """A labeling run with each stage timed (``Stages``): ms per image of each, and of the whole."""
    from stillroom.pipelines.labeling import Labeler, run_labeling
    from stillroom.pipelines.labeling import stream as stream_module
    from stillroom.pipelines.labeling import worker as worker_module
    from stillroom.pipelines.store import LabelStore
    from stillroom.pipelines.teachers import Teacher

    with Stages(device) as stages:
        stages.wrap_iterator(stream_module.ViewStream, "batches", "wait_for_views")
        stages.wrap(Labeler, "_device_views", "views_to_device")
        stages.wrap(worker_module, "decode_views_torch", "gpu_decode_crop")
        stages.wrap(Teacher, "logits", "forward")
        stages.wrap(Labeler, "_seed_arrays", "topk_and_quality")
        stages.wrap(LabelStore, "write_piece", "store_write")
        t = time.perf_counter()
        result = run_labeling(config, backend="local", progress=False)
        total = time.perf_counter() - t
    n = max(result["samples"], 1)
    out = {f"{k}_ms": round(v * 1e3 / n, 3) for k, v in stages.seconds.items()}
    if "views_to_device_ms" in out:  # the rest of it: host to device, mixing
        out["host_to_device_ms"] = round(out["views_to_device_ms"] - out.get("gpu_decode_crop_ms", 0.0), 3)
    return {**out, "labeling_ms": round(result["labeling_s"] * 1e3 / n, 3), "run_ms": round(total * 1e3 / n, 3),
            "note": "ms an image, the device synchronised around each stage; views_to_device holds gpu_decode_crop"}


def gpu_decode_ms(folder: Path, n: int, device: str) -> float | None:
    """ms an image of ``torchvision.io.decode_jpeg(list, device)`` alone (no crop), over ``n`` images."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from stillroom.pipelines.data import load_dataset

    ds = load_dataset(f"imagefolder:{folder}")
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b, _ in ds.encoded(np.arange(min(n, len(ds))))]
    decode_jpeg(data[:8], mode=ImageReadMode.RGB, device=device)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    return round((time.perf_counter() - t) * 1e3 / len(data), 3)


def measure_labeling(run: Run, folder: Path, work: Path, teacher: str) -> dict[str, Any]:
    from stillroom.pipelines.labeling import run_labeling

    s, device = run.scale, run.args.device
    spec = make_teacher(work, teacher, s["size"])
    out: dict[str, Any] = {"images": s["images"], "batch_size": s["batch"]}
    with GpuUtilisation(device) as util:
        out["plain_ips"] = round(plain_loop(folder, spec, s, device), 1)
    out["plain_gpu_util"] = util.summary()
    for dtype in ("fp32", "bf16"):
        config = label_config(folder, spec, work / "stores" / f"{teacher}-{dtype}", s, device, dtype)
        shutil.rmtree(config.store_root, ignore_errors=True)
        with GpuUtilisation(device) as util:
            result = run_labeling(config, backend="local", progress=False)
        out[f"pipeline_ips_{dtype}"] = result["images_per_s"]
        out[f"pipeline_{dtype}_startup_s"] = result["startup_s"]
        out[f"pipeline_{dtype}_gpu_util"] = util.summary()
        out["decode"] = config.decode_on
    out["ratio_bf16_over_plain"] = round(out["pipeline_ips_bf16"] / out["plain_ips"], 3)
    out["target_ratio"], out["target_ips"] = 1.5, 5000 if teacher == "resnet50" else 3300
    if run.left_s() > 60 or run.args.scale == "smoke":
        config = label_config(folder, spec, work / "stores" / f"{teacher}-profile", s, device, "bf16")
        shutil.rmtree(config.store_root, ignore_errors=True)
        out["profile"] = labeling_profile(config, device)
        if device == "cuda":
            out["profile"]["decode_only_ms"] = gpu_decode_ms(folder, 256, device)
    return out


def measure_seeds(run: Run, folder: Path, work: Path) -> dict[str, Any]:
    from stillroom.pipelines.labeling import run_labeling

    s, device = run.scale, run.args.device
    spec = make_teacher(work, s["teachers"][0], s["size"])
    seeds = tuple(range(s["seeds"]))
    alone = []
    for seed in seeds:
        config = label_config(folder, spec, work / "stores" / f"seed{seed}", s, device, "bf16", (seed,))
        shutil.rmtree(config.store_root, ignore_errors=True)
        alone.append(run_labeling(config, backend="local", progress=False))
    config = label_config(folder, spec, work / "stores" / "seeds", s, device, "bf16", seeds)
    shutil.rmtree(config.store_root, ignore_errors=True)
    together = run_labeling(config, backend="local", progress=False)
    alone_vps = sum(r["samples"] for r in alone) / sum(r["labeling_s"] for r in alone)
    one_pass = together["samples"] / together["labeling_s"]
    run.store = together["store"]  # the students' store: S seeds of the subset
    return {"seeds": len(seeds), "images": s["seed_images"], "one_pass_views_per_s": round(one_pass, 1),
            "seed_at_a_time_views_per_s": round(alone_vps, 1), "ratio": round(one_pass / alone_vps, 3),
            "target_ratio": 1.3}


def measure_student(run: Run, folder: Path, work: Path) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "bench"))
    from training import loader_epoch  # bench/training.py: the student's stream with no step

    from stillroom.student.config import TrainConfig
    from stillroom.student.run import train

    s, device = run.scale, run.args.device
    store = run.store
    if store is None:
        raise RuntimeError("no S-seed store: the seeds measurement did not run")
    base: dict[str, Any] = dict(store=store, dataset=f"imagefolder:{folder}", split="train", eval_split="train",
                                student=s["student"], epochs=1, batch_size=s["student_batch"], max_steps=s["steps"],
                                eval_limit=s["student_batch"], progress=False, device=device,
                                loader_workers=s["student_loader_workers"],
                                tracker="none")  # TensorBoard is not on a bare GPU machine
    ways: dict[str, dict[str, Any]] = {
        "supervised": dict(loss="ce", seeds=(0,)), "cached": dict(loss="deit-hard", seeds=(0,)),
        "online": dict(loss="deit-hard", online=True, online_targets="full", seeds=(0,)),
        f"cached_views{s['views_per_image']}": dict(loss="deit-hard", views_per_image=s["views_per_image"])}
    seconds: dict[str, float] = {}
    for name, way in ways.items():
        config = TrainConfig(**{**base, **way, "out": str(work / "students" / name)})  # type: ignore[arg-type]
        shutil.rmtree(config.out, ignore_errors=True)
        seconds[name] = float(train(config)["epoch_seconds"][0])
    loader: dict[str, float] = {}
    for name in ("supervised", f"cached_views{s['views_per_image']}"):
        config = TrainConfig(**{**base, **ways[name], "out": str(work / "students" / f"{name}-loader")})  # type: ignore[arg-type]
        loader[name] = loader_epoch(config, s["steps"])
    views = s["steps"] * s["student_batch"]
    k = f"cached_views{s['views_per_image']}"
    bound = {name: ("loader" if loader[name] >= 0.8 * seconds[name] else "step") for name in loader}
    return {"student": s["student"], "steps": s["steps"], "batch_size": s["student_batch"],
            "epoch_seconds": {k2: round(v, 3) for k2, v in seconds.items()},
            "views_per_s": {k2: round(views / v, 1) for k2, v in seconds.items()},
            "loader_only_seconds": {k2: round(v, 3) for k2, v in loader.items()}, "bound_by": bound,
            "cached_over_supervised": round(seconds["cached"] / seconds["supervised"], 3),
            "online_over_cached": round(seconds["online"] / seconds["cached"], 3),
            "views_k_over_1_time_per_view": round(seconds[k] / seconds["cached"], 3),
            "target_cached_over_supervised": 1.05, "target_views_k_over_1": 0.85,
            "note": "every way the same steps and batch size (views); cached_viewsK: K views of each image a batch"}


def measure_fidelity(run: Run, folder: Path, work: Path) -> dict[str, Any]:
    """The GPU-decoded views against the CPU views a student replays, and CPU against device normalisation."""
    from stillroom.pipelines.data import load_dataset
    from stillroom.pipelines.labeling import decode_views_torch
    from stillroom.pipelines.teachers import load_teacher
    from stillroom.pipelines.views import draw_views, float_views, get_recipe, mix_views, render_views
    from stillroom.student.models import normalize

    s, device = run.scale, run.args.device
    recipe = get_recipe("imagenet-rrc" if s["size"] == 224 else f"imagenet-rrc:size={s['size']}")
    ds = load_dataset(f"imagefolder:{folder}")
    ids = np.arange(min(s["fidelity_images"], len(ds)))
    params = draw_views(recipe, 0, ids, len(ds), ds.sizes)
    gpu = decode_views_torch(list(ds.encoded(ids)), params[:, 0:5], s["size"], device).cpu()
    cpu = render_views(ds, ids, params[:, 0:5], s["size"], recipe.draft, recipe)
    diff = (gpu.float() - cpu.float()).abs()
    teacher = load_teacher(make_teacher(work, s["teachers"][0], s["size"]), 10, device)
    with torch.inference_mode():
        p = [torch.softmax(teacher.logits(float_views(v.to(device))).float(), -1) for v in (gpu, cpu)]
    tv = 0.5 * (p[0] - p[1]).abs().sum(-1)
    x_cpu = normalize(mix_views(cpu, None, params))
    x_dev = normalize(mix_views(cpu.to(device), None, params)).cpu()
    t_cpu, t_dev = teacher.preprocess(float_views(cpu)), teacher.preprocess(float_views(cpu.to(device))).cpu()
    return {"views": len(ids), "decode": f"decode_views_torch on {device} vs render_views (PIL, draft={recipe.draft})",
            "grey_levels_mean_abs": round(float(diff.mean()), 3), "grey_levels_max_abs": round(float(diff.max()), 1),
            "teacher_tv_mean": round(float(tv.mean()), 5), "teacher_tv_max": round(float(tv.max()), 5),
            "student_normalised_bit_equal": bool(torch.equal(x_cpu, x_dev)),
            "teacher_normalised_bit_equal": bool(torch.equal(t_cpu, t_dev)),
            "normalised_on": f"cpu vs {device}", "teacher_weights": "random init"}


def measure_teacher_train(run: Run, folder: Path, work: Path) -> dict[str, Any]:
    """``stillroom teacher train`` in a child process (as a user runs it): images/s over its whole run."""
    s = run.scale
    out = work / "teacher-train"
    shutil.rmtree(out, ignore_errors=True)
    recipe = "imagenet-rrc" if s["size"] == 224 else f"imagenet-rrc:size={s['size']}"
    cmd = [sys.executable, "-m", "stillroom.services.cli", "teacher", "train", "--dataset", f"imagefolder:{folder}",
           "--model", "resnet18" if run.args.scale == "full" else "test_resnet", "--out", str(out), "--epochs", "1",
           "--batch-size", str(s["train_batch"]), "--recipe", recipe, "--train-samples", str(s["train_samples"]),
           "--bn-samples", "0", "--device", run.args.device]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30, run.left_s() - 20))
    seconds = time.perf_counter() - t
    log.info("teacher train stderr:\n%s", proc.stderr[-4000:])
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    trained = s["train_samples"]
    return {"model": cmd[cmd.index("--model") + 1], "samples": trained, "epochs": 1,
            "images_per_s_wall": round(trained / seconds, 1), "wall_s": round(seconds, 1),
            "train_s": result.get("seconds"),
            "images_per_s_train": round(trained / result["seconds"], 1) if result.get("seconds") else None,
            "top1": result.get("top1")}


def measure_pytest(run: Run) -> dict[str, Any]:
    """``pytest -m gpu`` over the test files that hold GPU tests; its counts and its summary line."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                   if "mark.gpu" in p.read_text(errors="replace"))
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs", *files]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(30, run.left_s() - 10))
    log.info("pytest -m gpu:\n%s", proc.stdout[-6000:] + proc.stderr[-2000:])
    lines = proc.stdout.strip().splitlines()
    summary = lines[-1] if lines else proc.stderr.strip()[-200:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", summary)}
    return {"files": files, "rc": proc.returncode, "summary": summary.strip("= "), "counts": counts}


# ---- output -----------------------------------------------------------------------------------------------------

def plots(result: dict[str, Any], out: Path) -> list[str]:
    """Bar charts of the labeling, student and profile figures, where they were measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    labeling = {k.removeprefix("labeling_"): v for k, v in result.items()
                if k.startswith("labeling_") and isinstance(v, dict) and "plain_ips" in v}
    if labeling:
        fig, ax = plt.subplots(figsize=(7, 4))
        names, width = ["plain_ips", "pipeline_ips_fp32", "pipeline_ips_bf16"], 0.25
        for j, name in enumerate(names):
            ax.bar([i + j * width for i in range(len(labeling))], [v[name] for v in labeling.values()], width,
                   label=name)
        ax.set_xticks([i + width for i in range(len(labeling))], list(labeling))
        ax.set_ylabel("images/s")
        ax.set_title(f"labeling at {result['size']} px on {result['card'] or 'cpu'}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "labeling.png")
        made.append("labeling.png")
        profiles = {k: v["profile"] for k, v in labeling.items() if isinstance(v.get("profile"), dict)}
        if profiles:
            fig, ax = plt.subplots(figsize=(7, 4))
            stages = ["wait_for_views_ms", "gpu_decode_crop_ms", "host_to_device_ms", "forward_ms",
                      "topk_and_quality_ms", "store_write_ms"]
            bottom = np.zeros(len(profiles))
            for stage in stages:
                values = np.array([p.get(stage, 0.0) or 0.0 for p in profiles.values()])
                ax.bar(list(profiles), values, bottom=bottom, label=stage.removesuffix("_ms"))
                bottom += values
            ax.set_ylabel("ms an image (synchronised)")
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(out / "labeling_profile.png")
            made.append("labeling_profile.png")
    student = result.get("student")
    if isinstance(student, dict) and "views_per_s" in student:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar(list(student["views_per_s"]), list(student["views_per_s"].values()))
        ax.set_ylabel("views/s")
        ax.set_title(f"student {student['student']} epochs")
        fig.tight_layout()
        fig.savefig(out / "student.png")
        made.append("student.png")
    plt.close("all")
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=tuple(SCALES), default="smoke")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda for full, cpu for smoke")
    ap.add_argument("--out", default="out/gpu", help="where the JSON line, the plots and the log go")
    ap.add_argument("--work", default=None, help="where the JPEGs, teachers and stores go (default: OUT/../gpu-work;"
                                                 " kept: a second run reuses the JPEGs)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no measurement after this many seconds "
                                                                 "(default: 450 full, 900 smoke)")
    ap.add_argument("--images", type=int, default=None, help="JPEGs generated and labeled (default: 20,000 full, "
                                                             "24 smoke)")
    ap.add_argument("--only", default=None, help="only these measurements, comma-separated keys")
    ap.add_argument("--bare", action="store_true", help="refuse to import Ray, FastAPI, SQLAlchemy, uvicorn and "
                                                        "TensorBoard here, as a bare GPU machine would")
    args = ap.parse_args()
    if args.bare:
        refuse_imports(("ray", "fastapi", "sqlalchemy", "uvicorn", "tensorboard"))
    scale = SCALES[args.scale]
    args.device = args.device or ("cuda" if args.scale == "full" else "cpu")
    args.budget_s = args.budget_s or scale["budget_s"]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: error: --device cuda: torch sees no CUDA device (use --device cpu)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else out.parent / f"{out.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.FileHandler(out / "gpu.log", mode="w"), logging.StreamHandler(sys.stderr)])
    os.environ.setdefault("STILLROOM_CACHE", str(work / "cache"))
    os.environ.setdefault("STILLROOM_SHARD_STAGE", str(work / "shard-stage"))
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, min(cores, 16)))
    if args.images:  # a smaller (or larger) run: the seeds' subset and teacher training at most as many images
        scale = {**scale, "images": args.images, "seed_images": min(scale["seed_images"], args.images),
                 "train_samples": min(scale["train_samples"], args.images)}
    run = Run(args, scale, out)
    t = time.perf_counter()  # the JPEGs first: their writer processes fork before CUDA is initialised here
    folder = make_folder(work / f"jpeg-{scale['images']}-{scale['px'][0]}-{scale['px'][1]}", scale["images"],
                         scale["px"], cores)
    small = subset_folder(folder, work / f"{folder.name}-first{scale['seed_images']}", scale["seed_images"])
    run.result.update(bench="gpu", scale=args.scale, device=args.device,
                      card=torch.cuda.get_device_name(0) if args.device == "cuda" else None,
                      torch=torch.__version__, cpus=cores, size=scale["size"], images=scale["images"],
                      folder_write_s=round(time.perf_counter() - t, 1))
    for teacher in scale["teachers"]:
        run.measure(f"labeling_{teacher}", partial(measure_labeling, run, folder, work, teacher), 40)
    run.measure("seeds", lambda: measure_seeds(run, small, work), 40)
    run.measure("student", lambda: measure_student(run, small, work), 40)
    run.measure("fidelity", lambda: measure_fidelity(run, folder, work), 10)
    run.measure("teacher_train", lambda: measure_teacher_train(run, small, work), 40)
    run.measure("pytest_gpu", lambda: measure_pytest(run), 30)
    run.result["seconds"] = round(time.perf_counter() - run.t0, 1)
    try:
        run.result["plots"] = plots(run.result, out)
    except Exception as e:  # noqa: BLE001 - the figures matter more than their pictures
        run.result["plots"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    run.save()
    print(json.dumps(run.result))


if __name__ == "__main__":
    main()
