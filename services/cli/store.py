"""CLI commands of the pipelines package: ``store ...`` and ``view show`` (``teacher`` and ``label`` live in
``pipelines.teacher_commands``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stillroom.pipelines.core import StillroomError, UsageError, write_atomically
from stillroom.pipelines.data import DATASET_HELP

if TYPE_CHECKING:
    from stillroom.pipelines.store import LabelStore


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--ids {text!r}: expected comma-separated integers, e.g. 0,1,2") from None


def _output_path(text: str, flag: str = "--out") -> Path | str:
    """Where a command will write: its directory must exist (checked before any work is done); a URL is kept
    as it is (object storage has no directories to check)."""
    from stillroom.pipelines.core import check_url, is_url

    if is_url(text):
        return check_url(text)
    out = Path(text)
    if not out.parent.is_dir():
        raise UsageError(f"{flag} {text}: directory {out.parent} does not exist")
    return out


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _partial(store: LabelStore) -> str:
    """``seed 1 partial: 3 of 8 pieces done`` for each seed a writer began and did not commit ('' if none), with
    who holds its lease (``being labeled by pid 42 on node-a since 10:01:02 UTC``) when a run does."""
    return ", ".join(f"seed {seed} partial: {done} of {total} pieces done"
                     + (f" (being labeled by {lease.describe()})" if (lease := store.lease(seed)).holder() else "")
                     for seed, (done, total) in store.partial_seeds().items())


def cmd_store_ls(args: argparse.Namespace) -> int:
    from stillroom.pipelines.store import list_stores

    stores = list_stores(args.root)
    if not stores:
        print(f"no label stores under {args.root}")
    for s in stores:
        prov = s.provenance
        dataset = prov.get("dataset", {})
        teachers = ",".join(t.get("name", "?") for t in prov.get("teachers", []))
        print(f"{s.cache_key}  {dataset.get('spec', '?')}/{dataset.get('split', '?')}  "
              f"recipe={prov.get('recipe', {}).get('name', '?')}  teachers={teachers or '?'}  "
              f"k={s.schema.top_k}  seeds={s.seeds()}  {_human(s.size_on_disk())}"
              + (f"  ({partial})" if (partial := _partial(s)) else ""))
    return 0


def cmd_store_inspect(args: argparse.Namespace) -> int:
    from stillroom.pipelines.store import LabelStore

    store = LabelStore(args.dir)
    info = store.describe()
    info["partial_seeds"] = {str(seed): {"pieces_done": done, "pieces": total}
                             for seed, (done, total) in store.partial_seeds().items()}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    prov = info["provenance"]
    print(f"store        {info['path']}")
    print(f"cache key    {info['cache_key']} (format {info['format_version']})")
    ds = prov.get("dataset", {})
    print(f"dataset      {ds.get('spec')} split={ds.get('split')} fingerprint={ds.get('fingerprint')}")
    print(f"recipe       {prov.get('recipe', {}).get('name')} v{prov.get('recipe', {}).get('version')}")
    for t in prov.get("teachers", []):
        print(f"teacher      {t.get('name')} weights={str(t.get('weights_sha256'))[:16]}")
    schema = info["schema"]
    print(f"samples      {info['samples']}  classes={schema['num_classes']}  top-k={schema['top_k']}  "
          f"sampled={schema['sampled']}  features={schema['feature_shape']}")
    print(f"seeds        {info['seeds'] or 'none complete'}")
    if partial := _partial(store):
        print(f"unfinished   {partial}")
    for seed, s in info["per_seed"].items():
        parts = "  ".join(f"{k}={v}" for k, v in s["bytes_per_sample_by_array"].items())
        print(f"  seed {seed}: {s['bytes_per_sample']} bytes/sample ({parts})")
        for group, q in s.get("quality", {}).items():
            if q.get("views"):
                print(f"    labels {group:<10} views={q['views']}  teacher top-1 = truth {q['top1_agreement']:.2%}  "
                      f"truth in top-k {q['true_in_topk']:.2%}  entropy {q['mean_entropy']:.3f} nats  "
                      f"top-k mass {q['mean_topk_mass']:.4f}")
    print(f"size on disk {_human(info['size_on_disk'])}")
    return 0


def cmd_store_verify(args: argparse.Namespace) -> int:
    from stillroom.pipelines.store import LabelStore

    store = LabelStore(args.dir)
    seeds = store.seeds()
    problems = store.verify(seeds)
    for p in problems:
        print(f"CORRUPT {p}", file=sys.stderr)
    if problems:
        return 1
    checked = f"seeds {seeds}, every checksum matches" if seeds else "no complete seed to check"
    partial = _partial(store)
    print(f"ok: {store.cache_key}, {checked}" + (f"; {partial} (not committed: not read by students; "
                                                  "run the label job again to finish it)" if partial else ""))
    return 0


def cmd_store_convert(args: argparse.Namespace) -> int:
    """A format-2 or format-3 store's copy in today's format under a store root (no teacher: its labels re-encoded,
    its views checked against what this stillroom draws)."""
    from stillroom.pipelines.data import load_dataset
    from stillroom.pipelines.store import LabelStore, convert_store
    from stillroom.student.data import check_store
    from stillroom.student.dataset import dataset_of_store

    src = LabelStore(args.src)
    spec, split, data_root = dataset_of_store(src)
    dataset = load_dataset(spec, split, args.data_root or data_root)
    recipe = check_store(src, dataset)
    sizes = tuple(dataset.image_shape[1:]) if dataset.in_memory else dataset.sizes
    dst = convert_store(src, args.dst, recipe, sizes, store_views=args.store_views)
    seeds = dst.seeds()
    views = dst.schema.num_samples * max(len(seeds), 1)
    print(json.dumps({"src": str(src.path), "dst": str(dst.path), "cache_key": dst.cache_key, "seeds": seeds,
                      "bytes_per_view_before": round(src.size_on_disk() / views, 2),
                      "bytes_per_view_after": round(dst.size_on_disk() / views, 2)}))
    return 0


def cmd_store_export(args: argparse.Namespace) -> int:
    from stillroom.pipelines.store import LabelStore

    out = _output_path(args.out)
    rows = LabelStore(args.dir).export_parquet(args.seed, out)
    print(json.dumps({"out": str(args.out), "seed": args.seed, "rows": rows}))
    return 0


def cmd_view_show(args: argparse.Namespace) -> int:
    from PIL import Image

    from stillroom.pipelines.data import load_dataset
    from stillroom.pipelines.views import build_views, recipe_for, whole_views

    out = Path(args.out)
    _output_path(args.out)
    ds = load_dataset(args.dataset, args.split, args.data_root)
    recipe = recipe_for(args.recipe, ds)
    ids = np.asarray(_parse_ids(args.ids), dtype=np.int64)
    if ids.size == 0:
        raise UsageError("--ids is empty: give at least one sample id")
    views, params = build_views(ds, recipe, args.seed, ids)
    size = views.shape[-1]
    originals = whole_views(ds, ids, size)  # the whole image at the view's size
    scale = max(1, 128 // size)
    rows = []
    for orig, view in zip(originals, views, strict=True):
        pair = np.concatenate([orig.numpy(), np.ones((orig.shape[0], orig.shape[1], 2)), view.numpy()], axis=2)
        rows.append(pair)
        rows.append(np.ones((orig.shape[0], 2, pair.shape[2])))
    grid = (np.concatenate(rows[:-1], axis=1).clip(0, 1) * 255).astype(np.uint8)
    grid = grid[0] if grid.shape[0] == 1 else grid.transpose(1, 2, 0)
    img = Image.fromarray(grid)
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    write_atomically(out, img.save)  # the temporary file keeps the .png suffix PIL goes by
    print(json.dumps({"out": str(out), "ids": ids.tolist(), "columns": ["original", "view"],
                      "params": [dict(zip(("y0", "x0", "h", "w", "flip"), map(float, p[:5]), strict=True))
                                 for p in params]}))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    """Every registered view recipe with its parameters (``--json``: one JSON object per recipe, a list)."""
    from stillroom.pipelines.views import RECIPES

    recipes = [RECIPES[name].to_dict() for name in sorted(RECIPES)]
    if args.json:
        print(json.dumps(recipes, indent=1))
        return 0
    from stillroom.pipelines.views import num_view_params

    print(f"{'recipe':<16} {'v':>2} {'size':>5}  {'crop (scale, ratio)':<28} {'flip':>4}  "
          f"{'mixup/cutmix (alpha)':<22} {'P':>3}  other")
    for r in recipes:
        crop = (f"{r['scale'][0]:g}-{r['scale'][1]:g}, {r['ratio'][0]:.3g}-{r['ratio'][1]:.3g}" if r["crop"]
                else f"centre {r['center']:.4g}" if r["center"] else "none")
        alpha = f"{r['mix_alpha']:g}" + (f"/{r['cutmix_alpha']:g}" if r.get("cutmix_alpha") is not None else "")
        mix = f"{r['mixup_p']:g}/{r['cutmix_p']:g} ({alpha})" if r["mixup_p"] + r["cutmix_p"] else "none"
        other = [k for k in ("draft",) if r.get(k)]
        if r.get("interpolation", "bilinear") != "bilinear":
            other.append(r["interpolation"])
        if r.get("auto_augment"):
            other.append(r["auto_augment"])
        elif r.get("color_jitter"):
            other.append("jitter " + "/".join(f"{v:g}" for v in r["color_jitter"]))
        if r.get("re_prob"):
            other.append(f"erase {r['re_prob']:g} {r['re_mode']}" + (f" x{r['re_count']}" if r["re_count"] > 1 else ""))
        size = str(r["out_size"]) if r["out_size"] else "own"
        width = num_view_params(RECIPES[r["name"]])
        print(f"{r['name']:<16} {r['version']:>2} {size:>5}  {crop:<28} {r['flip_p']:>4g}  {mix:<22} {width:>3}  "
              f"{', '.join(other) or '-'}")
    print("P: view parameters stored per view; NAME:size=N: any recipe at output size N (8 to 2048); images of many "
          "sizes need one")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipes", help="list the view recipes with their parameters")
    p.add_argument("--json", action="store_true", help="one JSON object per recipe")
    p.set_defaults(func=cmd_recipes)

    store = sub.add_parser("store", help="list, inspect, verify and export label stores")
    ssub = store.add_subparsers(dest="store_cmd", required=True)
    p = ssub.add_parser("ls", help="list the stores under a store root")
    p.add_argument("root")
    p.set_defaults(func=cmd_store_ls)
    p = ssub.add_parser("inspect", help="provenance, seeds, sizes of one store")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_store_inspect)
    p = ssub.add_parser("verify", help="recompute every checksum; exit 1 on corruption")
    p.add_argument("dir")
    p.set_defaults(func=cmd_store_verify)
    p = ssub.add_parser("convert", help="write a format-2 or 3 store's copy in today's format (no teacher; "
                                          "views checked)")
    p.add_argument("src", help="the format-2 or format-3 store's directory")
    p.add_argument("dst", help="the store root the copy goes to (as <dst>/<cache_key>)")
    p.add_argument("--store-views", action="store_true",
                   help="keep the view parameters in the copy (else a digest a chunk, checked against what this "
                        "stillroom draws)")
    p.add_argument("--data-root", default=None, help="where the data set's files are (default: as labeled)")
    p.set_defaults(func=cmd_store_convert)
    p = ssub.add_parser("export", help="write one seed as Parquet")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_store_export)

    view = sub.add_parser("view", help="look at the views of a recipe")
    vsub = view.add_subparsers(dest="view_cmd", required=True)
    p = vsub.add_parser("show", help="a PNG grid: each sample's original beside its view")
    p.add_argument("--dataset", default="fashion-mnist", help=DATASET_HELP)
    p.add_argument("--split", default="train")
    p.add_argument("--data-root", default=None)
    p.add_argument("--recipe", default="fmnist-rrc")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ids", default="0,1,2,3")
    p.add_argument("--out", default="views.png")
    p.set_defaults(func=cmd_view_show)


__all__ = ["register", "StillroomError"]
