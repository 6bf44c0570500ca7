"""``stillroom teacher train``: train a timm teacher on a dataset, since no pretrained weights reach us here.

Training views come from a view recipe (epoch ``e`` uses seed ``e``), the same vectorised code the
labeling job uses. The training recipe is the students' (``pipelines.train_recipe``: timm's optimizer, warmup
and schedule per step, EMA, autocast, clipping, accumulation), on ``--device`` (CUDA when there is one). The
checkpoint records the model name and kwargs, class count, preprocessing (resolution, the dataset's channel
mean/std, input channels), test accuracy and the resolved config (also written beside it as
``NAME.config.json``), as ``load_teacher`` reads it. ``--out`` may be a URL (``s3://bucket/teachers/t.pt``): the
checkpoint and its records are then written there, each one whole object, and the teacher labels as
``NAME@s3://bucket/teachers/t.pt``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stillroom.pipelines.core import Location, UsageError, check_options, default_from, option, progress_bar
from stillroom.pipelines.data import DATASET_HELP, Dataset, load_dataset, open_eval_split
from stillroom.pipelines.teachers.loading import _create, save_checkpoint
from stillroom.pipelines.teachers.preprocess import Preprocess
from stillroom.pipelines.training import RecipeOptions, TrainingRecipe, top1_top5
from stillroom.pipelines.training import recipe as train_recipe
from stillroom.pipelines.views import Recipe, build_views, eval_views, output_size, recipe_for


@dataclass(frozen=True, kw_only=True)
class TeacherTrainConfig(RecipeOptions):
    """Everything ``stillroom teacher train`` and ``POST /v1/teacher-jobs`` take (``pipelines.options``); the
    recipe's options (``RecipeOptions``) with a teacher's defaults: AdamW at 2e-3 for a batch of 128, warmup
    over the first 0.3 epochs from 8e-5, then cosine to 0 (the one-cycle schedule of earlier versions)."""

    lr_base: float = default_from(RecipeOptions, "lr_base", 2e-3)
    warmup_epochs: float = default_from(RecipeOptions, "warmup_epochs", 0.3)
    warmup_lr: float = default_from(RecipeOptions, "warmup_lr", 8e-5)

    dataset: str = option("fashion-mnist", help=DATASET_HELP)
    data_root: str | None = option(None, help="where the data set's files are (fashion-mnist: its idx files)")
    model: str = option("resnet18", help="a timm model name")
    model_kwargs: dict[str, Any] = option(default_factory=dict, help="JSON of extra timm.create_model arguments",
                                          cli={"default": "{}"})
    out: str = option(help="where the teacher checkpoint goes")
    epochs: int = option(2, help="passes over the training set", ge=1, le=1000)
    batch_size: int = option(128, help="training batch size", ge=1, le=65536)
    # see pipelines.views: crops cost a short-budget teacher 3 points
    recipe: str = option("fmnist-flip", help="view recipe for training augmentation (default: flips only)")
    resolution: int | None = option(None, help="input size (default: the recipe's output size, else the dataset's)",
                                    ge=8, le=2048)
    train_samples: int | None = option(None, help="train on the first N samples only", ge=1)
    # --smoothing is 0 by default (RecipeOptions): a teacher trained with label smoothing distils worse, its logits
    # lose the similarity between classes that soft labels carry (Mueller, Kornblith & Hinton 2019)
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
    device = next(model.parameters()).device
    top1, top5 = top1_top5(lambda ids: model(preprocess(eval_views(ds, ids, size).to(device))), ds.labels, len(ds),
                           batch_size)
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
    torch.optim.swa_utils.update_bn(batches, model, device=next(model.parameters()).device)
    return len(ids)


def train_teacher(config: TeacherTrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train on ``config.device``, evaluate on the test split, write the checkpoint; return the result record.
    With ``--model-ema`` the EMA weights are the teacher saved (both are scored)."""
    t0 = time.perf_counter()
    out = Location(config.out)  # refuses a URL that holds credentials, before any data is read
    if out.local is not None and not out.local.parent.exists():
        raise UsageError(f"output directory {out.local.parent} does not exist")
    device = train_recipe.resolve_device(config.device)
    train = load_dataset(config.dataset, "train", config.data_root)
    test = open_eval_split(config.dataset, "test", config.data_root)  # None: nothing to evaluate on
    recipe = recipe_for(config.recipe, train)  # a folder of one square size: views at that size
    c = train.channels
    # the model's input size: --resolution, else the recipe's output size (required for images of many sizes)
    resolution = config.resolution or output_size(recipe, train) or train.image_shape[1]
    kwargs = {**config.model_kwargs, "num_classes": train.num_classes, "in_chans": c}
    torch.manual_seed(config.seed)
    model = train_recipe.to_memory_format(_create(config.model, pretrained=False, **kwargs).to(device), config)
    mean, std = channel_stats(train, resolution)
    preprocess = Preprocess(resolution, mean, std, c)

    n = min(config.train_samples or len(train), len(train))
    steps_per_epoch = math.ceil(n / config.batch_size)
    training = TrainingRecipe.build(model, config, epochs=config.epochs,
                                    updates_per_epoch=math.ceil(steps_per_epoch / config.grad_accum_steps),
                                    global_batch=config.batch_size * config.grad_accum_steps, device=device)
    runner = train_recipe.prepare_model(model, config)
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
            labels = torch.from_numpy(train.labels[ids]).to(device)
            with training.autocast():
                logits = runner(train_recipe.input_format(preprocess(views.to(device)), config))
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.smoothing)
            training.scaled({"loss": loss})["loss"].backward()
            if training.is_update(step, last=step + 1 == steps_per_epoch):
                training.step()
            value = float(loss.detach())
            total_loss += value * len(ids)
            bar.update(len(ids))
            bar.set_postfix(loss=f"{value:.3f}")
        bar.close()
        history.append({"epoch": epoch, "train_loss": total_loss / n, "lr": training.current_lr})
    final = training.ema.module if training.ema is not None else model
    bn_samples = reestimate_batchnorm(final, preprocess, train, recipe, config.epochs, order[: config.bn_samples],
                                      config.batch_size)
    metrics = evaluate(final, preprocess, test) if test is not None else {}
    if training.ema is not None and test is not None:  # the raw weights too, with training's running statistics
        raw = evaluate(model, preprocess, test)
        metrics.update(model_top1=raw["top1"], model_top5=raw["top5"])
    result = {"out": out.url, "model": config.model, "dataset": config.dataset, **metrics,
              "weights": "ema" if training.ema is not None else "model", "bn_reestimated_on": bn_samples,
              "epochs": config.epochs, "train_samples": n, "device": str(device),
              "precision": train_recipe.precision_name(training.dtype), "lr": training.lr,
              "seconds": round(time.perf_counter() - t0, 1)}
    resolved = {**asdict(config), "lr_resolved": training.lr, "device": str(device),
                "precision": train_recipe.precision_name(training.dtype), "resolution": resolution}
    save_checkpoint(out.url, config.model, final.to("cpu"), kwargs, preprocess,
                    extra={"metrics": metrics, "history": history, "config": asdict(config),
                           "resolved_config": resolved,
                           "dataset": {"spec": train.spec, "fingerprint": train.fingerprint}},
                    class_names=getattr(train, "class_names", None))
    stem = out.name.rpartition(".")[0] or out.name
    out.with_name(stem + ".config.json").write_json(resolved)  # beside the checkpoint, as a run's config.json
    out.with_name(stem + ".json").write_json(result, sort_keys=False)
    return result
