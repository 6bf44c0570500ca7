"""Data sets on disk: opening an ImageNet-shaped folder, memory at N and 4N, and decode+view throughput.

Writes its own ImageNet-layout folders under ``--work`` (default /tmp/stillroom-bench-data; kept for the next
run, never committed): ``train/<class>/*.JPEG`` of Fashion-MNIST pixels upscaled (bilinear) to random heights
and widths of 160-512 px (so random aspects), tinted, with mild noise, JPEG quality 90; N images, and 4N (the
first N are hard links to the N folder's files). Then, each open in a fresh subprocess:

- cold open (no index cache: every header read and every file hashed, in parallel) and warm open (the cached
  index: a listing and a stat per file), seconds and the process's peak RSS (``ru_maxrss``, torch imported as
  every command has it), at N and at 4N; the ratio of the peak RSS of warm opens at 4N and N (target <= 1.15);
- decode+view images/s per core at 224 px: stillroom's ``imagenet-rrc`` views (``render_batch``: decode, per-image
  RandomResizedCrop, uint8) against torchvision ``ImageFolder`` + ``RandomResizedCrop(224)`` + ``PILToTensor``,
  both through a ``DataLoader`` with the same ``--workers`` processes over the same random sample of images,
  rounds interleaved, the best round of each (target ratio >= 1.0); also without DCT-scaled (draft) decoding;
- the same for ``deit`` views (bicubic crop, RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25, from the
  stored rows) against timm's own ``create_transform(224, is_training=True, auto_augment='rand-m9-mstd0.5-inc1',
  re_prob=0.25, interpolation='bicubic')`` on ``ImageFolder`` (target >= 1.0). DeiT mixes every pair, so a
  batch needs each view's partner's view too; timm's batch-level Mixup takes it from the batch. ``deit`` is
  what the student's loader does per view: its own ``BatchSource`` and DataLoader (``student._loader.
  batch_parts``) over the batches a ``deit`` store replays in seed order (``student.data.partner_run_order``:
  runs of ``--batch`` consecutive samples of seed 0's partner cycle, each partner view taken from the batch
  but the last one's: ``batch + 1`` renders a batch), rows drawn as the store holds them; the uint8 views and
  partner views handed over count, mixing them (``mix_views``, on the training device) is not timed, as timm's
  Mixup is not. ``deit_shuffled``: the same loader on the same images in shuffled batches, as ``--view-order
  random`` and ``--views-per-image K > 1`` replay them (each partner rendered: about two renders a view);
  ``deit_own_only``: the views alone, no partner. Every loader of the bench reads the same images: the first
  ``--images`` of that partner order;
- the index's bytes per sample, in memory and in its cache file.

The warm open time and RAM of a 1.28 M-image index are *extrapolated* linearly from the 4N figures (per-sample
cost of the warm open, index bytes per sample), not measured. Prints one JSON line.

    python bench/data.py [--n 10000] [--workers 2] [--images 1500] [--rounds 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch  # every command imports it: part of the baseline RSS of the opens
from torch.utils.data import Dataset as TorchDataset

IMAGENET = 1_281_167


def _write_images(args: tuple[str, list[tuple[int, int, int, int, int]]]) -> int:
    """Write JPEGs: (sample, label, height, width, seed) rows into ``root/train/<label>/``."""
    from PIL import Image

    from stillroom.pipelines.data import load_dataset

    root, rows = args
    images = load_dataset("fashion-mnist").images  # type: ignore[attr-defined]
    noise = np.random.default_rng(0).normal(0, 6, (1024, 1024, 3)).astype(np.float32)  # texture, cut per image
    for i, label, h, w, seed in rows:
        rng = np.random.default_rng(seed)
        small = Image.fromarray(images[i % len(images), 0]).resize((w, h), Image.Resampling.BILINEAR)
        tint = rng.uniform(0.5, 1.0, 3).astype(np.float32)
        y, x = rng.integers(0, 1024 - 512, size=2)
        pixels = np.asarray(small, dtype=np.float32)[..., None] * tint + noise[y : y + h, x : x + w]
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            Path(root) / "train" / f"class{label:02d}" / f"img_{i:07d}.JPEG", quality=90)
    return len(rows)


def make_folder(root: Path, n: int, reuse: Path | None, workers: int) -> Path:
    """An ImageNet-layout folder of ``n`` JPEGs (ready when ``root/.complete`` exists)."""
    from multiprocessing import get_context

    from stillroom.pipelines.data import load_dataset

    if (root / ".complete").exists():
        return root
    labels = load_dataset("fashion-mnist").labels
    rng = np.random.default_rng(12)
    sizes = rng.integers(160, 513, size=(n, 2))
    for c in range(10):
        (root / "train" / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    todo = []
    for i in range(n):
        label = int(labels[i % len(labels)])
        path = root / "train" / f"class{label:02d}" / f"img_{i:07d}.JPEG"
        src = reuse / "train" / f"class{label:02d}" / f"img_{i:07d}.JPEG" if reuse else None
        if path.exists():
            continue
        if src is not None and src.exists():
            os.link(src, path)
        else:
            todo.append((i, label, int(sizes[i, 0]), int(sizes[i, 1]), 1000 + i))
    chunks = [(str(root), todo[k : k + 500]) for k in range(0, len(todo), 500)]
    with get_context("fork").Pool(workers) as pool:
        pool.map(_write_images, chunks)
    (root / ".complete").touch()
    return root


def child_open(root: str) -> None:
    """In a fresh process: open the folder's train split, build one batch of views; seconds and peak RSS."""
    from stillroom.pipelines.data import ImageFolder, load_dataset
    from stillroom.pipelines.views import build_views, get_recipe

    t = time.perf_counter()
    ds = load_dataset(f"imagefolder:{root}")
    open_s = time.perf_counter() - t
    if not isinstance(ds, ImageFolder):
        raise SystemExit(f"bench/data.py: imagefolder:{root} opened as a {type(ds).__name__}, not an ImageFolder")
    open_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # torch imported, index open
    index_bytes = sum(a.nbytes for a in (ds.labels, ds.sizes, ds._paths, ds._offsets))
    build_views(ds, get_recipe("imagenet-rrc"), 0, np.arange(0, len(ds), max(1, len(ds) // 32)))
    print(json.dumps({"open_s": open_s, "samples": len(ds), "reused": ds.index_reused, "index_bytes": index_bytes,
                      "cache_file_bytes": os.stat(ds.cache_path).st_size if ds.cache_path else 0,
                      "open_peak_rss_mb": open_peak_mb,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                      "fingerprint": ds.fingerprint, "torch": torch.__version__}))


def measure_open(root: Path, cold: bool) -> dict:
    if cold:
        for f in (root / ".stillroom-index").glob("*"):
            f.unlink()
    out = subprocess.run([sys.executable, __file__, "--child-open", str(root)], check=True, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    return json.loads(out.stdout.strip().splitlines()[-1])


class _Ours(TorchDataset):
    """Batches of ``imagenet-rrc`` views rendered in a loader worker: uint8 ``(B, 3, 224, 224)``."""

    def __init__(self, spec: str, ids: np.ndarray, batch: int, draft: bool, recipe: str = "imagenet-rrc",
                 own_only: bool = False):
        from stillroom.pipelines.data import load_dataset
        from stillroom.pipelines.views import draw_views, get_recipe

        self.ds = load_dataset(spec)
        self.ids, self.batch, self.draft, self.own_only = ids, batch, draft, own_only
        self.recipe = get_recipe(recipe)
        self.params = draw_views(self.recipe, 0, ids, len(self.ds), self.ds.sizes)

    def __len__(self) -> int:
        return -(-len(self.ids) // self.batch)

    def __getitem__(self, k: int):
        from stillroom.pipelines.views import own_rows, render_batch, render_views

        rows = slice(k * self.batch, (k + 1) * self.batch)
        if self.own_only:
            return render_views(self.ds, self.ids[rows], own_rows(self.params[rows], self.recipe), 224, self.draft,
                                self.recipe)
        return render_batch(self.ds, self.ids[rows], self.params[rows], 224, self.draft, self.recipe)[0]


def _posterize_zero_bits() -> None:
    """timm's Posterize ops at 0 bits call ``ImageOps.posterize(img, 0)``, which this Pillow refuses (older ones
    gave black): they give black here, as ``pipelines._photometric`` does, so timm's transform runs."""
    from PIL import Image
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        op = auto_augment.NAME_TO_OP[name]
        auto_augment.NAME_TO_OP[name] = (lambda img, bits, op=op, **kw: Image.new(img.mode, img.size) if bits <= 0
                                         else op(img, bits, **kw))


def _deit_loader(root: Path, ids: np.ndarray, workers: int, batch: int, shuffled: bool):
    """The student's loader (``BatchSource`` through ``batch_parts``) over ``deit`` rows of seed 0, in batches of
    ``ids`` as given (partner runs) or shuffled: uint8 ``BatchParts``."""
    from stillroom.pipelines.data import load_dataset
    from stillroom.pipelines.views import draw_views, get_recipe
    from stillroom.student._loader import BatchSource, batch_parts

    ds = load_dataset(f"imagefolder:{root}")
    recipe = get_recipe("deit")
    params = draw_views(recipe, 0, np.arange(len(ds)), len(ds), ds.sizes)  # the store's view array, seed 0
    source = BatchSource(ds, {"view": params}, 0, 0, 224, recipe.draft, ds.num_classes, recipe=recipe)
    order = np.random.default_rng(1).permutation(ids) if shuffled else ids
    return batch_parts(source, [order[s : s + batch] for s in range(0, len(order), batch)], workers, pin=False)


def throughput(root: Path, ids: np.ndarray, workers: int, batch: int, rounds: int) -> dict:
    from timm.data import create_transform
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    tv = Subset(datasets.ImageFolder(str(root / "train"), transforms.Compose(
        [transforms.RandomResizedCrop(224), transforms.PILToTensor()])), ids.tolist())
    _posterize_zero_bits()
    timm_deit = Subset(datasets.ImageFolder(str(root / "train"), create_transform(
        224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, interpolation="bicubic")),
        ids.tolist())
    loaders = {
        "stillroom": lambda: DataLoader(_Ours(f"imagefolder:{root}", ids, batch, True), batch_size=None,
                                        num_workers=workers),
        "stillroom_no_draft": lambda: DataLoader(_Ours(f"imagefolder:{root}", ids, batch, False), batch_size=None,
                                                 num_workers=workers),
        "torchvision": lambda: DataLoader(tv, batch_size=batch, num_workers=workers),
        "deit": lambda: _deit_loader(root, ids, workers, batch, shuffled=False),
        "deit_shuffled": lambda: _deit_loader(root, ids, workers, batch, shuffled=True),
        "deit_own_only": lambda: DataLoader(_Ours(f"imagefolder:{root}", ids, batch, True, "deit", own_only=True),
                                            batch_size=None, num_workers=workers),
        "timm_deit": lambda: DataLoader(timm_deit, batch_size=batch, num_workers=workers),
    }
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, make in loaders.items():
            loader = make()
            t = time.perf_counter()
            seen = 0
            for x in loader:
                x = x[0] if isinstance(x, list) else x  # torchvision: (images, labels)
                if hasattr(x, "pixels"):  # the student's loader: BatchParts, each view's partner view beside it
                    assert x.partners is not None and x.partner_index is not None
                    x = x.pixels
                assert x.dtype == (torch.float32 if name == "timm_deit" else torch.uint8)
                assert x.shape[1:] == (3, 224, 224)
                seen += len(x)
            rate = seen / (time.perf_counter() - t) / workers
            best[name] = max(best.get(name, 0.0), rate)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="loader worker processes")
    ap.add_argument("--images", type=int, default=1500, help="images per throughput round")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default="/tmp/stillroom-bench-data")
    ap.add_argument("--child-open", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_open:
        child_open(args.child_open)
        return
    work = Path(args.work)
    t = time.perf_counter()
    small = make_folder(work / f"n{args.n}", args.n, None, args.workers)
    large = make_folder(work / f"n{4 * args.n}", 4 * args.n, small, args.workers)
    make_s = time.perf_counter() - t
    opens = {}
    for name, root in (("n", small), ("4n", large)):
        opens[name] = {"cold": measure_open(root, cold=True), "warm": measure_open(root, cold=False)}
        if not opens[name]["warm"]["reused"]:
            raise SystemExit(f"the warm open of {root} did not reuse its index")
    from stillroom.pipelines.views import get_recipe
    from stillroom.student.data import partner_run_order

    # the images a deit epoch's first batches take (runs of the partner cycle); the same images for every loader
    ids = partner_run_order(get_recipe("deit"), 0, args.n, args.batch, 0, 0)[: min(args.images, args.n)]
    rates = throughput(small, ids, args.workers, args.batch, args.rounds)
    warm4 = opens["4n"]["warm"]
    per_sample_s = warm4["open_s"] / warm4["samples"]
    bytes_per_sample = warm4["index_bytes"] / warm4["samples"]
    rss_ratio = warm4["peak_rss_mb"] / opens["n"]["warm"]["peak_rss_mb"]
    # RSS growth per sample, N -> 4N, of the warm opens' peaks measured right after the open
    rss_slope = (warm4["open_peak_rss_mb"] - opens["n"]["warm"]["open_peak_rss_mb"]) * 2**20 / (3 * args.n)
    ratio = rates["stillroom"] / rates["torchvision"]
    deit_ratio = rates["deit"] / rates["timm_deit"]
    print(json.dumps({
        "n": args.n, "workers": args.workers, "cpus": os.cpu_count(), "data_mb": {
            name: round(sum(f.stat().st_size for f in (root / "train").rglob("*.JPEG")) / 2**20, 1)
            for name, root in (("n", small), ("4n", large))},
        "make_data_s": round(make_s, 1),
        "cold_open_s": {k: round(v["cold"]["open_s"], 2) for k, v in opens.items()},
        "warm_open_s": {k: round(v["warm"]["open_s"], 2) for k, v in opens.items()},
        "peak_rss_mb": {f"{k}_{c}": round(v[c]["peak_rss_mb"], 1) for k, v in opens.items() for c in ("cold", "warm")},
        "peak_rss_mb_after_open": {f"{k}_{c}": round(v[c]["open_peak_rss_mb"], 1) for k, v in opens.items()
                                   for c in ("cold", "warm")},
        "cold_open_children_peak_rss_mb": {k: round(v["cold"]["children_peak_rss_mb"], 1) for k, v in opens.items()},
        "rss_ratio_4n_over_n": round(rss_ratio, 3),
        "rss_ratio_after_open_4n_over_n": round(warm4["open_peak_rss_mb"] / opens["n"]["warm"]["open_peak_rss_mb"], 3),
        "rss_ratio_cold_4n_over_n": round(opens["4n"]["cold"]["peak_rss_mb"] / opens["n"]["cold"]["peak_rss_mb"], 3),
        "index_bytes_per_sample": round(bytes_per_sample, 1),
        "warm_rss_growth_bytes_per_sample": round(rss_slope, 1),
        "index_cache_file_bytes_per_sample": round(warm4["cache_file_bytes"] / warm4["samples"], 1),
        "views_224_per_s_per_core": {k: round(v, 1) for k, v in rates.items()},
        "ratio_vs_torchvision": round(ratio, 3),
        "ratio_vs_torchvision_no_draft": round(rates["stillroom_no_draft"] / rates["torchvision"], 3),
        "deit_ratio_vs_timm": round(deit_ratio, 3),
        "deit_shuffled_ratio_vs_timm": round(rates["deit_shuffled"] / rates["timm_deit"], 3),
        "deit_own_only_ratio_vs_timm": round(rates["deit_own_only"] / rates["timm_deit"], 3),
        "extrapolated_1_28m": {"warm_open_s": round(per_sample_s * IMAGENET, 1),
                               "index_ram_mb": round(bytes_per_sample * IMAGENET / 2**20, 1),
                               "peak_rss_mb": round(opens["n"]["warm"]["peak_rss_mb"] + max(rss_slope, bytes_per_sample)
                                                    * (IMAGENET - args.n) / 2**20, 1),
                               "how": "linear in samples: open time from the 4N warm open, RSS from the N warm "
                                      "open plus the larger of the measured RSS growth per sample (N -> 4N) and "
                                      "the index bytes per sample; not measured"},
        "targets": {"rss_ratio<=1.15": rss_ratio <= 1.15, "ratio_vs_torchvision>=1.0": ratio >= 1.0,
                    "deit_ratio_vs_timm>=1.0": deit_ratio >= 1.0},
    }))


if __name__ == "__main__":
    main()
