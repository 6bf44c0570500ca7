"""Student models: timm architectures built for the data set's image size, channels and class count.

A ViT-like student (any model from timm's transformer modules) gets ``img_size`` and may take ``patch_size``
and other architecture kwargs from ``--student-kwargs``; a CNN gets only ``num_classes`` and ``in_chans``
plus those kwargs. A distilled DeiT (``deit_*_distilled_*``, timm ``VisionTransformerDistilled``) has two
heads: trained with a DeiT loss it returns ``(cls, dist)`` logits, and in eval mode the mean of the two.

A student's input is its own timm data config (``InputConfig``, from ``timm.data.resolve_model_data_config``: the
mean/std, interpolation and crop_pct of the model's pretrained tag, e.g. ImageNet's for ``resnet18``, 0.5/0.5 for
``test_resnet``), in training and in eval; ``--init`` from a stillroom checkpoint keeps the one it recorded.
Checkpoints record it; one written before it was recorded is read as ``LEGACY_INPUT`` (0.5/0.5, bilinear, 0.875).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import nn

from stillroom.pipelines.core import UsageError

# timm modules whose models take img_size / patch_size
_VIT_MODULES = (
    "vision_transformer", "deit", "vision_transformer_relpos", "vision_transformer_hybrid", "cait", "beit",
    "eva", "levit", "xcit", "pit", "tnt", "crossvit", "mvitv2", "vision_transformer_sam", "volo",
)


def is_vit_like(name: str) -> bool:
    """Whether timm builds ``name`` in one of its transformer modules (which take ``img_size``)."""
    import timm

    return bool(timm.models.is_model_in_modules(name, list(_VIT_MODULES)))


def build_student(name: str, num_classes: int, in_chans: int, img_size: int, kwargs: dict[str, Any] | None = None
                  ) -> nn.Module:
    """Build a randomly initialised timm student.

    Args:
        name: a timm model name, e.g. ``resnet18``, ``test_resnet``, ``deit_tiny_distilled_patch16_224``.
        num_classes: the data set's class count.
        in_chans: the views' channel count.
        img_size: the views' side in pixels; passed to ViT-like models (with ``patch_size`` etc. from
            ``kwargs``), ignored by CNNs, whose global pooling takes any size.
        kwargs: extra architecture kwargs for ``timm.create_model`` (``num_classes``/``in_chans`` not allowed).

    Raises:
        UsageError: an unknown model name, or kwargs the model does not take.
    """
    import timm

    kwargs = dict(kwargs or {})
    if not timm.is_model(name):
        raise UsageError(f"unknown student model {name!r}: not a timm model name (see timm.list_models())")
    clash = {"num_classes", "in_chans", "pretrained"} & set(kwargs)
    if clash:
        raise UsageError(f"--student-kwargs may not set {sorted(clash)}: they come from the data set")
    if is_vit_like(name):
        kwargs.setdefault("img_size", img_size)
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise UsageError(f"cannot build student {name} with {kwargs}: {type(e).__name__}: {e}") from None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def has_distillation_head(model: nn.Module) -> bool:
    """Whether the student has a second (distillation-token) head, like timm's ``VisionTransformerDistilled``."""
    return hasattr(unwrap(model), "set_distilled_training")


def set_distilled_training(model: nn.Module, enabled: bool) -> None:
    """Make a two-head student return ``(cls, dist)`` in training mode (no-op for a one-head student)."""
    inner = unwrap(model)
    if hasattr(inner, "set_distilled_training"):
        cast(Any, inner).set_distilled_training(enabled)


@dataclass(frozen=True)
class InputConfig:
    """How views become a student's input, as timm's data config names it: per-channel ``mean``/``std`` of views
    in [0, 1], and for evaluation on images on disk the ``interpolation`` and ``crop_pct`` of timm's eval
    transform (shorter side to ``size / crop_pct``, centre crop)."""

    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    crop_mode: str = "center"

    def normalize(self, views: torch.Tensor) -> torch.Tensor:
        """Views in [0, 1] ``(B, C, H, W)`` -> the student's input."""
        shape = (1, len(self.mean), 1, 1)
        mean = torch.tensor(self.mean, dtype=views.dtype, device=views.device).view(shape)
        std = torch.tensor(self.std, dtype=views.dtype, device=views.device).view(shape)
        return (views - mean) / std

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}  # JSON's and a checkpoint's

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputConfig:
        return cls(tuple(d["mean"]), tuple(d["std"]), str(d["interpolation"]), float(d["crop_pct"]),
                   str(d.get("crop_mode", "center")))


LEGACY_INPUT = InputConfig()  # what every student saw before the data config was recorded


def resolve_input_config(model: nn.Module, in_chans: int) -> InputConfig:
    """The student's own data config (``timm.data.resolve_model_data_config``), for ``in_chans`` channels.

    A config of 3 values for a 1-channel student (Fashion-MNIST) becomes their averages: a grey image is the
    same value in the three channels, and timm adapts RGB weights to 1 channel by summing them over channels.
    A config recorded with ``set_input_config`` (``--init`` from a stillroom checkpoint) comes first."""
    import timm.data

    inner = unwrap(model)
    recorded = getattr(inner, "stillroom_input", None)
    if isinstance(recorded, InputConfig):
        return recorded
    cfg = timm.data.resolve_model_data_config(inner)
    mean, std = tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    if len(mean) != in_chans:
        if in_chans != 1:
            raise UsageError(f"{type(inner).__name__}'s data config has {len(mean)} channels' mean/std; the data "
                             f"has {in_chans} channels")
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    return InputConfig(mean, std, str(cfg["interpolation"]), float(cfg["crop_pct"]), str(cfg["crop_mode"]))


def set_input_config(model: nn.Module, config: InputConfig) -> None:
    """Record the input config a student's weights were trained with (``--init`` from a stillroom checkpoint)."""
    unwrap(model).stillroom_input = config  # type: ignore[assignment]


def normalize(views: torch.Tensor, config: InputConfig = LEGACY_INPUT) -> torch.Tensor:
    """Views in [0, 1] -> the student's input under ``config`` (default: mean 0.5, std 0.5 per channel)."""
    return config.normalize(views)


def student_heads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(cls_logits, dist_logits)``; ``dist_logits`` is None for a one-head student, or for a two-head
    student that is not in distilled training (it then returns the mean of its heads, as in eval)."""
    out = model(x)
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, None


def forward_capturing_head(model: nn.Module, x: torch.Tensor
                           ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]:
    """``(feature map, (cls, dist))`` of a timm model (``forward = forward_head(forward_features(x))``) that has
    no known last module: ``forward_head`` is wrapped for one call of ``model(x)`` to capture its input, so the
    forward runs through ``model`` itself, a DDP wrapper's forward included (calling ``forward_features`` on the
    unwrapped model would skip DDP's gradient all-reduce and let the ranks' weights drift apart)."""
    inner = cast(Any, unwrap(model))
    head = getattr(inner, "forward_head", None)
    if head is None:
        raise UsageError(f"student {type(inner).__name__} has no forward_head: name its feature layer with "
                         f"--student-layer")
    captured: list[torch.Tensor] = []

    def capturing(fmap: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        captured.append(fmap)
        return head(fmap, *args, **kwargs)

    inner.forward_head = capturing  # an instance attribute: found before the class's method, for this call only
    try:
        heads = student_heads(model, x)
    finally:
        del inner.forward_head
    if not captured:
        raise UsageError(f"student {type(inner).__name__}'s forward does not call forward_head: name its feature "
                         f"layer with --student-layer")
    return captured[0], heads
