"""Student training speed: supervised vs cached distillation from the store vs the teacher in the loop.

One run, the same student, data, batches and views (the same store seed and shuffle), three ways:
(a) ``ce`` (ground truth only), (b) cached ``deit-hard`` (labels gathered from the store), (c) ``deit-hard``
``--online`` (the teacher labels each batch live). The teacher is a randomly initialised timm model saved as a
checkpoint here (its accuracy does not matter for speed); it labels the Fashion-MNIST test split (10,000
images) once, and the students train on that split. Each way runs ``--repeats`` times, interleaved, and the
order rotates every round (a, b, c; b, c, a; ...) so that no way always runs first or after the same one on a
shared, noisy machine; the fastest epoch of each way counts, and every epoch time is printed beside it.
Prints one JSON line. Target: cached_over_supervised <= 1.05.

    python bench/training.py [--steps 40] [--batch-size 128] [--teacher resnet50] [--student resnet18]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from pipelines.labeling import LabelConfig, run_labeling
from pipelines.teachers import Preprocess, save_checkpoint
from student.trainer import TrainConfig, train


def make_teacher(path: Path, name: str, num_classes: int, resolution: int) -> str:
    import timm

    torch.manual_seed(0)
    kwargs = {"num_classes": num_classes, "in_chans": 1}
    model = timm.create_model(name, pretrained=False, **kwargs)
    save_checkpoint(path, name, model, kwargs, Preprocess(resolution, (0.286,), (0.353,), 1), extra={})
    return f"{name}@{path}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--split", default="test", help="the split labeled and trained on")
    ap.add_argument("--teacher", default="resnet50")
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--steps", type=int, default=40, help="training steps per epoch")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="rounds; each way runs once a round")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed after)")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="stillroom-bench-training-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        teacher = make_teacher(work / "teacher.pt", args.teacher, 10, 28)
        t = time.perf_counter()
        labeled = run_labeling(LabelConfig(dataset=args.dataset, split=args.split, teachers=(teacher,),
                                           recipe="fmnist-rrc", seeds=(0,), top_k=10, store_root=str(work / "stores"),
                                           batch_size=512), backend="local", progress=False)
        label_s = time.perf_counter() - t
        base = dict(store=labeled["store"], dataset=args.dataset, split=args.split, eval_split=args.split,
                    student=args.student, epochs=1, batch_size=args.batch_size, max_steps=args.steps,
                    eval_limit=512, progress=False, device=args.device)
        ways = {"supervised": dict(loss="ce"), "cached": dict(loss="deit-hard"),
                "online": dict(loss="deit-hard", online=True)}
        names = list(ways)
        runs: dict[str, list[float]] = {name: [] for name in names}
        for repeat in range(args.repeats):
            for name in names[repeat % len(names):] + names[: repeat % len(names)]:
                out = work / f"run-{name}-{repeat}"
                result = train(TrainConfig(**{**base, **ways[name], "out": str(out)}))  # type: ignore[arg-type]
                runs[name].append(result["epoch_seconds"][0])
        seconds = {name: min(times) for name, times in runs.items()}
        print(json.dumps({
            "bench": "training", "dataset": f"{args.dataset}/{args.split}", "student": args.student,
            "teacher": args.teacher, "teacher_weights": "random init (speed only)", "steps": args.steps,
            "batch_size": args.batch_size, "threads": torch.get_num_threads(),
            "device": "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu",
            "labeling_seconds": round(label_s, 2), "labeling_images_per_s": labeled["images_per_s"],
            "epoch_seconds": {k: round(v, 3) for k, v in seconds.items()},
            "epoch_seconds_all": {k: [round(v, 3) for v in times] for k, times in runs.items()},
            "samples_per_s": {k: round(args.steps * args.batch_size / v, 1) for k, v in seconds.items()},
            "cached_over_supervised": round(seconds["cached"] / seconds["supervised"], 3),
            "online_over_cached": round(seconds["online"] / seconds["cached"], 3),
            "target_cached_over_supervised": 1.05,
        }))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
