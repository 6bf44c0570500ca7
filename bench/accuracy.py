"""Student accuracy: the same student trained with the ground truth alone and with each distillation loss.

A teacher is trained here first (``pipelines.teacher_train``; no pretrained weights reach this machine), it
labels the Fashion-MNIST train split once (``--seeds`` augmentation seeds), and one student per loss trains
from that store for the same steps, batches and views; each is scored on the test split. Prints one JSON line.

    python bench/accuracy.py [--teacher resnet18] [--student test_resnet] [--epochs 2] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from pipelines.labeling import LabelConfig, parse_seeds, run_labeling
from pipelines.teacher_train import TeacherTrainConfig, train_teacher
from student.trainer import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--teacher", default="resnet18")
    ap.add_argument("--teacher-epochs", type=int, default=2)
    ap.add_argument("--teacher-samples", type=int, default=None, help="train the teacher on the first N only")
    ap.add_argument("--student", default="test_resnet")
    ap.add_argument("--losses", default="ce,kd,deit-hard,deit-soft,sampled")
    ap.add_argument("--seeds", default="0-1")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="steps per epoch (default: the whole split)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed after)")
    args = ap.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="stillroom-bench-accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        teacher = train_teacher(TeacherTrainConfig(dataset=args.dataset, model=args.teacher,
                                                   out=str(work / "teacher.pt"), epochs=args.teacher_epochs,
                                                   train_samples=args.teacher_samples),
                                progress=False)
        teacher_s = time.perf_counter() - t
        losses = [x for x in args.losses.split(",") if x]
        labeled = run_labeling(LabelConfig(dataset=args.dataset, teachers=(f"{args.teacher}@{work / 'teacher.pt'}",),
                                           seeds=parse_seeds(args.seeds), top_k=5,
                                           sampled=8 if "sampled" in losses else 0,
                                           store_root=str(work / "stores"), batch_size=512),
                               backend="local", progress=False)
        students = {}
        for loss in losses:
            result = train(TrainConfig(store=labeled["store"], dataset=args.dataset, student=args.student, loss=loss,
                                       out=str(work / f"run-{loss}"), epochs=args.epochs, batch_size=args.batch_size,
                                       lr=args.lr, max_steps=args.steps, progress=False, device=args.device))
            students[loss] = {"top1": result["top1"], "top5": result["top5"],
                              "seconds": round(sum(result["epoch_seconds"]), 2)}
        print(json.dumps({
            "bench": "accuracy", "dataset": args.dataset, "teacher": args.teacher,
            "teacher_top1": teacher["top1"], "teacher_train_samples": teacher["train_samples"],
            "teacher_seconds": round(teacher_s, 1), "labeling_seconds": labeled["seconds"],
            "student": args.student, "epochs": args.epochs, "steps_per_epoch": args.steps,
            "batch_size": args.batch_size, "students": students,
        }))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
