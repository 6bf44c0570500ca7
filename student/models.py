"""Student models: timm architectures built for the data set's image size, channels and class count.

A ViT-like student (any model from timm's transformer modules) gets ``img_size`` and may take ``patch_size``
and other architecture kwargs from ``--student-kwargs``; a CNN gets only ``num_classes`` and ``in_chans``
plus those kwargs. A distilled DeiT (``deit_*_distilled_*``, timm ``VisionTransformerDistilled``) has two
heads: trained with a DeiT loss it returns ``(cls, dist)`` logits, and in eval mode the mean of the two.

Students see views in [0, 1] normalised with mean 0.5 and std 0.5 (``normalize``), in training and in eval.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from pipelines.errors import UsageError

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


def normalize(views: torch.Tensor) -> torch.Tensor:
    """Views in [0, 1] -> the student's input (mean 0.5, std 0.5 per channel)."""
    return (views - 0.5) / 0.5


def student_heads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(cls_logits, dist_logits)``; ``dist_logits`` is None for a one-head student, or for a two-head
    student that is not in distilled training (it then returns the mean of its heads, as in eval)."""
    out = model(x)
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, None
