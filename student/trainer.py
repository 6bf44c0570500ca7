"""Train a student from a label store.

``train(TrainConfig(...))`` checks everything first (the store against the data set, its recipe and class
count; the loss against what the store holds and what the student has), then trains, writing to the run
directory::

    RUN_DIR/config.json     the resolved config
    RUN_DIR/last.pt         checkpoint after every epoch (atomic); ``resume=True`` continues from it
    RUN_DIR/metrics.jsonl   one line per epoch: each named loss (the epoch's mean and per step), test
                            top-1/top-5, samples/s, seconds
    RUN_DIR/metrics.json    the final metrics (also returned)
    RUN_DIR/curves.png      the losses step by step and the accuracy after each epoch

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

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from pipelines._readers import DATASET_HELP
from pipelines.atomic import write_atomically, write_json
from pipelines.datasets import Dataset, load_dataset
from pipelines.errors import UsageError
from pipelines.options import check_options, option
from pipelines.progress import progress_bar
from pipelines.store import LabelStore
from pipelines.teachers import as_feature_map, forward_capturing
from pipelines.views import Recipe, output_size
from student import losses as L
from student.data import Batch, StoreStream, check_store
from student.evaluate import evaluate, load_init_weights, read_checkpoint, save_checkpoint
from student.methods import Heads, method_class, method_names
from student.models import (
    build_student,
    has_distillation_head,
    normalize,
    set_distilled_training,
    student_heads,
    unwrap,
)
from student.online import ONLINE_TARGETS

LOSSES = method_names()  # ce, kd, deit-soft, deit-hard, mealv2, sampled, tat
TAT_VARIANTS = L.TAT_VARIANTS  # full, patch, anchor, patch-anchor
CHECKPOINT = "last.pt"


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything ``stillroom train`` and ``POST /v1/train-jobs`` take (``pipelines.options``); saved, resolved,
    as ``RUN_DIR/config.json``.

    ``temperature=None`` means the loss's default (4 for ``kd``, 1 otherwise). ``seeds=None``
    uses every complete seed of the store. ``max_steps`` stops each epoch early (tests, benchmarks);
    ``eval_limit`` scores a fixed class-balanced subset of the eval split.
    """

    store: str = option(help="the label store: its directory (<root>/<cache_key>) or its cache key under "
                             "--store-root")
    dataset: str = option(help="default: the data set the store was labeled from (its manifest); " + DATASET_HELP,
                          cli={"default": None})
    split: str = option("train", help="default: the split the store was labeled from", choices=("train", "val", "test"),
                        cli={"default": None})
    data_root: str | None = option(None, help="where the data set's files are (default: the one the store was "
                                              "labeled with)")
    student: str = option(help="a timm model name, e.g. resnet18, deit_tiny_distilled_patch16_224")
    student_kwargs: dict[str, Any] = option(default_factory=dict, help='JSON architecture kwargs, e.g. '
                                            '\'{"patch_size": 4}\'', cli={"default": "{}"})
    loss: str = option("kd", help="the distillation loss", choices=method_names, cli={"required": True})
    out: str = option(help="the run directory")
    epochs: int = option(1, help="passes over the store's seeds (epoch e reads seed seeds[e % len(seeds)])",
                         ge=1, le=1000)
    batch_size: int = option(128, help="training batch size (per worker)", ge=1, le=65536)
    lr: float = option(1e-3, help="AdamW learning rate", gt=0, le=10)
    weight_decay: float = option(0.05, help="AdamW weight decay", ge=0, le=10)
    alpha: float = option(0.5, help="weight of the teacher term, the ground truth's being 1 - alpha (kd, deit-soft, "
                                    "tat). torchdistill's KDLoss alpha weights the ground truth instead. deit-hard "
                                    "takes no --alpha: DeiT's hard distillation is fixed at 0.5/0.5", ge=0, le=1)
    temperature: float | None = option(None, help="default: 4 for kd, 1 otherwise (tat: KD at 1)", gt=0, le=100)
    seeds: tuple[int, ...] | None = option(None, help="store seeds to cycle through, e.g. 0-3 (default: all)")
    view_order: str = option("cycle", help="which stored view an epoch replays: cycle (epoch e: seed seeds[e % S]; a "
                                           "run of E epochs sees min(E, S) distinct views of each sample) or random "
                                           "(ml-dr: each epoch, each sample's view from one of the S seeds at random, "
                                           "drawn from --seed, the epoch and the id; about S(1 - (1 - 1/S)^E) "
                                           "distinct views of each sample; the run prints the figure)",
                             choices=("cycle", "random"))
    views_per_image: int = option(1, help="K views of each image in a batch (FKD's multi-crop): a batch of B views "
                                          "holds B/K images, view j of each from seed seeds[(e*K + j) % S] in epoch e, "
                                          "each image decoded once for its K crops; a run sees min(E*K, S) distinct "
                                          "views of each sample. K must divide --batch-size", ge=1, le=64)
    workers: int = option(1, help="> 1: data-parallel through Ray Train", ge=1, le=1024)
    init: str | None = option(None, help="pretrained student weights to start from")
    resume: bool = option(False, help="continue the run in --out from its last checkpoint")
    online: bool = option(False, help="run the store's teacher(s) in the loop on the same views (baseline): "
                                      "'full' (default) trains on their full float32 distribution; 'encoded' on the "
                                      "store's encoding of it (float16 top-k and tail), which a cached run matches "
                                      "exactly", cli={"nargs": "?", "const": "full", "default": None,
                                                      "choices": ONLINE_TARGETS, "type": str})
    online_targets: str = option("full", help="online: train on the teachers' full float32 distribution (full) or "
                                              "on the store's encoding of it (encoded)", choices=ONLINE_TARGETS,
                                 flags=("--online",), via="the value of --online")
    eval_split: str = option("test", help="the split scored after each epoch", choices=("train", "val", "test"))
    eval_limit: int | None = option(None, help="score a fixed class-balanced subset of N eval samples (the same in "
                                               "every run: each class in turn, its samples drawn with a fixed seed), "
                                               "not the first N of a split sorted by class", ge=1)
    seed: int = option(0, help="student init and shuffling", ge=0)
    distill_token: bool = option(False, help="require a student with a distillation token (deit-soft/deit-hard)")
    deit_soft_reduction: str = option("numel", help="deit-soft: divide the summed KL by B*C as DeiT's code does "
                                                    "(numel) or by B (batch)", choices=L.DEIT_SOFT_REDUCTIONS)
    mealv2_form: str = option("authors", help="mealv2: the authors' discriminator (1x1 convs C -> C/8 -> C/64 -> 2, "
                                              "its loss in the student's objective, one backward) or a GAN generator "
                                              "term", choices=L.MEALV2_FORMS)
    adv_weight: float = option(1.0, help="mealv2: weight of the discriminator term", ge=0, le=1000)
    disc_lr: float = option(1e-4, help="mealv2: discriminator learning rate", gt=0, le=10)
    tat_variant: str = option("full", help="tat: full, patch, anchor or patch-anchor", choices=TAT_VARIANTS)
    tat_weight: float = option(1.0, help="tat: weight of the feature term", ge=0, le=1000)
    tat_groups: int = option(2, help="tat patch: patches per side of the teacher map", ge=1, le=64)
    tat_patches_per_group: int = option(2, help="tat patch: neighbouring patches sharing one attention (TaT-seg "
                                                "uses 2 or 4)", ge=1, le=4096)
    tat_anchors: int = option(2, help="tat anchor: anchors per side of the teacher map", ge=1, le=64)
    student_layer: str = option("final", help="tat: the student layer to match ('final' or a name)")
    max_steps: int | None = option(None, help="stop each epoch after this many steps", ge=1)
    device: str = option("auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    progress: bool = option(True, help="show a progress bar", flags=("--no-progress",),
                            cli={"action": "store_false"})
    loader_workers: int | None = option(None, help="processes that decode and build each batch (default: 0 for "
                                                   "in-memory data, whose views are one vectorised crop on the "
                                                   "device; for data on disk the cores per rank less one, 1 to 4)",
                                        ge=0, le=64)

    def __post_init__(self) -> None:
        check_options(self)

    @property
    def resolved_temperature(self) -> float:
        # the method's own (kd: 4; every other: 1, TaT pairs its feature loss with KD at T = 1), asked of the
        # registry now: a method registered after this module was imported has its own too
        return self.temperature if self.temperature is not None else method_class(self.loss).default_temperature

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seeds"] = list(self.seeds) if self.seeds is not None else None
        d["temperature"] = self.resolved_temperature
        return d


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
                 feature_shape: tuple[int, int, int] | None = None, student_channels: int | None = None):
        super().__init__()
        self.student, self.config, self.num_classes = student, config, num_classes
        self.method = method_class(config.loss)(config, num_classes, feature_shape, student_channels)

    def student_parameters(self) -> list[nn.Parameter]:
        return list(self.student.parameters()) + self.method.student_side_parameters()

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = normalize(batch.views)
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
        if hook_target is None:  # no known last module: call the parts (bypasses a DDP wrapper's forward)
            fmap = cast(Any, inner).forward_features(x)
            out = cast(Any, inner).forward_head(fmap)
            cls, dist = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
            return fmap, (cls, dist)
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
    eval_dataset: Dataset
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
    eval_dataset = load_dataset(config.dataset, config.eval_split, config.data_root)
    if eval_dataset.num_classes != dataset.num_classes:
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


def _device(name: str) -> torch.device:
    """``auto`` (CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N``; UsageError for a device not here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: torch finds no CUDA device here; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return device


def _check_resume(out: Path, config: TrainConfig) -> dict[str, Any] | None:
    ckpt_path = out / CHECKPOINT
    if not config.resume:
        if ckpt_path.exists():
            raise UsageError(f"{out} already holds a run ({CHECKPOINT}): pass --resume or another --out")
        return None
    if not ckpt_path.exists():
        raise UsageError(f"--resume: {out} holds no {CHECKPOINT} to continue from")
    ckpt = read_checkpoint(ckpt_path)
    saved = ckpt.get("config", {})
    ignore = {"epochs", "resume", "progress", "workers", "device", "max_steps", "loader_workers"}
    diff = sorted(k for k, v in config.to_dict().items() if k not in ignore and saved.get(k) != v)
    if diff:
        raise UsageError(f"--resume with a different config than the saved run: {', '.join(diff)}")
    return ckpt


@dataclass
class Run:
    """One worker's training run: what ``start_run`` built and the epochs done so far."""

    config: TrainConfig
    setup: Setup
    dist: Distributed
    device: torch.device
    out: Path
    stream: StoreStream
    online: Any  # student.online.OnlineTeacher or None
    student: nn.Module
    step: DistillationStep
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    method_optimizer: torch.optim.Optimizer | None
    steps_per_epoch: int
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    repeat_note: str | None = None

    @property
    def lead(self) -> bool:
        return self.dist.rank == 0


def start_run(config: TrainConfig, dist: Distributed, setup: Setup) -> Run:
    """Open the stream (and the online teachers), build the student, its method and optimizers, load the
    checkpoint to resume from; rank 0 writes ``config.json`` and the ``metrics.jsonl`` of the epochs done."""
    device = dist.device or _device(config.device)
    out = Path(config.out)
    resume_ckpt = _check_resume(out, config)
    stream = StoreStream(setup.store, setup.dataset, setup.recipe, config.batch_size, config.seeds,
                         dist.rank, dist.world_size, shuffle_seed=config.seed,
                         drop_last=dist.world_size > 1, loader_workers=config.loader_workers, device=device,
                         features=config.loss == "tat",  # feature maps only where the loss reads them
                         view_order=config.view_order, views_per_image=config.views_per_image)
    repeat_note = stream.warn_if_repeating(config.epochs)
    if repeat_note and dist.rank == 0:
        print(f"stillroom: note: {repeat_note}", file=sys.stderr)
    online = None
    if config.online:
        from student.online import OnlineTeacher

        online = OnlineTeacher(setup.store, setup.recipe, device, targets=config.online_targets)

    student = make_student(setup)
    schema = setup.store.schema
    channels = (student_feature_channels(student, (setup.in_chans, setup.img_size, setup.img_size),
                                         config.student_layer) if method_class(config.loss).student_features
                else None)
    step = DistillationStep(student, config, setup.dataset.num_classes, schema.feature_shape, channels).to(device)
    opt = torch.optim.AdamW(step.student_parameters(), lr=config.lr, weight_decay=config.weight_decay)
    method_opt = step.method.make_optimizer()
    steps_per_epoch = min(len(stream), config.max_steps or len(stream))
    total_steps = max(1, steps_per_epoch * config.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total_steps)
                                                                                    / total_steps)))
    run = Run(config, setup, dist, device, out, stream, online, student, step, opt, sched, method_opt,
              steps_per_epoch, repeat_note=repeat_note)
    if resume_ckpt is not None:
        unwrap(student).load_state_dict(resume_ckpt["model"])
        step.method.load_checkpoint_state(resume_ckpt, method_opt)
        opt.load_state_dict(resume_ckpt["optimizer"])
        sched.load_state_dict(resume_ckpt["scheduler"])
        run.start_epoch, run.history = int(resume_ckpt["epoch"]) + 1, list(resume_ckpt.get("history", []))
    step.student = dist.wrap(student)
    if run.lead:
        out.mkdir(parents=True, exist_ok=True)
        resolved = {**config.to_dict(), "store_cache_key": setup.store.cache_key, "recipe": setup.recipe.name,
                    "seeds_used": list(stream.seeds), "img_size": setup.img_size, "in_chans": setup.in_chans,
                    "num_classes": setup.dataset.num_classes, "device": str(device)}
        write_json(out / "config.json", resolved)
        # the epochs the checkpoint holds (none for a new run): a line written after the last checkpoint goes
        (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in run.history))
    return run


def train_step(step: DistillationStep, batch: Batch, optimizer: torch.optim.Optimizer,
               method_optimizer: torch.optim.Optimizer | None, dist: Distributed | None = None) -> dict[str, float]:
    """One optimisation step on ``batch``: the step's losses, the method's backward, the optimizers' steps.
    Returns the named losses' values."""
    losses = step(batch)
    optimizer.zero_grad(set_to_none=True)
    if method_optimizer is not None:
        method_optimizer.zero_grad(set_to_none=True)
    step.method.backward(losses, [p for p in step.student_parameters() if p.requires_grad])
    if dist is not None and dist.world_size > 1:
        for p in step.method.parameters():  # DDP averages the student's gradients; the method's are averaged here
            if p.grad is not None:
                dist.all_reduce_mean(p.grad)
    optimizer.step()
    if method_optimizer is not None:
        method_optimizer.step()
    return {k: float(v.detach()) for k, v in losses.items()}


def train_one_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """Train epoch ``epoch`` (at most ``steps_per_epoch`` steps) and return its record: each named loss (the
    epoch's mean, the first step's, per step), steps, samples, samples/s, seconds."""
    config, step, dist = run.config, run.step, run.dist
    step.train()
    sums: dict[str, float] = {}
    first: dict[str, float] = {}
    samples, n_steps, t0 = 0, 0, time.perf_counter()
    per_step = StepLosses(run.steps_per_epoch)
    bar = progress_bar(run.steps_per_epoch, f"epoch {epoch} of {config.epochs} {config.loss}",
                       config.progress and run.lead, unit="batch")
    for batch in run.stream.epoch(epoch):
        if n_steps >= run.steps_per_epoch:
            break
        if run.online is not None:
            batch.teacher = run.online.labels(batch)
        values = train_step(step, batch, run.optimizer, run.method_optimizer, dist)
        run.scheduler.step()
        if n_steps == 0:
            first = values
        n_steps += 1
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        per_step.add(n_steps - 1, values)
        samples += len(batch.ids)
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
    bar.close()
    seconds = time.perf_counter() - t0
    return {"epoch": epoch, "seed": run.stream.seed_for_epoch(epoch),
            "losses": {k: round(v / max(n_steps, 1), 6) for k, v in sums.items()},
            "first_step": first, "steps": n_steps, "step_losses": per_step.to_dict(),
            "samples": samples * dist.world_size,
            "samples_per_s": round(samples * dist.world_size / max(seconds, 1e-9), 1),
            "seconds": round(seconds, 3)}


def save_run(run: Run, record: dict[str, Any]) -> None:
    """Rank 0 after an epoch: append its record to ``metrics.jsonl``, write ``last.pt`` and ``curves.png``."""
    config, setup = run.config, run.setup
    run.history.append(record)
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    save_checkpoint(run.out / CHECKPOINT, {
        "student": config.student, "student_kwargs": dict(config.student_kwargs),
        "num_classes": setup.dataset.num_classes, "in_chans": setup.in_chans, "img_size": setup.img_size,
        "model": unwrap(run.student).state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), **run.step.method.checkpoint_state(run.method_optimizer),
        "epoch": record["epoch"], "history": run.history, "config": config.to_dict(),
        "store_cache_key": setup.store.cache_key,
    })
    plot_curves(run.history, run.out / "curves.png")


def fit(config: TrainConfig, dist: Distributed | None = None, setup: Setup | None = None) -> dict[str, Any]:
    """The training loop of one worker (all of it when ``dist`` is None). Rank 0 evaluates after each epoch
    and writes the run directory. ``setup`` is ``prepare(config)`` when the caller has it already."""
    run = start_run(config, dist or Distributed(), setup or prepare(config))
    t_run = time.perf_counter()
    for epoch in range(run.start_epoch, config.epochs):
        record = train_one_epoch(run, epoch)
        if run.lead:
            record.update(evaluate(run.student, run.setup.eval_dataset, run.setup.img_size,
                                   limit=config.eval_limit, device=run.device))
            save_run(run, record)
    if not run.lead:
        return {}
    return finish_run(run, time.perf_counter() - t_run)


def finish_run(run: Run, seconds: float) -> dict[str, Any]:
    """The run's final metrics, written to ``metrics.json``."""
    config, history = run.config, run.history
    final = history[-1] if history else {}
    result = {"run_dir": str(run.out), "checkpoint": str(run.out / CHECKPOINT), "loss": config.loss,
              "student": config.student, "epochs": config.epochs, "online": config.online,
              "online_targets": config.online_targets if config.online else None,
              "workers": run.dist.world_size, "top1": final.get("top1"), "top5": final.get("top5"),
              "losses": final.get("losses", {}), "samples_per_s": final.get("samples_per_s"),
              "epoch_seconds": [h["seconds"] for h in history], "seconds": round(seconds, 3),
              "store_cache_key": run.setup.store.cache_key}
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


def train(config: TrainConfig) -> dict[str, Any]:
    """Train a student from a label store and return its final metrics.

    One worker runs in this process; ``config.workers > 1`` runs through Ray Train (``student.train_ray``),
    each worker a distinct shard of every epoch. Bad input (a store made for other data, a loss the store
    cannot feed, a student without the head the loss asks for) raises UsageError/StoreError before training.
    """
    _device(config.device)  # a device that is not here: one error line, before any data is read
    setup = prepare(config)
    if config.workers > 1:
        from student.train_ray import train_distributed

        make_student(setup)  # refuses a bad student or --init before any worker starts
        _check_resume(Path(config.out), config)
        return train_distributed(config)
    return fit(config, setup=setup)


__all__ = ["LOSSES", "TrainConfig", "DistillationStep", "train", "fit", "prepare", "start_run", "train_step",
           "train_one_epoch", "save_run"]
