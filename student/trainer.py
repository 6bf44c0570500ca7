"""The student's training loop: ``fit`` (one worker's run), ``train_one_epoch``, ``train_step``.

The loop calls the methods (``student.methods``) and the recipe (``pipelines.train_recipe.TrainingRecipe``:
optimizer, schedule, EMA, precision, clipping, accumulation); its config is ``student.config.TrainConfig``; its
entry point, which checks everything first and runs it in this process or on Ray Train, is
``student.run.train``; nothing imports this module back but that entry point and ``student.train_ray``.
It writes to the run directory::

    RUN_DIR/config.json     the resolved config (and what the run resolved: lr, precision, seeds, ...)
    RUN_DIR/last.pt         checkpoint after every epoch (atomic): weights, EMA weights, optimizer, scaler,
                            update count, RNG; ``resume=True`` continues from it bit-identically on CPU
    RUN_DIR/best.pt         the best evaluated epoch's weights by ``--best-metric`` (``--best-weights``: the
                            model's or the EMA's), in the same format (``stillroom eval`` reads it)
    RUN_DIR/metrics.jsonl   one line per epoch: each named loss (the epoch's mean and per step), the
                            learning rate, eval top-1/top-5 (and the EMA's) when evaluated, samples/s, seconds
    RUN_DIR/metrics.json    the final metrics (also returned): ``last`` and ``best`` (epoch, top-1/top-5)
    RUN_DIR/curves.png      the losses step by step and the accuracy after each epoch

``--out`` may be a URL (``s3://bucket/runs/r1``): the run then writes into a local staging directory and
uploads what changed at each epoch end, checkpoints last (``pipelines.run_directory.RunDirectory``); ``--resume``
reads ``last.pt`` from the URL and downloads the rest of the run's files it continues.

Epochs are counted from 0 everywhere: ``"epoch"`` in metrics.jsonl and the checkpoint, the progress bar and
curves.png; epoch ``e`` uses store seed ``seeds[e % len(seeds)]``; ``epochs=N`` runs epochs 0 to N - 1.

Methods (``LOSSES``: registered in ``student.methods``, one unit each; formulas in ``student.losses``):

- ``ce``: cross-entropy with the ground truth (mixed views: ``lam * y + (1 - lam) * y_partner``); no teacher.
- ``kd``: Hinton KD, soft targets at temperature T rebuilt from the stored top-k and tail, plus the ground
  truth (``alpha`` weights the teacher term; torchdistill's ``alpha`` weights the ground truth).
- ``deit-soft``: DeiT soft distillation, the KL divided by ``B C`` as the authors' code does
  (``deit_soft_reduction="batch"``: by ``B``). A two-head student (distilled DeiT) puts the ground-truth term
  on its class head and the teacher term on its distillation head; a one-head student puts both on its head.
- ``deit-hard``: DeiT hard distillation with the teacher's argmax, fixed halves 0.5/0.5 (``alpha`` must stay
  0.5); the same head split as ``deit-soft``.
- ``mealv2``: soft cross-entropy with the (ensemble) soft labels, no ground truth, plus the authors'
  discriminator loss in one joint backward (``mealv2_form="gan"``: a GAN generator term and a discriminator
  trained on its own loss); ``init`` loads pretrained weights.
- ``sampled``: the unbiased estimate of the soft cross-entropy from the stored sampled classes.
- ``tat``: TaT feature distillation on the stored teacher feature map plus the ``kd`` term at T = 1.

``online=True`` runs the store's teacher(s) in the loop on the same views: ``online_targets="full"`` trains
on their full float32 distribution (online KD as its users run it), ``"encoded"`` on the store's own
encoding of it (top-k in float16 and the tail), which a cached run matches exactly.

``distill_token=True`` asks for a student with a distillation token and refuses one without; without it a
one-head student may still use the DeiT losses (its one head serves both terms).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from stillroom.pipelines.core import (
    NO_METRICS,
    Location,
    Metrics,
    RunDirectory,
    UsageError,
    default_of,
    progress_bar,
    write_atomically,
    write_json,
)
from stillroom.pipelines.data import Dataset, load_dataset, open_eval_split
from stillroom.pipelines.store import LabelStore
from stillroom.pipelines.teachers import as_feature_map, forward_capturing
from stillroom.pipelines.training import (
    TrainingRecipe,
    input_format,
    precision_name,
    prepare_model,
    resolve_device,
    to_memory_format,
)
from stillroom.pipelines.views import Recipe, output_size
from stillroom.student._loader import set_training_threads
from stillroom.student.config import LOSSES, TAT_VARIANTS, TrainConfig
from stillroom.student.data import Batch, StoreStream, check_store, replay_note
from stillroom.student.evaluate import evaluate, load_init_weights, read_checkpoint, save_checkpoint
from stillroom.student.methods import Heads, method_class
from stillroom.student.models import (
    build_student,
    forward_capturing_head,
    has_distillation_head,
    resolve_input_config,
    set_distilled_training,
    student_heads,
    unwrap,
)
from stillroom.student.plan import RunPlan
from stillroom.student.tracking import Tracker

CHECKPOINT = "last.pt"
BEST = "best.pt"
RAY_TRAIN_DIR = "ray_train"  # Ray Train's own storage in the run directory (student.train_ray)


# -- the training step --------------------------------------------------------------------------------


class DistillationStep(nn.Module):
    """One training step's forward: a student and its method (``student.methods``), whose own modules
    (discriminator, TaT) it holds.

    ``forward(batch)`` returns the method's named loss tensors and ``"loss"``, the student's objective: the sum
    of the named terms (for ``mealv2`` it includes the discriminator's loss, whose backward also trains the
    discriminator). A method's own objectives (``mealv2_form="gan"``: ``"gan_disc"``, the discriminator's
    objective, minimised by its own optimizer) come after ``"loss"`` and are not in it.
    """

    def __init__(self, student: nn.Module, config: TrainConfig, num_classes: int,
                 feature_shape: tuple[int, int, int] | None = None, student_channels: int | None = None,
                 in_chans: int | None = None):
        super().__init__()
        self.student, self.config, self.num_classes = student, config, num_classes
        self.method = method_class(config.loss)(config, num_classes, feature_shape, student_channels)
        # the student's own mean/std (timm data config); without in_chans, resolved on the first batch
        self.input_config = resolve_input_config(student, in_chans) if in_chans else None

    def student_parameters(self) -> list[nn.Parameter]:
        return list(self.student.parameters()) + self.method.student_side_parameters()

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.input_config is None:
            self.input_config = resolve_input_config(self.student, batch.views.shape[1])
        x = input_format(self.input_config.normalize(batch.views), self.config)
        if self.method.student_features:
            fmap, (cls, dist) = forward_with_features(self.student, x, self.config.student_layer)
            heads = Heads(cls, dist, as_feature_map(fmap))  # tat_loss pools it onto the stored teacher grid
        else:
            heads = Heads(*student_heads(self.student, x))
        terms = self.method(heads, batch)
        own = {k: terms.pop(k) for k in self.method.own_objectives if k in terms}
        terms["loss"] = torch.stack(list(terms.values())).sum()
        return {**terms, **own}


def forward_with_features(model: nn.Module, x: torch.Tensor, layer: str
                          ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]:
    """``(feature map, (cls, dist))``: ``layer`` is ``final`` (timm ``forward_features``) or a module name,
    read with a forward hook."""
    inner = unwrap(model)
    if layer == "final":
        hook_target = _final_feature_module(inner)
        if hook_target is None:  # no known last module: the input of forward_head, through the model's forward
            return forward_capturing_head(model, x)
    else:
        hook_target = dict(inner.named_modules()).get(layer)
        if hook_target is None:
            raise UsageError(f"student has no layer {layer!r}: use 'final' or a module name")
    heads, fmap = forward_capturing(hook_target, lambda: student_heads(model, x))
    return fmap, heads


def _final_feature_module(model: nn.Module) -> nn.Module | None:
    """The module whose output is ``forward_features``'s (the last norm of a ViT, the last stage of a CNN)."""
    for name in ("norm", "final_conv", "conv_head", "layer4", "stages", "blocks"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module) and not isinstance(module, nn.Identity):
            return module
    return None


def student_feature_channels(student: nn.Module, img_shape: tuple[int, int, int], layer: str) -> int:
    """The channel count of the student's feature map at ``layer`` (one probe forward in eval mode)."""
    inner = unwrap(student)
    was = inner.training
    inner.eval()
    with torch.no_grad():
        fmap, _ = forward_with_features(inner, torch.zeros(1, *img_shape), layer)
    inner.train(was)
    return int(as_feature_map(fmap).shape[1])


# -- setup: everything checked before training --------------------------------------------------------


@dataclass
class Setup:
    """What ``prepare`` checked and opened."""

    config: TrainConfig
    store: LabelStore
    dataset: Dataset
    eval_dataset: Dataset | None  # None: the data set has no such split, nothing is evaluated
    recipe: Recipe
    img_size: int
    in_chans: int


def prepare(config: TrainConfig) -> Setup:
    """Check the config, the store and the data set; raise UsageError/StoreError before any training."""
    # bounds and choices of every option were checked when the config was made (TrainConfig.__post_init__)
    method = method_class(config.loss)
    if config.distill_token and not method.two_heads:
        raise UsageError(f"--distill-token trains the distillation head with a DeiT loss, not {config.loss!r}")
    store = LabelStore(config.store)
    dataset = load_dataset(config.dataset, config.split, config.data_root)
    recipe = check_store(store, dataset)
    method.check_run(config, store)
    eval_dataset = open_eval_split(config.dataset, config.eval_split, config.data_root)
    if eval_dataset is not None and eval_dataset.num_classes != dataset.num_classes:
        raise UsageError(f"eval split has {eval_dataset.num_classes} classes, train split {dataset.num_classes}")
    # the model's input size: the recipe's output size (required for images of many sizes), else the native size
    img_size = output_size(recipe, dataset) or dataset.image_shape[1]
    return Setup(config, store, dataset, eval_dataset, recipe, img_size, dataset.channels)


def make_student(setup: Setup) -> nn.Module:
    """Build the student (seeded by ``config.seed``), check it fits the loss, load ``--init`` weights."""
    cfg = setup.config
    torch.manual_seed(cfg.seed)
    student = build_student(cfg.student, setup.dataset.num_classes, setup.in_chans, setup.img_size,
                            cfg.student_kwargs)
    if cfg.distill_token and not has_distillation_head(student):
        raise UsageError(f"--distill-token needs a student with a distillation token (e.g. "
                         f"deit_tiny_distilled_patch16_224); {cfg.student} has one head")
    set_distilled_training(student, method_class(cfg.loss).two_heads)
    if cfg.init:
        load_init_weights(student, cfg.init)
    return student


# -- the loop -----------------------------------------------------------------------------------------


@dataclass
class Distributed:
    """How a worker of a multi-worker run talks to the others (``student.train_ray`` fills it in)."""

    rank: int = 0
    world_size: int = 1
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m  # e.g. DDP
    all_reduce_mean: Callable[[torch.Tensor], None] = lambda t: None
    device: torch.device | None = None
    # Ray Train's restart: the checkpoint to continue from (instead of RUN_DIR/last.pt with --resume)
    resume_from: str | None = None
    # after each epoch, on every rank: (the epoch's record, rank 0's checkpoint or None) -> ray.train.report
    end_epoch: Callable[[dict[str, Any], Path | None], None] = lambda record, checkpoint: None
    # what this rank measures as it trains: Ray's metrics on a Ray worker (``student.train_ray``), else nothing
    metrics: Metrics = NO_METRICS


# options a resumed run may change: how it runs, not what it computes
RESUME_MAY_CHANGE = frozenset({"epochs", "resume", "progress", "workers", "device", "max_steps", "loader_workers",
                               "threads", "eval_interval", "torchcompile", "max_failures", "tracker", "log_interval"})


def check_resume(out: str | os.PathLike, config: TrainConfig, resume_from: str | None = None
                 ) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The config to run and the checkpoint to resume from (None for a new run): ``resume_from`` (Ray Train's
    restart) or, with ``--resume``, ``RUN_DIR/last.pt`` (``out`` a path or a URL). A resumed run with no
    ``--seeds`` takes the saved run's seed list (not the store's, which may have grown since); any other option
    that changes what the run computes must equal the saved run's."""
    ckpt_path = Location(resume_from) if resume_from else Location(out) / CHECKPOINT
    if not config.resume and not resume_from:
        if ckpt_path.exists():
            raise UsageError(f"{out} already holds a run ({CHECKPOINT}): pass --resume or another --out")
        return config, None
    if not ckpt_path.exists():
        raise UsageError(f"--resume: {out} holds no {CHECKPOINT} to continue from")
    ckpt = read_checkpoint(ckpt_path.url)
    saved = ckpt.get("config", {})
    if config.seeds is None and saved.get("seeds") is not None:
        config = replace(config, seeds=tuple(int(s) for s in saved["seeds"]))
    # an option added since the run was saved is taken as its default there (the run trained that way)
    defaults = {f.name: default_of(f) for f in fields(config)}
    diff = sorted(k for k, v in config.to_dict().items()
                  if k not in RESUME_MAY_CHANGE and saved.get(k, defaults.get(k)) != v)
    if diff:
        raise UsageError(f"--resume with a different config than the saved run: {', '.join(diff)}")
    return config, ckpt


@dataclass
class Run:
    """One worker's training run: what ``start_run`` built and the epochs done so far."""

    config: TrainConfig
    setup: Setup
    dist: Distributed
    device: torch.device
    out: Path  # where this worker writes: the run directory, or its staging directory for a URL
    directory: RunDirectory
    stream: StoreStream
    online: Any  # student.online.OnlineTeacher or None
    student: nn.Module
    step: DistillationStep
    recipe: TrainingRecipe
    method_optimizer: torch.optim.Optimizer | None
    steps_per_epoch: int
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # epoch, weights, top1, top5 of best.pt
    repeat_note: str | None = None
    tracker: Any = None  # student.tracking.Tracker
    bar: Any = None  # the run's progress bar: every epoch's steps (``fit``)

    @property
    def lead(self) -> bool:
        return self.dist.rank == 0


def start_run(config: TrainConfig, dist: Distributed, setup: Setup, directory: RunDirectory,
              plan: RunPlan | None = None, checkpoint: dict[str, Any] | None = None) -> Run:
    """Open the stream (and the online teachers), build the student, its method and the recipe (optimizer,
    schedule, EMA, precision), load the checkpoint to resume from; rank 0 writes ``config.json`` and the
    ``metrics.jsonl`` of the epochs done (into ``directory``, the run's ``RunDirectory`` for ``config.out``, which
    the caller made and closes: ``fit``; a resumed run on a URL first downloads the files it continues, its
    checkpoints aside). The run's seed list is fixed in
    its config (and so its checkpoint): ``plan``'s (``student.plan``: every rank the same), else the store's now.
    ``checkpoint``: the one ``plan`` resumes from, read already (else read here)."""
    device = dist.device or resolve_device(config.device)
    if checkpoint is not None and dist.resume_from is None:
        resume_ckpt: dict[str, Any] | None = checkpoint
    else:
        config, resume_ckpt = check_resume(config.out, config, dist.resume_from)
    if plan is not None:
        plan.check(setup.store, setup.dataset, setup.recipe)
    if resume_ckpt is not None and dist.rank == 0:
        directory.pull(skip=(CHECKPOINT, BEST, RAY_TRAIN_DIR))
    out = directory.local
    stream = StoreStream(setup.store, setup.dataset, setup.recipe, config.batch_size,
                         plan.seeds if plan is not None else config.seeds,
                         dist.rank, dist.world_size, shuffle_seed=config.seed,
                         drop_last=dist.world_size > 1, loader_workers=config.loader_workers, device=device,
                         features=config.loss == "tat",  # feature maps only where the loss reads them
                         view_order=config.view_order, views_per_image=config.views_per_image)
    config = replace(config, seeds=tuple(stream.seeds))
    set_training_threads(config.threads, stream.loader_workers)  # torch's threads beside the loader workers
    repeat_note = stream.warn_if_repeating(config.epochs)
    if repeat_note and dist.rank == 0:
        print(f"stillroom: note: {repeat_note}", file=sys.stderr)
    decode_note = replay_note(setup.store)
    if decode_note and dist.rank == 0:
        print(f"stillroom: note: {decode_note}", file=sys.stderr)
    online = None
    if config.online:
        from stillroom.student.online import OnlineTeacher

        online = OnlineTeacher(setup.store, setup.recipe, device, targets=config.online_targets)

    student = make_student(setup)
    schema = setup.store.schema
    channels = (student_feature_channels(student, (setup.in_chans, setup.img_size, setup.img_size),
                                         config.student_layer) if method_class(config.loss).student_features
                else None)
    step = DistillationStep(student, config, setup.dataset.num_classes, schema.feature_shape, channels,
                            setup.in_chans).to(device)
    to_memory_format(student, config)
    method_opt = step.method.make_optimizer()
    steps_per_epoch = min(len(stream), config.max_steps or len(stream))
    recipe = TrainingRecipe.build(
        student, config, epochs=config.epochs, updates_per_epoch=math.ceil(steps_per_epoch / config.grad_accum_steps),
        global_batch=config.batch_size * dist.world_size * config.grad_accum_steps, device=device,
        extra_params=step.method.student_side_parameters(), extra_optimizers=[method_opt])
    run = Run(config, setup, dist, device, out, directory, stream, online, student, step, recipe, method_opt,
              steps_per_epoch, repeat_note=repeat_note)
    if resume_ckpt is not None:
        unwrap(student).load_state_dict(resume_ckpt["model"])
        step.method.load_checkpoint_state(resume_ckpt, method_opt)
        recipe.load_state_dict(resume_ckpt["recipe"])
        torch.set_rng_state(resume_ckpt["rng"])
        run.start_epoch, run.history = int(resume_ckpt["epoch"]) + 1, list(resume_ckpt.get("history", []))
        run.best = resume_ckpt.get("best")
    step.student = prepare_model(dist.wrap(student), config)
    if run.lead:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", resolved_config(run))
        # the epochs the checkpoint holds (none for a new run): a line written after the last checkpoint goes
        (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in run.history))
    run.tracker = Tracker.open(config.tracker, out, dist.rank, dist.world_size, config.log_interval,
                               config.to_dict(), start_step=run.start_epoch * steps_per_epoch)
    return run


def resolved_config(run: Run) -> dict[str, Any]:
    """The run's config as it runs: every option, and what the run resolved from them and from its store."""
    setup = run.setup
    return {**run.config.to_dict(), "store_cache_key": setup.store.cache_key, "recipe": setup.recipe.name,
            "seeds_used": list(run.stream.seeds), "img_size": setup.img_size, "in_chans": setup.in_chans,
            "num_classes": setup.dataset.num_classes, "device": str(run.device),
            "lr_resolved": run.recipe.lr, "precision": precision_name(run.recipe.dtype),
            "updates_per_epoch": math.ceil(run.steps_per_epoch / run.config.grad_accum_steps),
            "global_batch": run.config.batch_size * run.dist.world_size * run.config.grad_accum_steps,
            "best_weights": run.config.scored_weights,
            "samples_left_out": sorted(run.stream.left_out)}  # ,bad=skip: views with no label (failed to decode)


def train_step(step: DistillationStep, batch: Batch, recipe: TrainingRecipe, dist: Distributed | None = None,
               update: bool = True) -> dict[str, float]:
    """One micro-batch: the step's losses under the recipe's autocast, the method's backward of the recipe's
    scaled losses and, when ``update``, the recipe's optimizer step. Returns the named losses' values.

    A micro-batch that only accumulates runs under DDP's ``no_sync``: its gradients stay on the rank and the
    update's backward all-reduces their sum once (as timm's ``train.py``), not once per micro-batch."""
    with _sync_gradients(step.student, update):
        with recipe.autocast():  # the forward only: backward runs in the dtypes autocast chose
            losses = step(batch)
        step.method.backward(recipe.scaled(losses), [p for p in step.student_parameters() if p.requires_grad])
    if update:
        if dist is not None and dist.world_size > 1:
            for p in step.method.parameters():  # DDP averages the student's gradients; the method's here
                if p.grad is not None:
                    dist.all_reduce_mean(p.grad)
        recipe.step()
    return {k: float(v.detach()) for k, v in losses.items()}


def _sync_gradients(module: nn.Module, update: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` for a micro-batch that does not update (``module`` may be DDP inside ``torch.compile``)."""
    ddp = getattr(module, "_orig_mod", module)
    if not update and isinstance(ddp, nn.parallel.DistributedDataParallel):
        return ddp.no_sync()
    return contextlib.nullcontext()


def train_one_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """Train epoch ``epoch`` (at most ``steps_per_epoch`` micro-batches, an optimizer step every
    ``grad_accum_steps`` and after the last) and return its record: each named loss (the epoch's mean, the first
    step's, per step), steps, optimizer updates, the learning rate at the end, samples, samples/s, seconds."""
    config, step, dist = run.config, run.step, run.dist
    step.train()
    sums: dict[str, float] = {}
    first: dict[str, float] = {}
    samples, n_steps, t0 = 0, 0, time.perf_counter()
    updates_before = run.recipe.num_updates
    lr = run.recipe.current_lr  # the rate of the epoch's last step
    per_step = StepLosses(run.steps_per_epoch)
    bar = run.bar or progress_bar(run.steps_per_epoch, "", False)
    bar.set_description_str(f"epoch {epoch} of {config.epochs} {config.loss}", refresh=False)
    metrics = dist.metrics
    metrics.set("epoch", epoch)
    t_wait = time.perf_counter()
    for batch in run.stream.epoch(epoch):
        if n_steps >= run.steps_per_epoch:
            break
        metrics.observe("loader_wait_seconds", time.perf_counter() - t_wait)
        if run.online is not None:
            batch.teacher = run.online.labels(batch)
        update = run.recipe.is_update(n_steps, last=n_steps + 1 == run.steps_per_epoch)
        lr = run.recipe.current_lr  # the rate this step uses (the schedule moves on at the update)
        values = train_step(step, batch, run.recipe, dist, update=update)
        run.tracker.after_step(epoch * run.steps_per_epoch + n_steps + 1, values, len(batch.ids), lr,
                               lambda: float(run.recipe.grad_norm) if run.recipe.grad_norm is not None else 0.0,
                               last=n_steps + 1 == run.steps_per_epoch)
        if n_steps == 0:
            first = values
        n_steps += 1
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        per_step.add(n_steps - 1, values)
        samples += len(batch.ids)
        metrics.add("samples", len(batch.ids))
        metrics.set("learning_rate", lr)
        for name, value in values.items():
            metrics.set("loss", value, term=name)
        bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
        bar.update(1)
        t_wait = time.perf_counter()
    if n_steps < run.steps_per_epoch:  # a short epoch: the run's bar counts the epoch whole
        bar.update(run.steps_per_epoch - n_steps)
    seconds = time.perf_counter() - t0
    metrics.set("samples_per_s", samples / max(seconds, 1e-9))
    return {"epoch": epoch, "seed": run.stream.seed_for_epoch(epoch),
            "losses": {k: round(v / max(n_steps, 1), 6) for k, v in sums.items()},
            "first_step": first, "steps": n_steps, "step_losses": per_step.to_dict(),
            "updates": run.recipe.num_updates - updates_before, "lr": lr,
            "samples": samples * dist.world_size,
            "samples_per_s": round(samples * dist.world_size / max(seconds, 1e-9), 1),
            "seconds": round(seconds, 3)}


def evaluate_epoch(run: Run, record: dict[str, Any]) -> None:
    """Every rank after an epoch due for evaluation (``evaluate_run``): the model's top-1/top-5 and, with
    ``--model-ema``, the EMA's (``ema_top1``, ``ema_top5``) into the epoch's record."""
    record.update(evaluate_run(run))
    if run.recipe.ema is not None:
        record.update({f"ema_{k}": v for k, v in evaluate_run(run, run.recipe.ema.module).items()})


def _checkpoint(run: Run, epoch: int, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What every student checkpoint holds: the student's description, ``weights`` and the resolved config."""
    config, setup = run.config, run.setup
    return {"student": config.student, "student_kwargs": dict(config.student_kwargs),
            "num_classes": setup.dataset.num_classes, "in_chans": setup.in_chans, "img_size": setup.img_size,
            "model": weights, "input_config": cast(Any, run.step.input_config).to_dict(), "epoch": epoch,
            "config": config.to_dict(), "resolved_config": resolved_config(run),
            "store_cache_key": setup.store.cache_key}


def save_run(run: Run, record: dict[str, Any]) -> None:
    """Rank 0 after an epoch: append its record to ``metrics.jsonl``; write ``best.pt`` when the epoch was
    evaluated and beats the best so far on ``--best-metric`` (the ``--best-weights`` weights, in ``"model"``),
    then ``last.pt`` (everything a resumed run needs) and ``curves.png``."""
    config = run.config
    run.history.append(record)
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    weights_name = run.config.scored_weights
    prefix = "ema_" if weights_name == "ema" else ""
    score = record.get(prefix + config.best_metric)
    if score is not None and (run.best is None or score > run.best[config.best_metric]):
        run.best = {"epoch": record["epoch"], "weights": weights_name, "metric": config.best_metric,
                    "top1": record[prefix + "top1"], "top5": record[prefix + "top5"]}
        module = run.recipe.ema.module if weights_name == "ema" else unwrap(run.student)
        save_checkpoint(run.out / BEST, {**_checkpoint(run, record["epoch"], module.state_dict()), "best": run.best})
    save_checkpoint(run.out / CHECKPOINT, {
        **_checkpoint(run, record["epoch"], unwrap(run.student).state_dict()),
        "recipe": run.recipe.state_dict(), **run.step.method.checkpoint_state(run.method_optimizer),
        "rng": torch.get_rng_state(), "history": run.history, "best": run.best})
    plot_curves(run.history, run.out / "curves.png")


def fit(config: TrainConfig, dist: Distributed | None = None, setup: Setup | None = None,
        plan: RunPlan | None = None, checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    """The training loop of one worker (all of it when ``dist`` is None). Every ``eval_interval`` epochs and
    after the last, every rank scores its share of the eval split (``evaluate_epoch``); rank 0 writes the run
    directory, and every rank reports the epoch (``dist.end_epoch``). ``setup`` is ``prepare(config)`` when the
    caller has it already; ``plan`` what ``student.run.train`` resolved for every rank (``start_run``)."""
    dist = dist or Distributed()
    directory = RunDirectory(config.out, last=(BEST, CHECKPOINT), writes=dist.rank == 0)  # only the lead writes
    try:
        run = start_run(config, dist, setup or prepare(config), directory, plan, checkpoint)
        config = run.config
        t_run = time.perf_counter()
        # progress over the whole run: every epoch's steps, those of the epochs done before a resume counted done
        run.bar = progress_bar(config.epochs * run.steps_per_epoch, f"{config.loss}", config.progress and run.lead,
                               unit="batch", initial=run.start_epoch * run.steps_per_epoch)
        for epoch in range(run.start_epoch, config.epochs):
            record = train_one_epoch(run, epoch)
            if (epoch + 1) % config.eval_interval == 0 or epoch + 1 == config.epochs:
                evaluate_epoch(run, record)
                if "top1" in record:
                    run.dist.metrics.set("eval_top1", record["top1"])
            record.update(run.tracker.end_epoch(record, (epoch + 1) * run.steps_per_epoch, run.dist.all_reduce_mean))
            if run.lead:
                save_run(run, record)
                directory.sync()  # a run on a URL: the epoch's files, its checkpoints last
            run.dist.end_epoch(record, run.out / CHECKPOINT if run.lead else None)
        run.tracker.close()
        run.bar.close()
        if not run.lead:
            return {}
        result = finish_run(run, time.perf_counter() - t_run)
        directory.sync()
        return result
    finally:
        directory.close()


def evaluate_run(run: Run, model: nn.Module | None = None) -> dict[str, float]:
    """Top-1/top-5 of the student (or ``model``, e.g. its EMA) on the eval split, each rank scoring its share
    through its loader workers (all ranks call it)."""
    if run.setup.eval_dataset is None:
        return {}
    dist = run.dist
    return evaluate(model or run.student, run.setup.eval_dataset, run.setup.img_size, limit=run.config.eval_limit,
                    device=run.device, rank=dist.rank, world_size=dist.world_size,
                    all_reduce_mean=dist.all_reduce_mean,
                    loader_workers=run.stream.loader_workers)


def finish_run(run: Run, seconds: float) -> dict[str, Any]:
    """The run's final metrics, written to ``metrics.json``: the last epoch's (``top1``/``top5``, and
    ``last``: its epoch, top-1/top-5 and the EMA's) and ``best`` (best.pt's epoch, weights and top-1/top-5)."""
    config, history = run.config, run.history
    final = history[-1] if history else {}
    evaluated = [h for h in history if h.get("top1") is not None]
    last_eval = evaluated[-1] if evaluated else {}
    last = {"epoch": last_eval.get("epoch"), "top1": last_eval.get("top1"), "top5": last_eval.get("top5")}
    if "ema_top1" in last_eval:
        last.update(ema_top1=last_eval["ema_top1"], ema_top5=last_eval["ema_top5"])
    where = run.directory
    result = {"run_dir": where.url, "checkpoint": str(where / CHECKPOINT),
              "best_checkpoint": str(where / BEST) if run.best else None, "loss": config.loss,
              "student": config.student, "epochs": config.epochs, "online": config.online,
              "online_targets": config.online_targets if config.online else None,
              "workers": run.dist.world_size, "top1": final.get("top1"), "top5": final.get("top5"),
              "last": last, "best": run.best,
              "losses": final.get("losses", {}), "samples_per_s": final.get("samples_per_s"),
              "epoch_seconds": [h["seconds"] for h in history], "seconds": round(seconds, 3),
              "store_cache_key": run.setup.store.cache_key, "samples_left_out": len(run.stream.left_out)}
    if run.repeat_note:
        result["note"] = run.repeat_note
    write_json(run.out / "metrics.json", result)
    return result


class StepLosses:
    """One epoch's losses step by step, as the means of runs of ``every`` consecutive steps: at most
    ``points`` values per loss (every step when the epoch has no more steps), whatever the epoch's length."""

    def __init__(self, steps: int, points: int = 200):
        self.every = max(1, math.ceil(steps / points))
        self.sums: dict[str, list[float]] = {}
        self.counts: list[int] = []

    def add(self, step: int, values: dict[str, float]) -> None:
        i = step // self.every
        if i == len(self.counts):
            self.counts.append(0)
        self.counts[i] += 1
        for name, v in values.items():
            bins = self.sums.setdefault(name, [])
            bins.extend([0.0] * (i + 1 - len(bins)))
            bins[i] += v

    def to_dict(self) -> dict[str, Any]:
        return {"steps_per_point": self.every,
                "losses": {name: [round(s / c, 6) for s, c in zip(bins, self.counts, strict=False)]
                           for name, bins in self.sums.items()}}


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """``curves.png``: each named loss step by step (epoch ``e``'s steps spread over ``[e, e + 1)``) and the eval
    top-1/top-5 after each epoch, epochs counted from 0 as in metrics.jsonl (matplotlib, Agg backend).

    ``loss`` (the sum of the terms) is left out when it is one of the terms, e.g. ``kd`` alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    curves: dict[str, tuple[list[float], list[float]]] = {}
    for h in history:
        steps, points = h.get("steps"), h.get("step_losses")
        for name, mean in h["losses"].items():
            xs, ys = curves.setdefault(name, ([], []))
            if steps and points and name in points["losses"]:  # the bins' centres within the epoch
                values = points["losses"][name]
                every = points["steps_per_point"]
                xs += [h["epoch"] + min((j + 0.5) * every, steps) / steps for j in range(len(values))]
                ys += values
            else:  # a record from before per-step losses: the epoch's mean at its middle
                xs.append(h["epoch"] + 0.5)
                ys.append(mean)
    same_as_loss = [name for name in curves if name != "loss" and curves[name][1] == curves.get("loss", ([], []))[1]]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, (xs, ys) in curves.items():
        if name == "loss" and same_as_loss:
            continue
        label = f"{name} (= loss)" if name in same_as_loss else name
        ax_loss.plot(xs, ys, marker="." if len(xs) < 30 else None, linewidth=1, label=label)
    last = history[-1]["epoch"] if history else 0
    first = history[0]["epoch"] if history else 0
    ax_loss.set(xlabel="epoch (from 0; its steps left to right)", ylabel="loss", title="training losses per step",
                xlim=(first, last + 1))
    ax_loss.legend(fontsize=8)
    epochs = [h["epoch"] for h in history]
    for key, label in (("top1", "top-1"), ("top5", "top-5")):
        values = [h.get(key) for h in history]
        ax_acc.plot(epochs, values, marker="o", label=label)
        if values and values[-1] is not None:
            ax_acc.annotate(f"{values[-1]:.3f}", (epochs[-1], values[-1]), textcoords="offset points",
                            xytext=(6, -4 if key == "top1" else 4), fontsize=8)
    ax_acc.set(xlabel="epoch (from 0)", ylabel="accuracy", title="eval accuracy after each epoch", ylim=(0, 1.02),
               xlim=(first - 0.5, last + 0.5))
    ax_acc.legend(fontsize=8, loc="lower right")
    for ax, ticks in ((ax_loss, range(first, last + 2)), (ax_acc, epochs)):
        if len(ticks) <= 12:
            ax.set_xticks(list(ticks))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=80))
    plt.close(fig)


__all__ = ["BEST", "CHECKPOINT", "LOSSES", "TAT_VARIANTS", "TrainConfig", "DistillationStep", "Distributed", "fit",
           "prepare", "make_student", "check_resume", "start_run", "train_step", "train_one_epoch", "evaluate_epoch",
           "evaluate_run", "save_run", "finish_run"]
