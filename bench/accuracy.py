"""Student accuracy on Fashion-MNIST: the same student, the same budget, each way of learning.

Two teachers are trained here first (``pipelines.teacher_train``, recipe ``fmnist-flip``; no pretrained
weights reach this machine). Teacher A labels the train split once per augmentation seed (top-k, sampled
classes and a feature map, one store); the ensemble A+B labels it into a second store (MEAL V2). Then one
student per row trains for the same epochs, batches and views (epoch ``e`` replays seed ``e``) and is scored
on the test split:

    supervised   ``ce``: ground truth only (mixed views: the mixed one-hot label)
    online_kd    ``kd --online``: teacher A in the loop on the same views, its full float32 distribution
    online_encoded ``kd --online encoded``: the same, through the store's encoding (float16 top-k and tail)
    cached_kd    ``kd`` from the store
    deit_hard    ``deit-hard`` with a distillation-token ViT (timm ``deit_tiny_distilled_patch16_224``, shrunk)
    mealv2       ``mealv2`` on the A+B ensemble's soft labels plus the discriminator, no ground truth
    sampled      ``sampled``: the unbiased sampled-class estimate of the soft cross-entropy
    tat_kd       ``tat``: TaT on teacher A's stored ``layer2`` map (4x4) plus the ``kd`` term at T = 1

``--recipe-rows`` adds, for each row, ``ROW_recipe``: the same student with the recipe's DeiT-style parts
(``RECIPE_ROW``: 0.5 epoch of warmup from 1e-6, cosine to 1e-5, label smoothing 0.1 on the ground-truth term
where the method has one, an EMA of the weights averaging the last fifteenth of the run's steps as DeiT's does
(``ema_decay``), whose last-epoch top-1 is the row's; the
model's own is ``top1_recipe_model``), in the same run, from the same teachers and stores.

``--augment-rows`` adds ``supervised_aug`` and ``cached_kd_aug``: teacher A labels a third store with
``--augment-recipe`` (default ``fmnist-randaug``: ``fmnist-rrc-mix`` plus timm's RandAugment
``rand-m9-mstd0.5-inc1`` and random erasing 0.25) under the same seeds, and the two students replay it with
``--view-order random`` (each epoch, each sample's view drawn among the seeds, as apple/ml-dr's student does).

``--student-seeds 0,1`` trains every row once per seed (the row's top-1 their mean; ``top1_seeds``, ``top1_spread``);
``--store-formats 2,4`` labels every store in both formats from the same teachers and trains every row from each
(``ROW_format2``; ``format4_minus_format2``); ``--plot FILE`` draws every row's mean and seeds.

Prints one JSON line: each row's top-1, the teachers' top-1, minutes, the store's bytes per sample with and
without features, the two online differences (cached minus full online: what keeping top-k costs; cached
minus store-encoded online) and the two targets (cached KD >= online KD - 0.3 points; cached KD >=
supervised + 1.0).

    python bench/accuracy.py            # full train split, about 30 minutes on 2 cores
    python bench/accuracy.py --quick    # 8,000 samples, a few minutes
    python bench/accuracy.py --recipe-rows --rows supervised,cached_kd,deit_hard
    python bench/accuracy.py --augment-rows --rows supervised,cached_kd
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from stillroom.pipelines.data import load_dataset
from stillroom.pipelines.labeling import LabelConfig, run_labeling
from stillroom.pipelines.store import LabelStore
from stillroom.pipelines.teachers import TeacherTrainConfig, train_teacher
from stillroom.student.config import TrainConfig
from stillroom.student.methods import method_class
from stillroom.student.run import train

VIT_STUDENT = "deit_tiny_distilled_patch16_224"
VIT_KWARGS = {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2}

# row -> (store, TrainConfig overrides)
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "supervised": ("a", dict(loss="ce")),
    "online_kd": ("a", dict(loss="kd", online=True, online_targets="full")),
    "online_encoded": ("a", dict(loss="kd", online=True, online_targets="encoded")),
    "cached_kd": ("a", dict(loss="kd")),
    "deit_hard": ("a", dict(loss="deit-hard", student=VIT_STUDENT, student_kwargs=VIT_KWARGS, distill_token=True,
                       lr=1e-3)),
    "mealv2": ("ens", dict(loss="mealv2")),
    "sampled": ("a", dict(loss="sampled")),
    "tat_kd": ("a", dict(loss="tat", student_layer="layer2", tat_variant="full")),
}

# the recipe rows' additions: DeiT's parts (warmup, cosine to a floor, smoothing 0.1, EMA) scaled to a run of a few
# epochs (DeiT: 5 warmup epochs of 300, EMA decay 0.99996 over 375,000 steps; here a few hundred steps an epoch)
RECIPE_ROW: dict[str, Any] = dict(warmup_epochs=0.5, warmup_lr=1e-6, min_lr=1e-5, sched="cosine", smoothing=0.1,
                                  model_ema=True)
# DeiT's EMA, decay 0.99996 over 375,000 steps (300 epochs of 1,250), averages about the last 25,000 steps: a
# fifteenth of the run. A recipe row keeps that fraction of its own steps (0.998 at 500 steps is that at 7,500)
EMA_RUN_FRACTION = 1 / (1 - 0.99996) / 375_000


def format_suffix(fmt: int) -> str:
    """What a store and a row of store format ``fmt`` are named with: nothing for today's (4), ``_format2`` else."""
    return "" if fmt == 4 else f"_format{fmt}"


def ema_decay(steps: int) -> float:
    """The EMA decay that averages ``EMA_RUN_FRACTION`` of a run of ``steps`` optimizer steps (at least 10)."""
    return round(1 - 1 / max(EMA_RUN_FRACTION * steps, 10.0), 6)
AUGMENT_ROWS = ("supervised", "cached_kd")  # replayed from the --augment-recipe store with --view-order random


def plot(per_seed: dict[str, list[float]], path: str, title: str) -> None:
    """Each row's top-1: its mean (a bar) and every student seed's (dots), best row on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(per_seed, key=lambda r: float(np.mean(per_seed[r])))
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.4))
    means = [float(np.mean(per_seed[r])) for r in rows]
    ax.barh(range(len(rows)), means, color="#9bb7d4")
    for i, row in enumerate(rows):
        ax.plot(per_seed[row], [i] * len(per_seed[row]), "o", color="#1f3b5a", ms=4)
        ax.text(max(per_seed[row]) + 0.1, i, f" {means[i]:.2f}", va="center", fontsize=8)  # right of the dots
    lo = min(min(v) for v in per_seed.values())
    ax.set_xlim(lo - 2, max(max(v) for v in per_seed.values()) + 1.5)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("student top-1 (%): bar the mean, dots each student seed")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8,000 samples, 2 seeds: a few minutes")
    ap.add_argument("--dataset", default=None, help="default: fashion-mnist (quick: fashion-mnist:n=8000)")
    ap.add_argument("--teachers", default="resnet10t,resnet10t", help="teacher A and B (A alone labels kd rows)")
    ap.add_argument("--teacher-epochs", default=None, help="A,B (default 6,3; quick: 2,2)")
    ap.add_argument("--teacher-recipe", default="fmnist-flip", help="the teachers' training views")
    ap.add_argument("--student", default="test_resnet")
    ap.add_argument("--student-kwargs", default="{}", help="JSON timm kwargs of the CNN student, e.g. narrower")
    ap.add_argument("--recipe", default="fmnist-rrc-mix")
    ap.add_argument("--seeds", type=int, default=None, help="augmentation seeds labeled (default 4; quick: 2)")
    ap.add_argument("--epochs", type=int, default=None, help="student epochs (default: one per seed)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--student-seeds", default="0",
                    help="each row trains once per seed (its init and batch order), e.g. 0,1: the row's top-1 is their "
                         "mean, top1_seeds each one's")
    ap.add_argument("--store-formats", default="4",
                    help="the store formats the rows read, e.g. 2,4: every row once per format from stores the same "
                         "teachers label in each (a format-2 row is named ROW_format2)")
    ap.add_argument("--plot", default=None, help="write a PNG of every row's top-1 (mean, and each seed's) here")
    ap.add_argument("--alpha", type=float, default=0.5,
                    help="weight of the teacher term in kd and tat (1: no ground truth, as Beyer et al. 2022)")
    ap.add_argument("--rows", default=",".join(ROWS), help="which rows to train")
    ap.add_argument("--recipe-rows", action="store_true",
                    help="also each row with warmup, cosine, label smoothing and EMA (RECIPE_ROW)")
    ap.add_argument("--augment-rows", action="store_true",
                    help="also supervised and cached_kd from a RandAugment + erasing store, --view-order random")
    ap.add_argument("--augment-recipe", default="fmnist-randaug", help="--augment-rows: the third store's views")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed after)")
    ap.add_argument("--reuse-teachers", action="store_true",
                    help="keep teacher checkpoints an earlier run left in --dir (their labels are then cache hits)")
    args = ap.parse_args()
    dataset = args.dataset or ("fashion-mnist:n=8000" if args.quick else "fashion-mnist")
    student_seeds = tuple(int(x) for x in args.student_seeds.split(","))
    formats = tuple(dict.fromkeys(int(x) for x in args.store_formats.split(",")))
    if not set(formats) <= {2, 4}:
        ap.error(f"--store-formats {args.store_formats}: expected 2, 4 or 2,4")
    teacher_epochs = [int(e) for e in (args.teacher_epochs or ("2,2" if args.quick else "6,3")).split(",")]
    seeds = tuple(range(args.seeds or (2 if args.quick else 4)))
    epochs = args.epochs or len(seeds)
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}: expected some of {', '.join(ROWS)}")
    names = args.teachers.split(",")
    if len(names) != 2:
        ap.error("--teachers takes two model names, A,B")

    work = Path(args.dir or tempfile.mkdtemp(prefix="stillroom-bench-accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    minutes: dict[str, float] = {}
    try:
        teachers, teacher_top1 = [], {}
        for i, name in enumerate(names if "mealv2" in rows else names[:1]):  # B serves only the ensemble
            t = time.perf_counter()
            path = work / f"teacher{i}.pt"
            record = path.with_suffix(".json")
            if args.reuse_teachers and record.exists():
                got = json.loads(record.read_text())
            else:
                got = train_teacher(TeacherTrainConfig(dataset=dataset, model=name, out=str(path),
                                                       epochs=teacher_epochs[i], recipe=args.teacher_recipe,
                                                       seed=i),
                                    progress=False)
            teachers.append(f"{name}@{path}")
            teacher_top1["AB"[i]] = got["top1"]
            minutes[f"teacher_{'AB'[i]}"] = (time.perf_counter() - t) / 60
            print(f"teacher {'AB'[i]} ({name}): top-1 {got['top1']:.4f}", flush=True)

        stores: dict[str, str] = {}
        for fmt in formats:  # the same teachers, views and seeds in each format
            suffix = format_suffix(fmt)
            t = time.perf_counter()
            stores["a" + suffix] = run_labeling(LabelConfig(
                dataset=dataset, teachers=(teachers[0],), recipe=args.recipe, seeds=seeds, top_k=5, sampled=8,
                features="layer2", feature_grid=4, store_root=str(work / "stores"), batch_size=512,
                store_format=fmt), backend="local", progress=False)["store"]
            minutes["label_A" + suffix] = (time.perf_counter() - t) / 60
            if "mealv2" in rows:
                t = time.perf_counter()
                stores["ens" + suffix] = run_labeling(LabelConfig(
                    dataset=dataset, teachers=tuple(teachers), recipe=args.recipe, seeds=seeds, top_k=5,
                    store_root=str(work / "stores"), batch_size=512, store_format=fmt),
                    backend="local", progress=False)["store"]
                minutes["label_ensemble" + suffix] = (time.perf_counter() - t) / 60
        stores.setdefault("a", stores[next(iter(stores))])  # the bytes below: format 4's where it was labeled
        if args.augment_rows:
            t = time.perf_counter()
            stores["aug"] = run_labeling(LabelConfig(dataset=dataset, teachers=(teachers[0],),
                                                     recipe=args.augment_recipe, seeds=seeds, top_k=5,
                                                     store_root=str(work / "stores"), batch_size=512),
                                         backend="local", progress=False)["store"]
            minutes["label_augment"] = (time.perf_counter() - t) / 60
        described = LabelStore(stores["a"]).describe()["per_seed"][str(seeds[0])]
        by_array = described["bytes_per_sample_by_array"]

        per_seed: dict[str, list[float]] = {}
        recipe_model: dict[str, list[float]] = {}
        runs: list[tuple[str, str, dict[str, Any], str]] = []
        for fmt in formats:
            suffix = format_suffix(fmt)
            runs += [(row + suffix, row, {}, ROWS[row][0] + suffix) for row in rows]
            if args.recipe_rows:
                runs += [(f"{row}_recipe{suffix}", row, RECIPE_ROW, ROWS[row][0] + suffix) for row in rows]
        if args.augment_rows:
            runs += [(f"{row}_aug", row, {"view_order": "random"}, "aug") for row in AUGMENT_ROWS]
        steps = epochs * -(-len(load_dataset(dataset)) // args.batch_size)
        decay = ema_decay(steps)
        for student_seed in student_seeds:  # a round of every row per seed: a late slowdown hits every row alike
            for row, base_row, row_extra, store in runs:
                extra = ROWS[base_row][1]
                t = time.perf_counter()
                out_dir = work / f"run-{row}-seed{student_seed}"
                shutil.rmtree(out_dir, ignore_errors=True)
                config = {**dict(store=stores[store], dataset=dataset, student=args.student,
                                 student_kwargs=json.loads(args.student_kwargs), out=str(out_dir),
                                 epochs=epochs, batch_size=args.batch_size, lr=args.lr, alpha=args.alpha,
                                 seed=student_seed, progress=False),
                          **extra, **row_extra}
                if config["loss"] == "deit-hard":
                    config["alpha"] = 0.5  # DeiT's hard distillation: fixed halves
                recipe_extra = row_extra is RECIPE_ROW
                if recipe_extra:
                    config["model_ema_decay"] = decay
                    if not method_class(str(config["loss"])).ground_truth:
                        config["smoothing"] = 0.0  # mealv2, sampled: no ground-truth term to smooth
                result = train(TrainConfig(**config))  # type: ignore[arg-type]
                minutes[row] = minutes.get(row, 0.0) + (time.perf_counter() - t) / 60
                top1 = result["last"]["ema_top1"] if recipe_extra else result["top1"]
                per_seed.setdefault(row, []).append(round(100 * top1, 2))
                if recipe_extra:
                    recipe_model.setdefault(row, []).append(round(100 * result["top1"], 2))
                print(f"{row} (student seed {student_seed}): top-1 {per_seed[row][-1]:.2f} "
                      f"({(time.perf_counter() - t) / 60:.1f} min)", flush=True)
        students = {row: round(float(np.mean(v)), 2) for row, v in per_seed.items()}

        out = {
            "bench": "accuracy", "dataset": dataset, "recipe": args.recipe, "seeds": len(seeds), "epochs": epochs,
            "batch_size": args.batch_size, "alpha": args.alpha, "student": args.student,
            "student_seeds": list(student_seeds), "store_formats": list(formats),
            "student_kwargs": json.loads(args.student_kwargs), "teachers_reused": bool(args.reuse_teachers),
            "vit_student": f"{VIT_STUDENT} {VIT_KWARGS}",
            "teachers": names, "teacher_epochs": teacher_epochs, "teacher_recipe": args.teacher_recipe,
            "teacher_top1": {k: round(100 * v, 2) for k, v in teacher_top1.items()},
            "top1": students,
            **({"top1_seeds": per_seed, "top1_spread": {row: round(max(v) - min(v), 2) for row, v in per_seed.items()}}
               if len(student_seeds) > 1 else {}),
            **({"top1_recipe_model": {row: round(float(np.mean(v)), 2) for row, v in recipe_model.items()},
                "recipe_row": {**RECIPE_ROW, "model_ema_decay": decay, "steps": steps}} if args.recipe_rows else {}),
            **({"augment_recipe": args.augment_recipe, "augment_view_order": "random"} if args.augment_rows else {}),
            "store_bytes_per_sample": {"with_features": described["bytes_per_sample"],
                                       "without_features": round(described["bytes_per_sample"]
                                                                 - by_array.get("features", 0.0), 2),
                                       "by_array": by_array},
            "minutes": {k: round(v, 2) for k, v in minutes.items()},
            "total_minutes": round((time.perf_counter() - t_all) / 60, 2),
        }
        if {"cached_kd", "online_kd", "supervised"} <= set(students):
            kd, online, sup = students["cached_kd"], students["online_kd"], students["supervised"]
            out["targets"] = {"cached_kd_minus_online_kd": round(kd - online, 2),
                              "cached_kd_minus_online_encoded": (round(kd - students["online_encoded"], 2)
                                                                 if "online_encoded" in students else None),
                              "cached_kd_minus_supervised": round(kd - sup, 2),
                              "met": bool(kd >= online - 0.3 and kd >= sup + 1.0)}
        if args.recipe_rows:  # what the recipe adds to each row: its mean over the plain row's
            out["recipe_adds"] = {row: round(students[f"{row}_recipe"] - students[row], 2) for row in rows
                                  if f"{row}_recipe" in students}
        if len(formats) > 1:  # format 4 against format 2, row by row: within the seeds' spread is no loss
            out["format4_minus_format2"] = {row: round(students[row] - students[f"{row}_format2"], 2)
                                            for row in rows if f"{row}_format2" in students}
        if args.plot:
            plot(per_seed, args.plot, f"{dataset}, {epochs} epochs, student seeds {list(student_seeds)}")
            out["plot"] = args.plot
        print(json.dumps(out))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
