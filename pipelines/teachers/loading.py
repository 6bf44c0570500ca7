"""Loading a teacher: timm names, checkpoints (local or on a URL), class maps, and saving a checkpoint.

A teacher spec is ``NAME@PATH`` (a timm model name, optionally with its pretrained tag, and a local
checkpoint) or ``NAME`` (timm's pretrained weights from the Hugging Face hub or its local cache). A checkpoint is
one written by ``stillroom teacher train`` (model name, kwargs, class count and names, preprocessing, accuracy,
state dict), a plain state dict for the named model (``.pth``/``.pt``), or a ``model.safetensors`` as every timm
model on the hub ships it (its ``config.json`` beside it read for the preprocessing). The weight digest (sha256
of every tensor, by name) goes into the store's cache key.

Class counts: a teacher must predict the data set's classes. One trained on a superset (an ImageNet-1k teacher for
ImageNet-100) is taken only with an explicit class map (``read_class_map``): for each data set class, the
teacher's class index; its logits are those classes' logits, so its distribution is renormalised over them. A
stillroom checkpoint records its class names, and a data set whose names differ (order included) is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stillroom.pipelines.core import Location, UsageError, is_url, open_binary, write_atomically
from stillroom.pipelines.teachers.preprocess import Preprocess, _preprocess_from_cfg, with_overrides
from stillroom.pipelines.teachers.teacher import Teacher

CHECKPOINT_FORMAT = "stillroom-teacher/1"


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


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


def _pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's pretrained config of ``name`` (its tag's, else the default tag's); a clear error for a bad tag."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as e:  # timm: "Invalid pretrained tag (x) for arch."
        raise UsageError(f"teacher {name}: {e}") from None
    return cfg.to_dict() if cfg is not None else {}


def read_class_map(path: str, num_classes: int, class_names: Sequence[str] | None = None) -> tuple[int, ...]:
    """A class-map file: one line per data set class, in the data set's class order, each ``INDEX`` or
    ``NAME INDEX`` (the teacher's class index; ``#`` starts a comment). With names, they must be the data set's
    class names in its order."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UsageError(f"--class-map {path}: cannot read it ({e.strerror or e})") from None
    indices, names = [], []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        *name, index = line.split()
        if len(name) > 1 or not index.isdigit():
            raise UsageError(f"--class-map {path} line {number}: expected INDEX or NAME INDEX, got {raw.strip()!r}")
        indices.append(int(index))
        names.append(name[0] if name else None)
    if len(indices) != num_classes:
        raise UsageError(f"--class-map {path} maps {len(indices)} classes; the dataset has {num_classes}")
    if len(set(indices)) != len(indices):
        dup = next(i for i in indices if indices.count(i) > 1)
        raise UsageError(f"--class-map {path}: teacher class {dup} is given to two data set classes")
    if class_names is not None and any(n is not None for n in names):
        for i, (given, want) in enumerate(zip(names, class_names, strict=True)):
            if given != want:
                raise UsageError(f"--class-map {path}: line for data set class {i} names {given!r}, "
                                 f"the dataset's class {i} is {want!r}")
    return tuple(indices)


def _unreadable(path: str, error: Exception) -> str:
    """Why a teacher file is no checkpoint, in a person's words rather than torch's advice about ``weights_only``."""
    text = str(error)
    if path.endswith(".safetensors"):
        return f"teacher checkpoint {path} is not a safetensors file ({(text.splitlines() or [''])[0][:120]})"
    with open_binary(path) as f:
        head = f.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # torch.save writes a zip archive (a pickle before torch 1.6)
        return (f"teacher checkpoint {path} is not a checkpoint: not a file torch.save wrote (expected a stillroom "
                "teacher .pt, a timm .pth or .safetensors)")
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused:
        return (f"teacher checkpoint {path} holds pickled Python objects ({refused.group(1)}), which stillroom does "
                "not load (weights only): save the model's state_dict, or train it with `stillroom teacher train`")
    return f"teacher checkpoint {path} is not a checkpoint torch can read (damaged or cut: {type(error).__name__})"


def _read_checkpoint(path: str) -> tuple[Any, dict[str, Any]]:
    """The checkpoint's contents and the timm config found with it (a ``config.json`` beside a
    ``.safetensors``, as the hub lays a timm model out; empty when none). ``path`` is a local path or a URL
    (``s3://bucket/teacher.pt``)."""
    where = Location(path)
    if not where.is_file():
        raise UsageError(f"teacher checkpoint {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            ckpt: Any = load_safetensors(where.read_bytes())
        else:
            with open_binary(path) as f:
                ckpt = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or pickled objects weights_only refuses
        raise UsageError(_unreadable(path, e)) from None
    config: dict[str, Any] = {}
    beside = Location(path.rsplit("/", 1)[0] + "/config.json") if "/" in path else Location("config.json")
    if path.endswith(".safetensors") and beside.is_file():
        try:
            config = json.loads(beside.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"cannot read {beside} (the config beside {path}): {e}") from None
    elif isinstance(ckpt, dict) and isinstance(ckpt.get("pretrained_cfg"), dict):
        config = {"pretrained_cfg": ckpt["pretrained_cfg"]}
    return ckpt, config


def _classes_in(state: dict[str, Any], classifier: Any) -> int | None:
    """The class count a state dict's classifier predicts (its first classifier's weight rows), if it has one."""
    first = classifier[0] if isinstance(classifier, tuple | list) else classifier
    weight = state.get(f"{first}.weight") if first else None
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.ndim >= 2 else None


def _check_classes(spec: str, teacher_classes: int, where: str, num_classes: int | None,
                   class_map: tuple[int, ...] | None) -> None:
    if class_map is not None:
        if max(class_map) >= teacher_classes:
            raise UsageError(f"--class-map gives teacher class {max(class_map)}; teacher {spec} predicts "
                             f"{teacher_classes} classes ({where})")
        return
    if num_classes is not None and teacher_classes != num_classes:
        raise UsageError(f"teacher {spec} predicts {teacher_classes} classes ({where}); the dataset has {num_classes}. "
                         "A teacher of another label space gives meaningless labels; for a teacher trained on a "
                         "superset of the dataset's classes give --class-map FILE (for each dataset class, in "
                         "order, the teacher's class index)")


def load_teacher(spec: str, num_classes: int | None = None, device: str | torch.device = "cpu", *,
                 class_names: Sequence[str] | None = None, class_map: tuple[int, ...] | None = None,
                 preprocess: dict[str, Any] | None = None) -> Teacher:
    """Load ``NAME@PATH`` or ``NAME`` for a data set of ``num_classes`` classes named ``class_names`` (where
    known): refuse a teacher of another class count unless ``class_map`` (``read_class_map``) maps the data
    set's classes to its own, and a stillroom teacher whose recorded class names differ. ``preprocess``
    overrides fields of the teacher's preprocessing (``PREPROCESS_FIELDS``; None: keep)."""
    import timm

    name, path = parse_teacher_spec(spec)
    if not timm.is_model(name):
        raise UsageError(f"unknown model {name!r}: not a timm model name (see timm.list_models())")
    tagged = "." in name
    cfg = _pretrained_cfg(name)
    names: tuple[str, ...] | None = None
    if path is None:
        if not cfg or cfg.get("num_classes") is None:
            raise UsageError(f"timm has no pretrained weights for {name}: give a checkpoint as NAME@PATH")
        teacher_classes = int(cfg["num_classes"])
        # before any download: the weights are for this many classes (timm would drop the head for another count)
        _check_classes(spec, teacher_classes, "timm's pretrained_cfg num_classes", num_classes, class_map)
        try:
            model = _create(name, pretrained=True)
        except UsageError:
            raise
        except Exception as e:  # no hub here: say so plainly
            raise UsageError(f"cannot fetch pretrained weights for {name}: {type(e).__name__}: {e}. "
                             "Give a local checkpoint as NAME@PATH") from None
        kwargs: dict[str, Any] = {}
        in_chans = int(cfg.get("input_size", (3,))[0])
        pre = _preprocess_from_cfg(cfg, in_chans)
        source, origin = "pretrained", f"timm pretrained_cfg of {name if tagged else name + '.' + str(cfg.get('tag'))}"
        where = "timm's pretrained_cfg num_classes"
    else:
        ckpt, found = _read_checkpoint(path)
        if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
            if ckpt["model"] != name.split(".")[0]:
                raise UsageError(f"checkpoint {path} holds a {ckpt['model']}, not a {name}")
            kwargs = dict(ckpt["kwargs"])
            state = ckpt["state_dict"]
            checkpoint_pre: Preprocess | None = Preprocess.from_dict(ckpt["preprocess"])
            names = tuple(ckpt["class_names"]) if ckpt.get("class_names") is not None else None
            origin, where = "the stillroom checkpoint", "its stillroom checkpoint"
        else:
            state = ckpt
            if isinstance(ckpt, dict):  # a training script's checkpoint: timm's train.py, DeiT's
                state = next((ckpt[k] for k in ("state_dict", "model") if isinstance(ckpt.get(k), dict)), ckpt)
            if not isinstance(state, dict):
                raise UsageError(f"checkpoint {path} is neither a stillroom teacher checkpoint nor a state dict")
            classes = _classes_in(state, cfg.get("classifier"))
            kwargs = {"num_classes": classes or found.get("num_classes") or num_classes}
            kwargs = {k: v for k, v in kwargs.items() if v}
            checkpoint_pre = None
            where = "its classifier's weights" if classes else "the checkpoint"
        model = _create(name, pretrained=False, **kwargs)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            lines = str(e).strip().splitlines()
            raise UsageError(f"checkpoint {path} does not fit {name}: {' '.join(lines[:2])[:300]}") from None
        in_chans = int(kwargs.get("in_chans", 3))
        if checkpoint_pre is not None:
            pre = checkpoint_pre
        elif found.get("pretrained_cfg"):
            pre = _preprocess_from_cfg({**cfg, **found["pretrained_cfg"]}, in_chans)
            beside = "config.json beside it" if path.endswith(".safetensors") else "pretrained_cfg"
            origin = f"the checkpoint's timm config ({beside})"
        else:
            pre = _preprocess_from_cfg(cfg, in_chans)
            origin = (f"timm pretrained_cfg of the tag {name}" if tagged else
                      f"timm's default tag {name}.{cfg.get('tag')} (the checkpoint carries none: name its tag, "
                      "NAME.TAG@PATH, or set --teacher-mean/--teacher-std if it was trained otherwise)")
        source = str(path)
        teacher_classes = int(getattr(model, "num_classes", 0))
        _check_classes(spec, teacher_classes, where, num_classes, class_map)
    pre, overridden = with_overrides(pre, preprocess)
    if overridden:
        origin = f"options ({', '.join(overridden)}); the rest from {origin}"
    if names is not None and class_names is not None and class_map is None and tuple(class_names) != names:
        i = next((i for i, (a, b) in enumerate(zip(names, class_names, strict=False)) if a != b),
                 min(len(names), len(class_names)))
        raise UsageError(f"teacher {spec} was trained on classes named otherwise: its class {i} is "
                         f"{names[i] if i < len(names) else None!r}, the dataset's is "
                         f"{class_names[i] if i < len(class_names) else None!r} (names and order must match)")
    if names is not None and class_names is not None and class_map is not None:
        for i, t in enumerate(class_map):
            if names[t] != class_names[i]:
                raise UsageError(f"--class-map maps the dataset's class {i} ({class_names[i]!r}) to teacher class {t}, "
                                 f"which the teacher's checkpoint names {names[t]!r}")
    model.eval().requires_grad_(False)
    digest = weights_digest(model.state_dict())
    classes_out = len(class_map) if class_map is not None else teacher_classes
    return Teacher(name, model, pre, classes_out, digest, source, kwargs, class_map, teacher_classes, names,
                   origin).to(device)


def save_checkpoint(path: str | Path, name: str, model: nn.Module, kwargs: dict[str, Any], preprocess: Preprocess,
                    extra: dict[str, Any], class_names: Sequence[str] | None = None) -> None:
    """Write a teacher checkpoint the way ``load_teacher`` reads it (atomically), with the names of the classes
    it was trained on (its data set's, in label order) where they are known."""
    state = {"format": CHECKPOINT_FORMAT, "model": name, "kwargs": kwargs,
             "num_classes": int(kwargs.get("num_classes", 0)), "preprocess": preprocess.to_dict(),
             "class_names": list(class_names) if class_names is not None else None,
             "state_dict": model.state_dict(), **extra}
    if is_url(os.fspath(path)):  # one PUT: the object appears whole or not at all
        buf = io.BytesIO()
        torch.save(state, buf)
        Location(path).write_bytes(buf.getvalue())
    else:
        write_atomically(path, lambda tmp: torch.save(state, tmp))
