"""Typed job specs: what ``POST /v1/{teacher,label,train}-jobs`` accept. Nothing in a spec names code to
run; paths in a spec must resolve (symlinks followed) inside the configured data, store or state roots, and
URLs lie under a URL root (same scheme and bucket, under its prefix by path components)."""

from __future__ import annotations

import hashlib
import json
import os
import typing
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from stillroom.pipelines.core import UsageError, base_type, default_of, is_url, local_path, options
from stillroom.pipelines.data import DatasetSpec
from stillroom.pipelines.labeling import LabelConfig
from stillroom.pipelines.teachers import TeacherTrainConfig
from stillroom.pipelines.views import recipe_pattern
from stillroom.student.config import TrainConfig

NAME = r"^[A-Za-z0-9_.\-]+$"
TEACHER = r"^[A-Za-z0-9_.\-]+(@.+)?$"
Scalar = int | float | str | bool
# a timm architecture kwarg: a scalar or a short list of them (test_resnet's `channels`: [8, 16, 16, 32])
Kwarg = Scalar | Annotated[list[Scalar], Field(max_length=64)]


class PathOutsideRoots(ValueError):
    """A spec's path or URL lies outside every configured root: a 403."""


class BadLocation(ValueError):
    """A spec's URL that no root could hold (credentials, a query, '..'): a 422 naming ``field``."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class UrlRoot:
    """A URL as confinement compares it: scheme, bucket (the URL's host) and the path's components."""

    scheme: str
    bucket: str
    parts: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}" + "".join(f"/{p}" for p in self.parts)

    def holds(self, url: UrlRoot) -> bool:
        return (url.scheme, url.bucket) == (self.scheme, self.bucket) and url.parts[:len(self.parts)] == self.parts


Root = Path | UrlRoot


def parse_url(text: str) -> UrlRoot:
    """``text`` (a URL) split for confinement. Refused, without echoing it (it may hold a secret): credentials,
    a query or fragment (a signed URL's signature lives there), percent-escapes or backslashes (another client
    may decode them into '..' or '/'), and empty, '.' or '..' path components. One trailing '/' is allowed.

    Written here rather than taken from fsspec: fsspec's ``_strip_protocol`` normalises nothing and keeps
    '..', and confinement must compare what the object store will be asked for, component by component."""
    scheme = text.partition("://")[0]
    try:
        parts = urlsplit(text)
        has_user = parts.username is not None or parts.password is not None
    except ValueError:
        raise BadLocation(f"{scheme}://...: not a valid URL") from None
    if has_user or "@" in parts.netloc:
        raise BadLocation(f"{scheme}://...: a URL must not hold credentials; the service reads them from the "
                          "standard chain (environment, ~/.aws, an instance or pod role)")
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise BadLocation(f"{scheme}://...: a URL must have no query or fragment")
    if "%" in text or "\\" in text:
        raise BadLocation(f"{scheme}://...: percent-escapes and backslashes are not accepted in a URL")
    if not parts.netloc or ":" in parts.netloc:
        raise BadLocation(f"{scheme}://...: a URL must name its bucket (scheme://bucket/prefix), without a port")
    path = parts.path.removeprefix("/").removesuffix("/")
    components = tuple(path.split("/")) if path else ()
    if any(c in ("", ".", "..") for c in components):
        raise BadLocation(f"{scheme}://{parts.netloc}/...: empty, '.' and '..' path components are not allowed")
    return UrlRoot(parts.scheme.lower(), parts.netloc, components)


def root_of(text: str, what: str) -> Root:
    """A configured root: a URL's parts, or a local path resolved (symlinks followed)."""
    if is_url(text):
        try:
            return parse_url(text)
        except BadLocation as e:
            raise UsageError(f"{what}: {e}") from None
    return local_path(text).resolve()


def real_path(p: Path) -> Path:
    """``p`` (absolute) with every symlink followed, as ``Path.resolve``. On Linux the kernel resolves an
    existing path in one ``open(O_PATH)`` and ``/proc`` names the result (``resolve`` makes a system call
    per component, on every submission); elsewhere, or for a path that does not exist, ``resolve``."""
    try:
        fd = os.open(p, os.O_PATH | os.O_CLOEXEC)
    except (OSError, AttributeError):
        return p.resolve()
    try:
        named = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return p.resolve()
    finally:
        os.close(fd)
    return Path(named) if named.startswith("/") and not named.endswith(" (deleted)") else p.resolve()


def confine(path: str, roots: tuple[Root, ...], base: Path) -> str:
    """``path`` confined to ``roots``: a URL by scheme, bucket and path components under a URL root (no
    request is made); a path (relative to ``base``) resolved with symlinks followed, under a local root."""
    if is_url(path):
        url = parse_url(path)
        if not any(isinstance(r, UrlRoot) and r.holds(url) for r in roots):
            raise PathOutsideRoots(f"path {str(url)!r} is outside the configured roots")
        return str(url)
    p = local_path(path)
    try:
        resolved = real_path(p if p.is_absolute() else base / p)
    except ValueError:  # no path at all (an embedded NUL byte): the OS refuses it before any root is asked
        raise PathOutsideRoots(f"path {path!r} is not a valid path") from None
    if not any(isinstance(r, Path) and (resolved == r or resolved.is_relative_to(r)) for r in roots):
        raise PathOutsideRoots(f"path {path!r} is outside the configured roots")
    return str(resolved)


def confine_dataset(dataset: str, roots: tuple[Root, ...], base: Path) -> str:
    """``imagefolder:`` and ``parquet:`` paths or URLs confined (a Parquet glob: its folder, no ``..``);
    the options after the path (``,bad=``, ``,val=``) are kept."""
    kind, sep, arg = dataset.partition(":")
    if kind not in ("imagefolder", "parquet") or not sep:
        return dataset
    try:
        path, _, _ = DatasetSpec(kind, arg).path_and_policy()
    except UsageError:  # the message would echo the spec, which may hold a URL's credentials
        raise BadLocation("the options after the data set's path are ,bad=stop|skip and ,val=F (0 < F < 1), each "
                          "at most once", "dataset") from None
    option = arg[len(path):]
    if kind == "parquet" and any(ch in path for ch in "*?["):
        if ".." in path.split("/"):
            raise PathOutsideRoots(f"path {path!r}: '..' is not allowed in a glob")
        cut = min(i for i, ch in enumerate(path) if ch in "*?[")
        folder, _, _ = path[:cut].rpartition("/")
        return f"parquet:{confine(folder or '.', roots, base)}/{path[len(folder) + 1 if folder else 0:]}{option}"
    return f"{kind}:{confine(path, roots, base)}{option}"


def _field(name: str, confine_one: Any, *args: Any) -> Any:
    try:
        return confine_one(*args)
    except BadLocation as e:
        raise BadLocation(str(e), name) from None


def confined_spec(kind: str, spec: _Spec, roots: tuple[Root, ...], base: Path) -> dict[str, Any]:
    """The spec as the job entry point gets it: every path or URL checked (local paths resolved)."""
    d = spec.model_dump(mode="json")
    if d["dataset"] is not None:  # a train spec without one reads the store's
        d["dataset"] = _field("dataset", confine_dataset, d["dataset"], roots, base)
    if kind == "label":
        teachers = []
        for t in d["teachers"]:
            name, sep, path = t.partition("@")
            teachers.append(f"{name}@{_field('teachers', confine, path, roots, base)}" if sep else name)
        d["teachers"] = teachers
        if d.get("class_map"):
            d["class_map"] = _field("class_map", confine, d["class_map"], roots, base)
    if kind == "train" and d.get("init"):
        d["init"] = _field("init", confine, d["init"], roots, base)
    return d
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

    def digest(self, exclude: tuple[str, ...] = ()) -> str:
        fields = {k: v for k, v in self.model_dump(mode="json").items() if k not in exclude}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class JobResources(BaseModel):
    """What a job's own process asks Ray for (Ray's entry-point resources): the job starts on a node that has
    them free and holds them until it ends, so a teacher meant for a GPU never trains on a head node's CPU."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    cpus: float = Field(default=1.0, ge=0, le=1024,
                        description="CPUs it holds; it trains with this many torch threads (at least one)")
    gpus: float = Field(default=0.0, ge=0, le=64, description="GPUs it holds (a fraction shares one)")


# Fields of a REST spec that are no option of the job's config: how the service runs the job, not what the job
# computes (a teacher's checkpoint does not depend on them, so they are not part of its cache key).
REST_ONLY: dict[str, dict[str, tuple[Any, Any]]] = {
    "teacher": {"resources": (JobResources, Field(JobResources(), description=(
        "what the job's process asks Ray for: it trains the teacher itself")))},
    "label": {},  # the job's process only coordinates: each label worker asks for its CPUs and GPUs
    "train": {"resources": (JobResources, Field(JobResources(), description=(
        "with workers = 1, what the job's process asks Ray for (it trains the student itself); with "
        "workers > 1 that process only coordinates and asks for nothing, each Ray Train worker asks for "
        "1 + loader_workers CPUs (1 when loader_workers is unset), and gpus > 0 gives each worker a GPU")))},
}


# Options of a job that make no sense over REST, each with the reason: every other option of the job's config
# (pipelines.options) is a field of its spec, with the config's type, default, help, bounds and choices; the
# spec's other fields are in ``REST_ONLY``.
NOT_OVER_REST: dict[str, dict[str, str]] = {
    "teacher": {
        "out": "the service chooses each job's output directory",
        "data_root": "a path on the service's machine: a spec names its data by `dataset` (confined to the roots)",
        "device": "a job runs where Ray places it and uses CUDA where that machine has it (`resources.gpus`)",
        "config_file": "a CLI switch: a spec is itself the whole config",
    },
    "label": {
        "data_root": "a path on the service's machine: a spec names its data by `dataset` (confined to the roots)",
        "store_root": "the service's own store root (`serve --store-root`)",
        "ray_address": "the service's own cluster (`serve --ray-address`)",
        "no_ray": "a CLI switch: a job always runs on the service's Ray",
    },
    "train": {
        "out": "the service chooses each job's run directory",
        "data_root": "a path on the service's machine: a spec names its data by `dataset` (confined to the roots)",
        "store_root": "a CLI switch: `store` is a cache key under the service's store root",
        "resume": "each job has a run directory of its own: there is nothing to resume",
        "device": "a job runs where Ray places it and uses CUDA where that machine has it",
        "progress": "the service records each job's progress itself",
        "config_file": "a CLI switch: a spec is itself the whole config",
        "threads": "a job trains with the threads of the CPUs it asks Ray for (`resources.cpus`)",
    },
}

# what a REST field adds to its option: confinement of names and sizes (the service's own checks), and the
# types a JSON body carries where the CLI takes text
_REST: dict[str, dict[str, tuple[Any, dict[str, Any]]]] = {
    "teacher": {
        "dataset": (str, dict(max_length=500)),
        "model": (str, dict(pattern=NAME, max_length=100)),
        "model_kwargs": (dict[str, Kwarg], {}),
        "recipe": (str, dict(pattern=recipe_pattern(), max_length=100)),
    },
    "label": {
        "dataset": (str, dict(max_length=500)),
        "teachers": (list[Annotated[str, Field(pattern=TEACHER, max_length=1000)]],
                     dict(min_length=1, max_length=16,
                          description="NAME@CHECKPOINT (a path in the roots), or NAME for timm weights")),
        "recipe": (str, dict(pattern=recipe_pattern(), max_length=100)),
        "seeds": (list[Annotated[int, Field(ge=0)]], dict(min_length=1, max_length=1000)),
        "features": (str | None, dict(pattern=NAME, max_length=200)),
        "teacher_mean": (list[float] | None, dict(min_length=1, max_length=4)),
        "teacher_std": (list[float] | None, dict(min_length=1, max_length=4)),
    },
    "train": {
        "store": (str, dict(pattern=r"^[0-9a-f]{8,64}$",
                            description="the cache key of a store under the store root")),
        "dataset": (str | None, dict(default=None, max_length=500,
                                     description="default: the data set the store was labeled from")),
        "student": (str, dict(pattern=NAME, max_length=100)),
        "student_kwargs": (dict[str, Kwarg], {}),
        "seeds": (list[Annotated[int, Field(ge=0)]] | None, dict(max_length=1000)),
        "init": (str | None, dict(max_length=1000, description="pretrained student weights (a path in the roots)")),
        "student_layer": (str, dict(pattern=NAME, max_length=200)),
    },
}


def _spec_from_config(kind: str, config: type) -> type[_Spec]:
    """The REST spec of a job: one field per option of its config (``pipelines.options``) but those in
    ``NOT_OVER_REST``, with the option's default, help, bounds and choices and what ``_REST`` adds."""
    hints = typing.get_type_hints(config)
    fields: dict[str, Any] = {}
    for name, (f, opt) in options(config).items():
        if name in NOT_OVER_REST[kind]:
            continue
        annotation, extra = _REST[kind].get(name, (hints[name], {}))
        if opt.choices is not None:
            annotation = Literal[opt.allowed()]  # type: ignore[valid-type]
            annotation = annotation | None if base_type(hints[name]) is not hints[name] else annotation
        kwargs = {"description": opt.help, **opt.bounds, **extra}
        default = kwargs.pop("default", default_of(f))
        field = Field(... if default is MISSING else default, **kwargs)
        fields[name] = (annotation, field)
    fields.update(REST_ONLY[kind])
    validators: dict[str, Any] = {}
    if hasattr(config, "conflicts"):  # options each valid alone but not together: a 422, as the CLI refuses them
        def _no_conflicts(spec: Any) -> Any:
            for _, why in config.conflicts(dict(spec)):
                raise ValueError(why)
            return spec
        validators["_no_conflicts"] = model_validator(mode="after")(_no_conflicts)
    return create_model(f"{kind.capitalize()}JobSpec", __base__=_Spec, __module__=__name__,
                        __validators__=validators, **fields)


if TYPE_CHECKING:  # to a type checker, a spec is a spec; its fields are known when it is built
    TeacherJobSpec = _Spec
    LabelJobSpec = _Spec
    TrainJobSpec = _Spec
else:
    TeacherJobSpec = _spec_from_config("teacher", TeacherTrainConfig)
    LabelJobSpec = _spec_from_config("label", LabelConfig)
    TrainJobSpec = _spec_from_config("train", TrainConfig)


SPECS: dict[str, type[_Spec]] = {"teacher": TeacherJobSpec, "label": LabelJobSpec, "train": TrainJobSpec}


