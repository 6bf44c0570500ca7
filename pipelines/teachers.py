"""Teachers: timm models with their weights and preprocessing, alone or as an ensemble.

A teacher spec is ``NAME@PATH`` (a timm model name and a local checkpoint) or ``NAME`` (timm's pretrained
weights, where a hub is reachable). A checkpoint is either one written by ``stillroom teacher train``
(model name, kwargs, class count, preprocessing, accuracy, state dict) or a plain state dict for the named
model. The weight digest (sha256 of every tensor, by name) goes into the store's cache key.

The views come in as float tensors in [0, 1] at the recipe's size; ``Preprocess`` resizes them to the
teacher's resolution, matches the channel count and normalises.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.atomic import write_atomically
from pipelines.errors import UsageError
from pipelines.storage import Location, is_url, open_binary

CHECKPOINT_FORMAT = "stillroom-teacher/1"
R = TypeVar("R")


@dataclass(frozen=True)
class Preprocess:
    resolution: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        x = views
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        if x.shape[1] != self.in_chans:
            if x.shape[1] == 1:
                x = x.expand(-1, self.in_chans, -1, -1)
            elif self.in_chans == 1:
                x = x.mean(dim=1, keepdim=True)
            else:
                raise UsageError(f"cannot feed {x.shape[1]}-channel views to a {self.in_chans}-channel model")
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


@dataclass
class Teacher:
    """A loaded teacher, in eval mode."""

    name: str
    model: nn.Module
    preprocess: Preprocess
    num_classes: int
    weights_sha256: str
    source: str  # checkpoint path, or "pretrained"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What identifies the teacher's labels: the part of the store's provenance it contributes."""
        return {"name": self.name, "kwargs": self.kwargs, "num_classes": self.num_classes,
                "weights_sha256": self.weights_sha256, "preprocess": self.preprocess.to_dict()}

    def to(self, device: torch.device | str) -> Teacher:
        self.model.to(device)
        return self

    def logits(self, views: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(views))

    def features(self, views: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, feature map)``: ``layer`` is ``final`` (timm ``forward_features``) or a module name."""
        x = self.preprocess(views)
        if layer == "final":
            model: Any = self.model  # timm models have forward_features / forward_head
            fmap = model.forward_features(x)
            return model.forward_head(fmap), fmap
        module = dict(self.model.named_modules()).get(layer)
        if module is None:
            raise UsageError(f"teacher {self.name} has no layer {layer!r}: use 'final' or a module name")
        return forward_capturing(module, lambda: self.model(x))


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


def parse_teacher_spec(spec: str) -> tuple[str, str | None]:
    name, sep, path = spec.partition("@")
    if not name or (sep and not path):
        raise UsageError(f"teacher {spec!r}: expected NAME@CHECKPOINT or NAME (timm pretrained weights)")
    return name, path or None


def _create(name: str, **kwargs: Any) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise UsageError(f"unknown model {name!r}: not a timm model name (see timm.list_models())")
    try:
        return timm.create_model(name, **kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(f"cannot build {name} with {kwargs}: {e}") from None


def _preprocess_from_cfg(model: nn.Module, in_chans: int) -> Preprocess:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = int(cfg.get("input_size", (in_chans, 224, 224))[-1])
    mean = tuple(cfg.get("mean", (0.5,) * in_chans))
    std = tuple(cfg.get("std", (0.5,) * in_chans))
    if len(mean) != in_chans:
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    return Preprocess(size, mean, std, in_chans)


def load_teacher(spec: str, num_classes: int | None = None, device: str | torch.device = "cpu") -> Teacher:
    """Load ``NAME@PATH`` or ``NAME``; refuse a class count other than ``num_classes`` (if given)."""
    import timm

    name, path = parse_teacher_spec(spec)
    if not timm.is_model(name):
        raise UsageError(f"unknown model {name!r}: not a timm model name (see timm.list_models())")
    pre: Preprocess | None
    if path is None:
        try:
            model = _create(name, pretrained=True, **({"num_classes": num_classes} if num_classes else {}))
        except UsageError:
            raise
        except Exception as e:  # no hub here: say so plainly
            raise UsageError(f"cannot fetch pretrained weights for {name}: {type(e).__name__}: {e}. "
                             "Give a local checkpoint as NAME@PATH") from None
        kwargs: dict[str, Any] = {}
        in_chans = int(getattr(model, "pretrained_cfg", {}).get("input_size", (3,))[0])
        pre = _preprocess_from_cfg(model, in_chans)
        source = "pretrained"
    else:
        if not Location(path).is_file():  # a local path or a URL (s3://bucket/teacher.pt)
            raise UsageError(f"teacher checkpoint {path} does not exist")
        try:
            with open_binary(path) as f:
                ckpt = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # not a torch file, truncated, or pickled objects weights_only refuses
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise UsageError(f"cannot read teacher checkpoint {path}: {type(e).__name__}: {first}") from None
        if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
            if ckpt["model"] != name:
                raise UsageError(f"checkpoint {path} holds a {ckpt['model']}, not a {name}")
            kwargs = dict(ckpt["kwargs"])
            state = ckpt["state_dict"]
            pre = Preprocess(**{**ckpt["preprocess"], "mean": tuple(ckpt["preprocess"]["mean"]),
                                "std": tuple(ckpt["preprocess"]["std"])})
        else:
            state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
            if not isinstance(state, dict):
                raise UsageError(f"checkpoint {path} is neither a stillroom teacher checkpoint nor a state dict")
            kwargs = {"num_classes": num_classes} if num_classes else {}
            pre = None
        model = _create(name, pretrained=False, **kwargs)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            lines = str(e).strip().splitlines()
            raise UsageError(f"checkpoint {path} does not fit {name}: {' '.join(lines[:2])[:300]}") from None
        pre = pre if pre is not None else _preprocess_from_cfg(model, int(kwargs.get("in_chans", 3)))
        source = str(path)
    model.eval().requires_grad_(False)
    classes = int(getattr(model, "num_classes", 0))
    if num_classes is not None and classes != num_classes:
        raise UsageError(f"teacher {spec} predicts {classes} classes; the dataset has {num_classes}")
    digest = weights_digest(model.state_dict())
    return Teacher(name, model, pre, classes, digest, source, kwargs).to(device)


def ensemble_log_probs(member_logits: list[torch.Tensor]) -> torch.Tensor:
    """The ensemble's logits: ``log mean_m softmax(t_m)``, computed in log space (``logsumexp`` of the members'
    log-probabilities minus ``log M``), so the smallest probabilities of the tail keep their value instead
    of underflowing. One member: its own logits."""
    if len(member_logits) == 1:
        return member_logits[0].float()
    log_probs = torch.stack([m.float().log_softmax(-1) for m in member_logits])
    return torch.logsumexp(log_probs, 0) - math.log(len(member_logits))


def save_checkpoint(path: str | Path, name: str, model: nn.Module, kwargs: dict[str, Any], preprocess: Preprocess,
                    extra: dict[str, Any]) -> None:
    """Write a teacher checkpoint the way ``load_teacher`` reads it (atomically)."""
    state = {"format": CHECKPOINT_FORMAT, "model": name, "kwargs": kwargs,
             "num_classes": int(kwargs.get("num_classes", 0)), "preprocess": preprocess.to_dict(),
             "state_dict": model.state_dict(), **extra}
    if is_url(os.fspath(path)):  # one PUT: the object appears whole or not at all
        buf = io.BytesIO()
        torch.save(state, buf)
        Location(path).write_bytes(buf.getvalue())
    else:
        write_atomically(path, lambda tmp: torch.save(state, tmp))
