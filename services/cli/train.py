"""CLI commands of the student package: ``stillroom train`` and ``stillroom eval``."""

from __future__ import annotations

import argparse
import json

from stillroom.pipelines.core import UsageError, json_object
from stillroom.pipelines.data import DATASET_HELP


def _parse_seeds(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    from stillroom.pipelines.labeling import parse_seeds

    return parse_seeds(text)


def cmd_train(args: argparse.Namespace) -> int:
    """Train a student; the last line of output is the final metrics as JSON."""
    from stillroom.pipelines.core import options
    from stillroom.student.config import TrainConfig
    from stillroom.student.dataset import dataset_of_store, open_store, resolve_store
    from stillroom.student.run import train

    store = resolve_store(args.store, args.store_root)  # a directory, a URL or a cache key under --store-root
    dataset, split, data_root = args.dataset, args.split or "train", args.data_root
    if dataset is None:  # the store's own data set, split and data root, unless given
        dataset, stored_split, stored_root = dataset_of_store(open_store(store))
        split, data_root = args.split or stored_split, args.data_root or stored_root
    fields = {name: getattr(args, name) for name in options(TrainConfig) if hasattr(args, name)}
    config = TrainConfig(**{
        **fields, "store": str(store), "dataset": dataset, "split": split, "data_root": data_root,
        "student_kwargs": json_object(args.student_kwargs, "--student-kwargs", example='{"patch_size": 4}'),
        "seeds": _parse_seeds(args.seeds), "online": args.online is not None, "online_targets": args.online or "full"})
    print(json.dumps(train(config)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Score a student checkpoint; prints ``{"top1", "top5", ...}`` as JSON."""
    from stillroom.student.evaluate import evaluate_checkpoint, read_checkpoint

    dataset, data_root = args.dataset, args.data_root
    if dataset is None:  # the data set the student was trained on (train takes it from its store's manifest)
        trained_on = read_checkpoint(args.checkpoint).get("config", {})
        if not trained_on.get("dataset"):
            raise UsageError(f"checkpoint {args.checkpoint} does not record its data set: pass --dataset")
        dataset, data_root = trained_on["dataset"], data_root or trained_on.get("data_root")
    print(json.dumps(evaluate_checkpoint(args.checkpoint, dataset, args.split, data_root, args.batch_size)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from stillroom.pipelines.core import add_arguments
    from stillroom.student.config import TrainConfig

    p = sub.add_parser("train", help="train a student from a label store",
                       description="Train a student from a label store. The last line printed is the final "
                                   "metrics as JSON.")
    add_arguments(p, TrainConfig, config_file=True)
    p.add_argument("--store-root", default="stores", help="where a --store cache key is looked up")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="score a student checkpoint: prints {top1, top5} as JSON")
    p.add_argument("--checkpoint", required=True, help="a student checkpoint: RUN_DIR/last.pt")
    p.add_argument("--dataset", default=None, help="default: the data set the student was trained on; " + DATASET_HELP)
    p.add_argument("--split", default="test")
    p.add_argument("--data-root", default=None)
    p.add_argument("--batch-size", type=int, default=512)
    p.set_defaults(func=cmd_eval)
