"""CLI commands ``stillroom teacher train`` and ``stillroom label``."""

from __future__ import annotations

import argparse
import json

from stillroom.pipelines.core import UsageError, json_object


def cmd_teacher_train(args: argparse.Namespace) -> int:
    from stillroom.pipelines.core import options
    from stillroom.pipelines.teachers import TeacherTrainConfig, train_teacher

    fields = {name: getattr(args, name) for name in options(TeacherTrainConfig)}
    fields["model_kwargs"] = json_object(args.model_kwargs, "--model-kwargs", example='{"drop_rate": 0.1}')
    print(json.dumps(train_teacher(TeacherTrainConfig(**fields))))
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from stillroom.pipelines.core import options
    from stillroom.pipelines.labeling import LabelConfig, parse_seeds, run_labeling

    if args.store is not None:  # --store names one store everywhere (train, eval); label writes under a root
        raise UsageError(f"--store {args.store}: label writes a new store under a root, given as --store-root "
                         "ROOT (the store goes to ROOT/<cache_key>); --store names an existing store (train, eval)")
    if args.gpus_per_worker > 0 and args.ray_address is None:
        import torch

        if not torch.cuda.is_available():  # the local Ray would have no GPU to give
            raise UsageError(f"--gpus-per-worker {args.gpus_per_worker}: torch finds no CUDA device here; "
                             "drop the flag to label on CPUs")
    fields = {name: getattr(args, name) for name in options(LabelConfig)}
    config = LabelConfig(**{**fields, "teachers": tuple(args.teachers), "seeds": parse_seeds(args.seeds)})
    result = run_labeling(config, backend="local" if args.no_ray else "ray")
    print(json.dumps(result))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from stillroom.pipelines.core import add_arguments
    from stillroom.pipelines.labeling import LabelConfig
    from stillroom.pipelines.teachers import TeacherTrainConfig

    teacher = sub.add_parser("teacher", help="train teachers")
    tsub = teacher.add_subparsers(dest="teacher_cmd", required=True)
    p = tsub.add_parser("train", help="train a timm teacher on a dataset; prints test top-1 as JSON")
    add_arguments(p, TeacherTrainConfig, config_file=True)
    p.set_defaults(func=cmd_teacher_train)

    p = sub.add_parser("label", help="run the teacher(s) once per seed on Ray and write the label store")
    add_arguments(p, LabelConfig)
    p.add_argument("--no-ray", action="store_true",
                   help="label in this process, without Ray (on its GPU with --gpus-per-worker)")
    p.add_argument("--store", default=None, help=argparse.SUPPRESS)  # refused: see cmd_label
    p.set_defaults(func=cmd_label)
