"""Typed job specs: what ``POST /v1/{teacher,label,train}-jobs`` accept. Nothing in a spec names code to
run; paths in a spec must resolve (symlinks followed) inside the configured data, store or state roots."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NAME = r"^[A-Za-z0-9_.\-]+$"
TEACHER = r"^[A-Za-z0-9_.\-]+(@.+)?$"
Scalar = int | float | str | bool
LOSSES = ("ce", "kd", "deit-soft", "deit-hard", "mealv2", "sampled", "tat")


class PathOutsideRoots(ValueError):
    pass


class _Spec(BaseModel):
    # strict: "0.1" is not a number and 1 is not a bool (the JSON Schema says so; lax coercion would accept them)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _whole_numbers(cls, data: Any) -> Any:
        """JSON Schema counts 236.0 as an integer: accept a whole float where the spec wants an int."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            wants_int = "int" in str(field.annotation) and "float" not in str(field.annotation)
            value = out.get(name)
            if wants_int and isinstance(value, float) and value.is_integer():
                out[name] = int(value)
            elif wants_int and isinstance(value, list):
                out[name] = [int(v) if isinstance(v, float) and v.is_integer() else v for v in value]
        return out

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


class TeacherJobSpec(_Spec):
    dataset: str = Field("fashion-mnist", max_length=500)
    model: str = Field("resnet18", pattern=NAME, max_length=100)
    model_kwargs: dict[str, Scalar] = Field(default_factory=dict)
    epochs: int = Field(2, ge=1, le=1000)
    batch_size: int = Field(128, ge=1, le=65536)
    lr: float = Field(2e-3, gt=0, le=10)
    recipe: str = Field("fmnist-flip", pattern=NAME)
    resolution: int | None = Field(None, ge=8, le=2048)
    train_samples: int | None = Field(None, ge=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class LabelJobSpec(_Spec):
    dataset: str = Field("fashion-mnist", max_length=500)
    split: Literal["train", "test"] = "train"
    teachers: list[Annotated[str, Field(pattern=TEACHER, max_length=1000)]] = Field(
        min_length=1, max_length=16, description="NAME@CHECKPOINT (a path in the roots), or NAME for timm weights")
    recipe: str = Field("fmnist-rrc", pattern=NAME)
    seeds: list[int] = Field([0], min_length=1, max_length=1000)
    top_k: int = Field(10, ge=1, le=100000)
    sampled: int = Field(0, ge=0, le=4096)
    features: str | None = Field(None, pattern=NAME, max_length=200)
    feature_grid: int = Field(4, ge=1, le=64)
    per_teacher: bool = False
    batch_size: int = Field(256, ge=1, le=65536)
    num_workers: int = Field(1, ge=1, le=4096)
    gpus_per_worker: float = Field(0.0, ge=0, le=16)


class TrainJobSpec(_Spec):
    store: str = Field(pattern=r"^[0-9a-f]{8,64}$", description="the cache key of a store under the store root")
    dataset: str = Field("fashion-mnist", max_length=500)
    student: str = Field(pattern=NAME, max_length=100)
    student_kwargs: dict[str, Scalar] = Field(default_factory=dict)
    loss: Literal["ce", "kd", "deit-soft", "deit-hard", "mealv2", "sampled", "tat"] = "kd"
    epochs: int = Field(1, ge=1, le=1000)
    batch_size: int = Field(128, ge=1, le=65536)
    lr: float = Field(1e-3, gt=0, le=10)
    alpha: float = Field(0.5, ge=0, le=1)
    temperature: float | None = Field(None, gt=0, le=100)
    seeds: list[int] | None = Field(None, max_length=1000)
    online: bool = False
    workers: int = Field(1, ge=1, le=1024)
    init: str | None = Field(None, max_length=1000, description="pretrained student weights (a path in the roots)")
    eval_limit: int | None = Field(None, ge=1)


SPECS: dict[str, type[_Spec]] = {"teacher": TeacherJobSpec, "label": LabelJobSpec, "train": TrainJobSpec}


def confine(path: str, roots: tuple[Path, ...], base: Path) -> Path:
    """``path`` (relative to ``base``) resolved with symlinks followed; refuse it unless inside one of ``roots``."""
    p = Path(path)
    resolved = (p if p.is_absolute() else base / p).resolve()
    if not any(resolved == r or resolved.is_relative_to(r) for r in roots):
        raise PathOutsideRoots(f"path {path!r} is outside the configured roots")
    return resolved


def confine_dataset(dataset: str, roots: tuple[Path, ...], base: Path) -> str:
    """``imagefolder:`` and ``parquet:`` paths resolved and confined (a Parquet glob: its folder, no ``..``);
    a ``,bad=`` option is kept."""
    kind, sep, arg = dataset.partition(":")
    if kind not in ("imagefolder", "parquet") or not sep:
        return dataset
    path, bad, policy = arg.rpartition(",bad=")
    path, option = (path, f",bad={policy}") if bad else (arg, "")
    if kind == "parquet" and any(ch in path for ch in "*?["):
        if ".." in Path(path).parts:
            raise PathOutsideRoots(f"path {path!r}: '..' is not allowed in a glob")
        cut = min(i for i, ch in enumerate(path) if ch in "*?[")
        folder, _, _ = path[:cut].rpartition("/")
        return f"parquet:{confine(folder or '.', roots, base)}/{path[len(folder) + 1 if folder else 0:]}{option}"
    return f"{kind}:{confine(path, roots, base)}{option}"


def confined_spec(kind: str, spec: _Spec, roots: tuple[Path, ...], base: Path) -> dict[str, Any]:
    """The spec as the job entry point gets it: every path resolved and checked."""
    d = spec.model_dump(mode="json")
    d["dataset"] = confine_dataset(d["dataset"], roots, base)
    if kind == "label":
        teachers = []
        for t in d["teachers"]:
            name, sep, path = t.partition("@")
            teachers.append(f"{name}@{confine(path, roots, base)}" if sep else name)
        d["teachers"] = teachers
    if kind == "train" and d.get("init"):
        d["init"] = str(confine(d["init"], roots, base))
    return d
