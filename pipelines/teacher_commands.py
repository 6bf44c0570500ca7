"""CLI commands ``stillroom teacher train`` and ``stillroom label``."""

from __future__ import annotations

import argparse
import json

from pipelines._readers import DATASET_HELP
from pipelines.errors import UsageError


def _json_arg(text: str, flag: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag}: not JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag}: expected a JSON object")
    return value


def cmd_teacher_train(args: argparse.Namespace) -> int:
    from pipelines.teacher_train import TeacherTrainConfig, train_teacher

    config = TeacherTrainConfig(
        dataset=args.dataset, model=args.model, out=args.out, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, recipe=args.recipe, resolution=args.resolution, data_root=args.data_root,
        model_kwargs=_json_arg(args.model_kwargs, "--model-kwargs"), train_samples=args.train_samples,
        label_smoothing=args.label_smoothing, bn_samples=args.bn_samples,
    )
    print(json.dumps(train_teacher(config)))
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from pipelines.labeling import LabelConfig, parse_seeds, run_labeling

    if args.gpus_per_worker > 0 and args.no_ray:
        raise UsageError("--gpus-per-worker asks Ray for GPUs; --no-ray labels in this process on the CPU")
    if args.gpus_per_worker > 0 and args.ray_address is None:
        import torch

        if not torch.cuda.is_available():  # the local Ray would have no GPU to give
            raise UsageError(f"--gpus-per-worker {args.gpus_per_worker}: torch finds no CUDA device here; "
                             "drop the flag to label on CPUs")
    config = LabelConfig(
        dataset=args.dataset, split=args.split, data_root=args.data_root, teachers=tuple(args.teacher),
        recipe=args.recipe, seeds=parse_seeds(args.seeds), top_k=args.top_k, sampled=args.sampled,
        features=args.features, feature_grid=args.feature_grid, per_teacher=args.per_teacher,
        store_root=args.store, batch_size=args.batch_size, ray_address=args.ray_address,
        num_workers=args.num_workers, gpus_per_worker=args.gpus_per_worker, chunk_rows=args.chunk_rows,
    )
    result = run_labeling(config, backend="local" if args.no_ray else "ray")
    print(json.dumps(result))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    teacher = sub.add_parser("teacher", help="train teachers")
    tsub = teacher.add_subparsers(dest="teacher_cmd", required=True)
    p = tsub.add_parser("train", help="train a timm teacher on a dataset; prints test top-1 as JSON")
    p.add_argument("--dataset", default="fashion-mnist", help=DATASET_HELP)
    p.add_argument("--data-root", default=None)
    p.add_argument("--model", default="resnet18", help="a timm model name")
    p.add_argument("--model-kwargs", default="{}", help="JSON of extra timm.create_model arguments")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--recipe", default="fmnist-flip",
                   help="view recipe for training augmentation (default: flips only)")
    p.add_argument("--resolution", type=int, default=None, help="input size (default: the dataset's)")
    p.add_argument("--train-samples", type=int, default=None, help="train on the first N samples only")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="cross-entropy label smoothing (default 0: smoothed teachers distil worse)")
    p.add_argument("--bn-samples", type=int, default=10_000,
                   help="re-estimate BatchNorm statistics on this many training views before the final "
                        "evaluation (0: keep training's running averages)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_teacher_train)

    p = sub.add_parser("label", help="run the teacher(s) once per seed on Ray and write the label store")
    p.add_argument("--dataset", default="fashion-mnist", help=DATASET_HELP)
    p.add_argument("--split", default="train")
    p.add_argument("--data-root", default=None)
    p.add_argument("--teacher", action="append", required=True, help="NAME@CHECKPOINT or NAME; repeat for an ensemble")
    p.add_argument("--recipe", default="fmnist-rrc")
    p.add_argument("--seeds", default="0")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--sampled", type=int, default=0, help="also store m classes drawn from the teacher")
    p.add_argument("--features", default=None, help="store a teacher feature map: 'final' or a module name")
    p.add_argument("--feature-grid", type=int, default=4, help="pool the feature map to GRID x GRID")
    p.add_argument("--per-teacher", action="store_true", help="keep each ensemble member's top-k too")
    p.add_argument("--store-root", "--store", dest="store", default="stores",
                   help="the store root: the store goes to <root>/<cache_key> (--store: the older name)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunk-rows", type=int, default=8192)
    p.add_argument("--ray-address", default=None, help="an existing cluster (default: a local Ray)")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--no-ray", action="store_true", help="label in this process, without Ray")
    p.set_defaults(func=cmd_label)
