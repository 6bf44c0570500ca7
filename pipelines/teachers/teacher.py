"""A loaded teacher (``Teacher``): a timm model in eval mode with its preprocessing, its weight digest and an
optional class map; its forward gives logits and, when asked, a pooled feature map (``forward_capturing``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from stillroom.pipelines.core import UsageError
from stillroom.pipelines.teachers.preprocess import Preprocess

R = TypeVar("R")


@dataclass
class Teacher:
    """A loaded teacher, in eval mode. With a ``class_map`` its logits are those of the mapped classes only
    (data set class ``i``: the teacher's class ``class_map[i]``); ``num_classes`` counts them, ``teacher_classes``
    what the network predicts."""

    name: str
    model: nn.Module
    preprocess: Preprocess
    num_classes: int
    weights_sha256: str
    source: str  # checkpoint path, or "pretrained"
    kwargs: dict[str, Any] = field(default_factory=dict)
    class_map: tuple[int, ...] | None = None
    teacher_classes: int = 0
    class_names: tuple[str, ...] | None = None  # what a stillroom checkpoint records
    preprocess_from: str = ""  # where the preprocessing came from (said, kept out of the cache key)

    def describe(self) -> dict[str, Any]:
        """What identifies the teacher's labels: the part of the store's provenance it contributes."""
        out = {"name": self.name, "kwargs": self.kwargs, "num_classes": self.num_classes,
               "weights_sha256": self.weights_sha256, "preprocess": self.preprocess.to_dict()}
        if self.class_map is not None:
            out["class_map"] = {"teacher_classes": self.teacher_classes, "indices": list(self.class_map)}
        return out

    def to(self, device: torch.device | str) -> Teacher:
        self.model.to(device)
        return self

    def _head(self, logits: torch.Tensor) -> torch.Tensor:
        if self.class_map is None:
            return logits
        return logits.index_select(-1, torch.tensor(self.class_map, dtype=torch.long, device=logits.device))

    def logits(self, views: torch.Tensor) -> torch.Tensor:
        return self._head(self.model(self.preprocess(views)))

    def features(self, views: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, feature map)``: ``layer`` is ``final`` (timm ``forward_features``) or a module name."""
        x = self.preprocess(views)
        if layer == "final":
            model: Any = self.model  # timm models have forward_features / forward_head
            fmap = model.forward_features(x)
            return self._head(model.forward_head(fmap)), fmap
        module = dict(self.model.named_modules()).get(layer)
        if module is None:
            raise UsageError(f"teacher {self.name} has no layer {layer!r}: use 'final' or a module name")
        logits, fmap = forward_capturing(module, lambda: self.model(x))
        return self._head(logits), fmap


def forward_capturing(module: nn.Module, forward: Callable[[], R]) -> tuple[R, torch.Tensor]:
    """``(forward(), the output of module during it)``: a forward hook on ``module``, removed afterwards."""
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        result = forward()
    finally:
        handle.remove()
    if not captured:
        raise UsageError(f"layer {type(module).__name__} did not run in the forward pass")
    return result, captured[0]


def as_feature_map(fmap: torch.Tensor) -> torch.Tensor:
    """A feature map ``(B, C, H, W)``; ViT tokens ``(B, N, C)`` become the patch grid: the last ``side * side``
    tokens, the rest (class, distillation, register tokens) dropped."""
    if fmap.ndim == 3:
        n, side = fmap.shape[1], math.isqrt(fmap.shape[1])
        return fmap[:, n - side * side :].transpose(1, 2).reshape(fmap.shape[0], fmap.shape[2], side, side)
    if fmap.ndim != 4:
        raise UsageError(f"feature map of shape {tuple(fmap.shape)}: expected (B, C, H, W) or ViT tokens (B, N, C)")
    return fmap
