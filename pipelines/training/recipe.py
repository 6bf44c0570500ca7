"""The training recipe, from timm's own parts: the options of ``timm``'s ``train.py`` under its names, and the
small object a training loop calls (``TrainingRecipe``), shared by ``stillroom train`` (students) and
``stillroom teacher train``.

- optimizer: ``timm.optim.create_optimizer_v2`` (``--opt`` sgd, momentum, nesterov, adamw, lamb, lars, ...),
  weight decay kept off norms, biases and every 1-D parameter and off the model's ``no_weight_decay()``
- learning rate: ``--lr``, or ``--lr-base`` scaled by the global batch (batch x workers x accumulation steps)
  over ``--lr-base-size``, linearly or by its square root (``--lr-base-scale``; ``auto``: sqrt for adaptive
  optimizers (ada*, lamb), linear otherwise), as timm's ``train.py`` resolves it
- schedule: ``timm.scheduler.create_scheduler_v2`` with ``--warmup-epochs`` from ``--warmup-lr``, decaying to
  ``--min-lr``, updated after every optimizer step (timm's ``--sched-on-updates``)
- EMA: ``timm.utils.ModelEmaV3`` (``--model-ema``, ``--model-ema-decay``), updated after every optimizer step
- precision: autocast in ``--amp-dtype`` (``auto``: bfloat16 on CUDA, float32 on CPU), float16 with a
  ``torch.amp.GradScaler``
- clipping: ``timm.utils.dispatch_clip_grad`` (``--clip-grad``, ``--clip-mode`` norm, value or agc), on the
  unscaled gradients
- accumulation: ``--grad-accum-steps`` micro-batches per optimizer step, each loss divided by their count

The loop holds no part of it: it calls ``autocast()``, ``scaled(losses)`` before its backward, and
``step()`` after the last micro-batch of each update.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from stillroom.pipelines.core import UsageError, option

SCHEDULES = ("cosine", "tanh", "step", "poly", "constant")
CLIP_MODES = ("norm", "value", "agc")
AMP_DTYPES = ("auto", "bfloat16", "float16", "float32")
LR_BASE_SCALES = ("auto", "linear", "sqrt")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def optimizer_names() -> list[str]:
    """timm's registered optimizers (``timm.optim.list_optimizers``)."""
    from timm.optim import list_optimizers

    return [str(name) for name in list_optimizers()]


@dataclass(frozen=True, kw_only=True)
class RecipeOptions:
    """The recipe's job options, named as timm's ``train.py`` names them; a training config inherits them
    (``student.config.TrainConfig``, ``pipelines.teacher_train.TeacherTrainConfig``) and may give some another
    default with ``pipelines.options.default_from``."""

    opt: str = option("adamw", help="timm optimizer (timm.optim.create_optimizer_v2), e.g. sgd, nesterov, "
                                    "momentum, adamw, lamb, lars (any of timm.optim.list_optimizers())",
                            choices=optimizer_names, cli={"metavar": "NAME"})
    momentum: float = option(0.9, help="optimizer momentum (sgd-like optimizers)", ge=0, lt=1)
    lr: float | None = option(None, help="learning rate (default: --lr-base scaled by the global batch over "
                                         "--lr-base-size)", gt=0, le=10)
    lr_base: float = option(1e-3, help="learning rate at a global batch (batch size x workers x "
                                       "--grad-accum-steps) of --lr-base-size, when --lr is not given", gt=0, le=10)
    lr_base_size: int = option(128, help="the global batch at which the learning rate is --lr-base", ge=1)
    lr_base_scale: str = option("auto", help="how --lr-base scales with the global batch: linear, sqrt, or auto "
                                             "(sqrt for ada* and lamb optimizers, linear otherwise, as timm)",
                                choices=LR_BASE_SCALES)
    weight_decay: float = option(0.05, help="weight decay; never on norms, biases or other 1-D parameters",
                                 ge=0, le=10)
    sched: str = option("cosine", help="learning rate schedule (timm.scheduler.create_scheduler_v2), updated "
                                       "after every optimizer step", choices=SCHEDULES)
    warmup_epochs: float = option(0.0, help="epochs of linear warmup from --warmup-lr (a fraction is allowed)",
                                  ge=0, le=1000)
    warmup_lr: float = option(1e-5, help="learning rate at the start of the warmup", ge=0, le=10)
    min_lr: float = option(0.0, help="learning rate at the end of the schedule", ge=0, le=10)
    smoothing: float = option(0.0, help="label smoothing of the ground-truth term", ge=0, lt=1)
    model_ema: bool = option(False, help="keep an EMA of the weights (timm ModelEmaV3), evaluated beside the model")
    model_ema_decay: float = option(0.9998, help="EMA decay per optimizer step", ge=0, lt=1)
    clip_grad: float | None = option(None, help="clip gradients at this value (default: no clipping)", gt=0)
    clip_mode: str = option("norm", help="gradient clipping mode (timm dispatch_clip_grad)", choices=CLIP_MODES)
    amp_dtype: str = option("auto", help="autocast dtype: auto (bfloat16 on CUDA, float32 on CPU), bfloat16, "
                                         "float16 (with a gradient scaler) or float32 (no autocast)",
                            choices=AMP_DTYPES)
    channels_last: bool = option(False, help="model and inputs in channels-last memory format")
    torchcompile: str | None = option(None, help="torch.compile the model with this backend (the flag alone: "
                                                 "inductor)", cli={"nargs": "?", "const": "inductor"})
    grad_accum_steps: int = option(1, help="micro-batches accumulated per optimizer step", ge=1, le=1024)
    device: str = option("auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")


RECIPE_OPTIONS = tuple(f.name for f in fields(RecipeOptions))


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N``; UsageError for a device not here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: torch finds no CUDA device here; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def amp_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of ``--amp-dtype name`` on ``device`` (``auto``: bfloat16 on CUDA, float32 elsewhere)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise UsageError(f"--amp-dtype {name!r}: expected one of {', '.join(AMP_DTYPES)}")
    return _DTYPES[name]


def resolve_lr(options: RecipeOptions, global_batch: int) -> float:
    """``--lr``, else ``--lr-base * ratio`` with ``ratio = global_batch / --lr-base-size`` (its square root for
    ``sqrt``; ``auto``: sqrt for ada* and lamb optimizers), as timm's ``train.py``."""
    if options.lr is not None:
        return options.lr
    ratio = global_batch / options.lr_base_size
    scale = options.lr_base_scale
    if scale == "auto":
        scale = "sqrt" if any(o in options.opt.lower() for o in ("ada", "lamb")) else "linear"
    return options.lr_base * (math.sqrt(ratio) if scale == "sqrt" else ratio)


class _Trained(nn.Module):
    """The parameters the recipe's optimizer trains: a model and any extra parameters (a method's own
    embeddings), named so that timm's weight-decay groups see them (1-D ones go without decay) and the model's
    ``no_weight_decay()`` names keep their meaning."""

    def __init__(self, model: nn.Module, extra: Iterable[nn.Parameter] = ()):
        super().__init__()
        self.model = model
        self.extra = nn.ParameterList(list(extra))

    def no_weight_decay(self) -> set[str]:
        own = getattr(self.model, "no_weight_decay", None)
        return {f"model.{name}" for name in (own() if callable(own) else ())}


@dataclass
class TrainingRecipe:
    """Optimizer, schedule, EMA, precision, clipping and accumulation for one training run.

    Build it with ``TrainingRecipe.build``; per micro-batch the loop runs its forward in ``autocast()``,
    backpropagates ``scaled(losses)``, and after the last micro-batch of an update calls ``step()``.
    ``state_dict()`` holds everything a resumed run needs to continue bit-identically (the schedule is a
    function of ``num_updates``; it is rebuilt for the resumed run's length and set to that step).
    """

    options: RecipeOptions
    device: torch.device
    lr: float
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a timm Scheduler, or None for a constant rate
    ema: Any  # timm.utils.ModelEmaV3 or None
    dtype: torch.dtype
    scaler: torch.amp.GradScaler
    model: nn.Module  # the module whose weights the EMA follows (not a DDP or compiled wrapper)
    extra_optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    num_updates: int = 0
    grad_norm: torch.Tensor | None = None  # the last update's gradient norm, before clipping

    @classmethod
    def build(cls, model: nn.Module, options: RecipeOptions, *, epochs: int, updates_per_epoch: int,
              global_batch: int, device: torch.device, extra_params: Iterable[nn.Parameter] = (),
              extra_optimizers: Iterable[torch.optim.Optimizer | None] = ()) -> TrainingRecipe:
        """The recipe for ``model`` (on ``device``, not yet wrapped) trained ``epochs`` epochs of
        ``updates_per_epoch`` optimizer steps with ``global_batch`` samples per step. ``extra_params`` are trained
        with the model by the same optimizer; ``extra_optimizers`` (a method's own, e.g. a discriminator's) are
        stepped, scaled and zeroed with it."""
        from timm.optim import create_optimizer_v2
        from timm.utils import ModelEmaV3

        lr = resolve_lr(options, global_batch)
        optimizer = create_optimizer_v2(_Trained(model, extra_params), opt=options.opt, lr=lr,
                                        weight_decay=options.weight_decay, momentum=options.momentum)
        scheduler = make_scheduler(optimizer, options, epochs, updates_per_epoch)
        ema = ModelEmaV3(model, decay=options.model_ema_decay) if options.model_ema else None
        dtype = amp_dtype(options.amp_dtype, device)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        return cls(options, device, lr, optimizer, scheduler, ema, dtype, scaler, model,
                   [o for o in extra_optimizers if o is not None])

    # -- the loop's calls --------------------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's precision: autocast in the recipe's dtype (nothing for float32)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scaled(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The losses to backpropagate: divided by the accumulation steps and, for float16, scaled."""
        k = self.options.grad_accum_steps
        return {name: self.scaler.scale(v / k if k > 1 else v) for name, v in losses.items()}

    def is_update(self, micro_step: int, last: bool) -> bool:
        """Whether micro-batch ``micro_step`` (counted from 0 in the epoch) ends an optimizer step: every
        ``--grad-accum-steps``-th, and the epoch's last (as timm's ``train.py``)."""
        return last or (micro_step + 1) % self.options.grad_accum_steps == 0

    def step(self) -> None:
        """One optimizer step: unscale, measure the gradient norm, clip, step every optimizer, zero their
        gradients, advance the schedule and update the EMA."""
        opts = self.options
        optimizers = [self.optimizer, *self.extra_optimizers]
        self.scaler.unscale_(self.optimizer)  # a no-op unless fp16; then the norm and clipping see true gradients
        # the norm before clipping, kept as a tensor (no device synchronisation unless somebody reads it)
        self.grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.parameters() if p.grad is not None])
        if opts.clip_grad is not None:
            from timm.utils import dispatch_clip_grad

            dispatch_clip_grad(self.parameters(), opts.clip_grad, mode=opts.clip_mode)
        for o in optimizers:
            self.scaler.step(o)
        self.scaler.update()
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        self.num_updates += 1
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.num_updates)
        if self.ema is not None:
            self.ema.update(self.model, step=self.num_updates)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The parameters the recipe's optimizer trains."""
        for group in self.optimizer.param_groups:
            yield from group["params"]

    @property
    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- checkpoint -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "num_updates": self.num_updates,
                "scaler": self.scaler.state_dict(),
                "model_ema": self.ema.module.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.num_updates = int(state["num_updates"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state.get("model_ema") is None:
                raise UsageError("--model-ema at resume, but the checkpoint holds no EMA weights")
            self.ema.module.load_state_dict(state["model_ema"])
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.num_updates)


def make_scheduler(optimizer: torch.optim.Optimizer, options: RecipeOptions, epochs: int,
                   updates_per_epoch: int) -> Any:
    """timm's ``create_scheduler_v2`` for ``epochs`` of ``updates_per_epoch`` optimizer steps, updated per step."""
    from timm.scheduler import create_scheduler_v2

    # per-step updates multiply warmup_epochs by updates_per_epoch, so a fraction of an epoch works too
    warmup: Any = options.warmup_epochs
    scheduler, _ = create_scheduler_v2(optimizer, sched=options.sched, num_epochs=epochs, warmup_epochs=warmup,
                                       warmup_lr=options.warmup_lr, min_lr=options.min_lr, step_on_epochs=False,
                                       updates_per_epoch=max(1, updates_per_epoch))
    return scheduler


def prepare_model(model: nn.Module, options: RecipeOptions) -> nn.Module:
    """The module the loop runs: channels-last and ``torch.compile`` as asked (weights stay ``model``'s)."""
    if options.torchcompile:
        return torch.compile(model, backend=options.torchcompile)  # type: ignore[return-value]
    return model


def to_memory_format(model: nn.Module, options: RecipeOptions) -> nn.Module:
    """``--channels-last``: the model's 4-D weights in channels-last memory format."""
    return model.to(memory_format=torch.channels_last) if options.channels_last else model


def input_format(x: torch.Tensor, options: RecipeOptions) -> torch.Tensor:
    """An image batch in the memory format the model was put in."""
    return x.contiguous(memory_format=torch.channels_last) if options.channels_last and x.dim() == 4 else x


def precision_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


__all__ = ["RecipeOptions", "RECIPE_OPTIONS", "TrainingRecipe", "amp_dtype", "make_scheduler", "resolve_device",
           "resolve_lr", "prepare_model", "to_memory_format", "input_format"]
