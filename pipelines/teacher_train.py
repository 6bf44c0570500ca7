"""``stillroom teacher train``: train a timm teacher on a dataset, since no pretrained weights reach us here.

Training views come from a view recipe (epoch ``e`` uses seed ``e``), the same vectorised code the
labeling job uses. The checkpoint records the model name and kwargs, class count, preprocessing
(resolution, the dataset's channel mean/std, input channels) and test accuracy, as ``load_teacher`` reads it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines._readers import DATASET_HELP
from pipelines.accuracy import top1_top5
from pipelines.atomic import write_json
from pipelines.datasets import Dataset, load_dataset
from pipelines.errors import UsageError
from pipelines.options import check_options, option
from pipelines.progress import progress_bar
from pipelines.teachers import Preprocess, _create, save_checkpoint
from pipelines.views import Recipe, build_views, eval_views, get_recipe, output_size


@dataclass(frozen=True, kw_only=True)
class TeacherTrainConfig:
    """Everything ``stillroom teacher train`` and ``POST /v1/teacher-jobs`` take (``pipelines.options``)."""

    dataset: str = option("fashion-mnist", help=DATASET_HELP)
    data_root: str | None = option(None, help="where the data set's files are (fashion-mnist: its idx files)")
    model: str = option("resnet18", help="a timm model name")
    model_kwargs: dict[str, Any] = option(default_factory=dict, help="JSON of extra timm.create_model arguments",
                                          cli={"default": "{}"})
    out: str = option(help="where the teacher checkpoint goes")
    epochs: int = option(2, help="passes over the training set", ge=1, le=1000)
    batch_size: int = option(128, help="training batch size", ge=1, le=65536)
    lr: float = option(2e-3, help="AdamW learning rate", gt=0, le=10)
    weight_decay: float = option(0.05, help="AdamW weight decay", ge=0, le=10)
    # see pipelines.views: crops cost a short-budget teacher 3 points
    recipe: str = option("fmnist-flip", help="view recipe for training augmentation (default: flips only)")
    resolution: int | None = option(None, help="input size (default: the recipe's output size, else the dataset's)",
                                    ge=8, le=2048)
    train_samples: int | None = option(None, help="train on the first N samples only", ge=1)
    # 0 by default: a teacher trained with label smoothing distils worse, its logits lose the similarity
    # between classes that soft labels carry (Mueller, Kornblith & Hinton 2019, "When does label smoothing help?")
    label_smoothing: float = option(0.0, help="cross-entropy label smoothing (default 0: smoothed teachers distil "
                                              "worse)", ge=0, lt=1)
    bn_samples: int = option(10_000, help="re-estimate BatchNorm statistics on this many training views before the "
                                          "final evaluation (0: keep training's running averages)", ge=0)
    seed: int = option(0, help="model init and shuffling", ge=0)

    def __post_init__(self) -> None:
        check_options(self)


def channel_stats(ds: Dataset, size: int, limit: int = 10000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std: of the first ``limit`` images in memory; on disk, of the eval views (at ``size``)
    of 500 samples spread over the split, so that nothing near the whole data set is decoded."""
    if ds.in_memory:
        x = eval_views(ds, np.arange(min(limit, len(ds))), None)
    else:
        ids = np.unique(np.linspace(0, len(ds) - 1, min(500, len(ds))).astype(np.int64))
        x = torch.cat([eval_views(ds, ids[i : i + 100], size) for i in range(0, len(ids), 100)])
    mean = x.mean(dim=(0, 2, 3)).tolist()
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    return tuple(round(m, 4) for m in mean), tuple(round(s, 4) for s in std)


@torch.no_grad()
def evaluate(model: torch.nn.Module, preprocess: Preprocess, ds: Dataset, batch_size: int = 512) -> dict[str, float]:
    """Top-1 and top-5 on the un-augmented images of ``ds``."""
    model.eval()
    size = None if ds.in_memory else preprocess.resolution
    top1, top5 = top1_top5(lambda ids: model(preprocess(eval_views(ds, ids, size))), ds.labels, len(ds), batch_size)
    return {"top1": top1, "top5": top5}


def reestimate_batchnorm(model: torch.nn.Module, preprocess: Preprocess, ds: Dataset, recipe: Recipe, seed: int,
                         ids: np.ndarray, batch_size: int) -> int:
    """Recompute every BatchNorm layer's running mean and variance for the final weights; return the samples used.

    Training leaves running statistics that are an exponential average (momentum 0.1, started at mean 0,
    variance 1) over weights that kept changing: after a short run they lag the final weights, and the
    eval-mode accuracy can be far below what the same weights score with batch statistics. One pass over the
    training views of ``ids`` (recipe seed ``seed``) in train mode, without gradients and with
    ``momentum=None``, sets them to the plain average of the per-batch statistics of the final weights
    (``torch.optim.swa_utils.update_bn``); the weights do not change."""
    if len(ids) >= batch_size:  # whole batches: momentum=None weighs every batch alike
        ids = ids[: len(ids) // batch_size * batch_size]
    if len(ids) == 0 or not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return 0
    batches = (preprocess(build_views(ds, recipe, seed, ids[s : s + batch_size])[0])
               for s in range(0, len(ids), batch_size))
    torch.optim.swa_utils.update_bn(batches, model)
    return len(ids)


def train_teacher(config: TeacherTrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train, evaluate on the test split, write the checkpoint; return the result record."""
    t0 = time.perf_counter()
    train = load_dataset(config.dataset, "train", config.data_root)
    test = load_dataset(config.dataset, "test", config.data_root)
    recipe = get_recipe(config.recipe)
    c = train.channels
    # the model's input size: --resolution, else the recipe's output size (required for images of many sizes)
    resolution = config.resolution or output_size(recipe, train) or train.image_shape[1]
    kwargs = {**config.model_kwargs, "num_classes": train.num_classes, "in_chans": c}
    torch.manual_seed(config.seed)
    model = _create(config.model, pretrained=False, **kwargs)
    mean, std = channel_stats(train, resolution)
    preprocess = Preprocess(resolution, mean, std, c)
    out = Path(config.out)
    if not out.parent.exists():
        raise UsageError(f"output directory {out.parent} does not exist")

    n = min(config.train_samples or len(train), len(train))
    steps_per_epoch = math.ceil(n / config.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch,
                                                pct_start=0.15)
    gen = torch.Generator().manual_seed(config.seed)
    history = []
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(n, generator=gen).numpy()
        bar = progress_bar(n, f"teacher epoch {epoch} of {config.epochs}", progress)
        total_loss = 0.0
        for step in range(steps_per_epoch):
            ids = order[step * config.batch_size : (step + 1) * config.batch_size]
            views, _ = build_views(train, recipe, epoch, ids)
            loss = F.cross_entropy(model(preprocess(views)), torch.from_numpy(train.labels[ids]),
                                   label_smoothing=config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            value = float(loss.detach())
            total_loss += value * len(ids)
            bar.update(len(ids))
            bar.set_postfix(loss=f"{value:.3f}")
        bar.close()
        history.append({"epoch": epoch, "train_loss": total_loss / n})
    bn_samples = reestimate_batchnorm(model, preprocess, train, recipe, config.epochs, order[: config.bn_samples],
                                      config.batch_size)
    metrics = evaluate(model, preprocess, test)
    result = {"out": str(out), "model": config.model, "dataset": config.dataset, **metrics,
              "bn_reestimated_on": bn_samples,
              "epochs": config.epochs, "train_samples": n, "seconds": round(time.perf_counter() - t0, 1)}
    save_checkpoint(out, config.model, model, kwargs, preprocess,
                    extra={"metrics": metrics, "history": history, "config": asdict(config),
                           "dataset": {"spec": train.spec, "fingerprint": train.fingerprint}},
                    class_names=getattr(train, "class_names", None))
    write_json(out.with_suffix(".json"), result, sort_keys=False)
    return result
