"""A teacher's preprocessing (``Preprocess``), where it comes from, and the options that override it.

Preprocessing (``Preprocess``: input size, mean, std, interpolation, crop_pct) comes, in this order, from the
options (``--teacher-mean`` ...), the checkpoint (a stillroom checkpoint's, a ``pretrained_cfg`` in the file or a
hub ``config.json`` beside it), the tagged name's timm config (``vit_base_patch16_224.augreg_in21k_ft_in1k@PATH``),
else the default tag's, which is said (``Teacher.preprocess_from``). Labeling renders each teacher's input from
the source image at its own input size (``pipelines.views``); ``Preprocess`` matches the channel count, normalises,
and resizes only views handed over at another size (with its interpolation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from stillroom.pipelines.core import UsageError

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")  # the filters both PIL and torch name alike


@dataclass(frozen=True)
class Preprocess:
    """What a teacher's input must be: ``resolution`` px square, ``in_chans`` channels, normalised by ``mean`` and
    ``std``. ``interpolation`` is the filter of a resize to ``resolution`` (timm's name; other timm filters are
    taken as bicubic); ``crop_pct`` (timm's eval centre crop) is recorded only: a view's stored box says what the
    teacher sees."""

    resolution: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int
    interpolation: str = "bilinear"
    crop_pct: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """From ``to_dict``'s form (a checkpoint's, a manifest's); fields added later take their defaults."""
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in d.items() if k in known}
        return cls(**{**values, "mean": tuple(d["mean"]), "std": tuple(d["std"])})

    @property
    def mode(self) -> str:
        return self.interpolation if self.interpolation in INTERPOLATIONS else "bicubic"

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        x = views
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            antialias = {"antialias": True} if self.mode != "nearest" else {}
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode=self.mode,
                              **({"align_corners": False} if self.mode != "nearest" else {}), **antialias)
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


def _preprocess_from_cfg(cfg: dict[str, Any], in_chans: int) -> Preprocess:
    """``Preprocess`` from a timm pretrained config, its gaps filled as timm's ``resolve_data_config`` fills them;
    a mean/std of another channel count averaged to ``in_chans``."""
    from timm.data import resolve_data_config

    data = resolve_data_config(pretrained_cfg=cfg)
    mean, std = tuple(float(m) for m in data["mean"]), tuple(float(s) for s in data["std"])
    if len(mean) != in_chans:
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    crop = data.get("crop_pct")
    return Preprocess(int(data["input_size"][-1]), mean, std, in_chans, str(data["interpolation"]),
                      float(crop) if crop is not None else None)


PREPROCESS_FIELDS = ("resolution", "mean", "std", "interpolation", "crop_pct")


def with_overrides(pre: Preprocess, overrides: dict[str, Any] | None) -> tuple[Preprocess, list[str]]:
    """``pre`` with the fields ``overrides`` sets (None: unset); which were set."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(given) - set(PREPROCESS_FIELDS))
    if unknown:
        raise UsageError(f"unknown preprocessing field(s) {', '.join(unknown)}: "
                         f"expected {', '.join(PREPROCESS_FIELDS)}")
    for key in ("mean", "std"):
        if key in given:
            values = tuple(float(v) for v in given[key])
            if len(values) == 1:
                values = values * pre.in_chans
            if len(values) != pre.in_chans or (key == "std" and min(values) <= 0):
                raise UsageError(f"teacher {key} {','.join(map(str, values))}: expected {pre.in_chans} value(s)"
                                 + (", each > 0" if key == "std" else ""))
            given[key] = values
    return replace(pre, **given), sorted(given)
