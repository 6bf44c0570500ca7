"""CLI commands of the student package: ``stillroom train`` and ``stillroom eval``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines._readers import DATASET_HELP
from pipelines.errors import UsageError


def _parse_json_object(text: str, flag: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag} {text!r} is not JSON: {e.msg}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag} must be a JSON object, e.g. '{{\"patch_size\": 4}}'")
    return value


def _parse_seeds(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    from pipelines.labeling import parse_seeds

    return parse_seeds(text)


def resolve_store(store: str, store_root: str) -> Path:
    """``--store``: a label store directory, or a cache key under ``--store-root``."""
    from pipelines.store import MANIFEST

    if (Path(store) / MANIFEST).is_file():
        return Path(store)
    if Path(store).name == store and (Path(store_root) / store / MANIFEST).is_file():
        return Path(store_root) / store
    raise UsageError(f"--store {store}: neither a label store directory nor the cache key of a store under "
                     f"--store-root {store_root} (`stillroom store ls {store_root}` lists them)")


def dataset_of_store(store_dir: Path) -> tuple[str, str, str | None]:
    """The data set a store was labeled from, as its manifest records it: (spec, split, data root)."""
    from pipelines.store import LabelStore

    store = LabelStore(store_dir)
    dataset = store.provenance.get("dataset", {})
    if not dataset.get("spec"):
        raise UsageError(f"store {store_dir} does not record the data set it was labeled from: pass --dataset")
    label_config = store.manifest.get("sources", {}).get("label_config", {})
    return str(dataset["spec"]), str(dataset.get("split", "train")), label_config.get("data_root")


def cmd_train(args: argparse.Namespace) -> int:
    """Train a student; the last line of output is the final metrics as JSON."""
    from student.trainer import TrainConfig, train

    store = resolve_store(args.store, args.store_root)
    dataset, split, data_root = args.dataset, args.split or "train", args.data_root
    if dataset is None:  # the store's own data set, split and data root, unless given
        dataset, stored_split, stored_root = dataset_of_store(store)
        split, data_root = args.split or stored_split, args.data_root or stored_root
    config = TrainConfig(
        store=str(store), dataset=dataset, split=split, data_root=data_root, student=args.student,
        student_kwargs=_parse_json_object(args.student_kwargs, "--student-kwargs"), loss=args.loss,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        alpha=0.5 if args.alpha is None else args.alpha, temperature=args.temperature,
        seeds=_parse_seeds(args.seeds), out=args.out,
        workers=args.workers, init=args.init, resume=args.resume, online=args.online is not None,
        online_targets=args.online or "full", eval_split=args.eval_split,
        eval_limit=args.eval_limit, seed=args.seed, distill_token=args.distill_token,
        deit_soft_reduction=args.deit_soft_reduction, mealv2_form=args.mealv2_form, adv_weight=args.adv_weight,
        disc_lr=args.disc_lr, tat_variant=args.tat_variant, tat_weight=args.tat_weight, tat_groups=args.tat_groups,
        tat_patches_per_group=args.tat_patches_per_group,
        tat_anchors=args.tat_anchors, student_layer=args.student_layer, max_steps=args.max_steps,
        device=args.device, progress=not args.no_progress, loader_workers=args.loader_workers,
    )
    print(json.dumps(train(config)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Score a student checkpoint; prints ``{"top1", "top5", ...}`` as JSON."""
    from student.evaluate import evaluate_checkpoint, read_checkpoint

    dataset, data_root = args.dataset, args.data_root
    if dataset is None:  # the data set the student was trained on (train takes it from its store's manifest)
        trained_on = read_checkpoint(args.checkpoint).get("config", {})
        if not trained_on.get("dataset"):
            raise UsageError(f"checkpoint {args.checkpoint} does not record its data set: pass --dataset")
        dataset, data_root = trained_on["dataset"], data_root or trained_on.get("data_root")
    print(json.dumps(evaluate_checkpoint(args.checkpoint, dataset, args.split, data_root, args.batch_size)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a student from a label store",
                       description="Train a student from a label store. The last line printed is the final "
                                   "metrics as JSON.")
    p.add_argument("--store", required=True,
                   help="the label store: its directory (<root>/<cache_key>) or its cache key under --store-root")
    p.add_argument("--store-root", default="stores", help="where a --store cache key is looked up")
    p.add_argument("--dataset", default=None,
                   help="default: the data set the store was labeled from (its manifest); " + DATASET_HELP)
    p.add_argument("--split", default=None, help="default: the split the store was labeled from")
    p.add_argument("--data-root", default=None,
                   help="where the data set's files are (default: the one the store was labeled with)")
    p.add_argument("--student", required=True, help="a timm model name, e.g. resnet18, deit_tiny_distilled_patch16_224")
    p.add_argument("--student-kwargs", default="{}", help='JSON architecture kwargs, e.g. \'{"patch_size": 4}\'')
    p.add_argument("--loss", required=True, help="ce, kd, deit-soft, deit-hard, mealv2, sampled or tat")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--alpha", type=float, default=None,
                   help="weight of the teacher term, the ground truth's being 1 - alpha (kd, deit-soft, tat; "
                        "default 0.5). torchdistill's KDLoss alpha weights the ground truth instead. deit-hard "
                        "takes no --alpha: DeiT's hard distillation is fixed at 0.5/0.5")
    p.add_argument("--temperature", type=float, default=None, help="default: 4 for kd, 1 otherwise (tat: KD at 1)")
    p.add_argument("--seeds", default=None, help="store seeds to cycle through, e.g. 0-3 (default: all)")
    p.add_argument("--out", required=True, help="the run directory")
    p.add_argument("--workers", type=int, default=1, help="> 1: data-parallel through Ray Train")
    p.add_argument("--init", default=None, help="pretrained student weights to start from")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--online", nargs="?", const="full", default=None, choices=("full", "encoded"),
                   help="run the store's teacher(s) in the loop on the same views (baseline): 'full' (default) "
                        "trains on their full float32 distribution; 'encoded' on the store's encoding of it "
                        "(float16 top-k and tail), which a cached run matches exactly")
    p.add_argument("--eval-split", default="test")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N eval samples")
    p.add_argument("--seed", type=int, default=0, help="student init and shuffling")
    p.add_argument("--distill-token", action="store_true",
                   help="require a student with a distillation token (deit-soft/deit-hard)")
    p.add_argument("--deit-soft-reduction", default="numel", choices=("numel", "batch"),
                   help="deit-soft: divide the summed KL by B*C as DeiT's code does (numel) or by B (batch)")
    p.add_argument("--mealv2-form", default="authors", choices=("authors", "gan"),
                   help="mealv2: the authors' discriminator (1x1 convs C -> C/8 -> C/64 -> 2, its loss in the "
                        "student's objective, one backward) or a GAN generator term")
    p.add_argument("--adv-weight", type=float, default=1.0, help="mealv2: weight of the discriminator term")
    p.add_argument("--disc-lr", type=float, default=1e-4, help="mealv2: discriminator learning rate")
    p.add_argument("--tat-variant", default="full", help="tat: full, patch, anchor or patch-anchor")
    p.add_argument("--tat-weight", type=float, default=1.0)
    p.add_argument("--tat-groups", type=int, default=2, help="tat patch: patches per side of the teacher map")
    p.add_argument("--tat-patches-per-group", type=int, default=2,
                   help="tat patch: neighbouring patches sharing one attention (TaT-seg uses 2 or 4)")
    p.add_argument("--tat-anchors", type=int, default=2)
    p.add_argument("--student-layer", default="final", help="tat: the student layer to match ('final' or a name)")
    p.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--loader-workers", type=int, default=None,
                   help="processes that decode and build each batch (default: 0 for in-memory data, whose views "
                        "are one vectorised crop on the device; for data on disk the cores per rank less one, "
                        "1 to 4)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="score a student checkpoint: prints {top1, top5} as JSON")
    p.add_argument("--checkpoint", required=True, help="a student checkpoint: RUN_DIR/last.pt")
    p.add_argument("--dataset", default=None, help="default: the data set the student was trained on; " + DATASET_HELP)
    p.add_argument("--split", default="test")
    p.add_argument("--data-root", default=None)
    p.add_argument("--batch-size", type=int, default=512)
    p.set_defaults(func=cmd_eval)
