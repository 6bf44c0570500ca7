"""Student checkpoints and evaluation: top-1/top-5 of a student on a split, views un-augmented."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.accuracy import eval_subset, top1_top5
from pipelines.atomic import write_atomically
from pipelines.datasets import Dataset, load_dataset
from pipelines.errors import UsageError
from pipelines.views import eval_views
from student.models import build_student, normalize, unwrap

CHECKPOINT_FORMAT = "stillroom-student/1"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write a student checkpoint atomically (temporary file, then rename)."""
    write_atomically(path, lambda tmp: torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp))


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; UsageError if it is missing or not one."""
    if not Path(path).is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file (a JSON, a truncated file) or one holding pickled objects
        raise UsageError(f"{path} is not a stillroom student checkpoint (the RUN_DIR/last.pt that "
                         f"`stillroom train` writes): torch cannot read it ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a stillroom student checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def load_student(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The student of a checkpoint, in eval mode, and the checkpoint's record."""
    ckpt = read_checkpoint(path)
    model = build_student(ckpt["student"], ckpt["num_classes"], ckpt["in_chans"], ckpt["img_size"],
                          ckpt.get("student_kwargs", {}))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def load_init_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """``--init``: load pretrained student weights from a student checkpoint or a plain state dict."""
    if not Path(path).is_file():
        raise UsageError(f"--init checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one holding pickled objects that weights_only refuses
        raise UsageError(f"--init {path} is not a checkpoint or state dict torch can read "
                         f"({type(e).__name__})") from None
    state = ckpt
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict"):
            if isinstance(ckpt.get(key), dict):
                state = ckpt[key]
                break
    if not isinstance(state, dict):
        raise UsageError(f"--init {path} holds no state dict")
    try:
        unwrap(model).load_state_dict(state)
    except RuntimeError as e:
        first = " ".join(str(e).strip().splitlines()[:2])[:300]
        raise UsageError(f"--init {path} does not fit the student: {first}") from None


def eval_inputs(dataset: Dataset, ids: np.ndarray, img_size: int) -> torch.Tensor:
    """Un-augmented images in [0, 1] at the student's size (images on disk: ``imagenet-eval`` at that size)."""
    return eval_views(dataset, ids, img_size)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, img_size: int, batch_size: int = 512,
             limit: int | None = None, device: torch.device | str = "cpu") -> dict[str, float]:
    """Top-1 and top-5 accuracy (top-k with k = min(5, classes)) of ``model`` in eval mode; a two-head
    student is scored on the mean of its heads (timm's eval behaviour). ``limit`` scores a fixed class-balanced
    subset of that many samples (``eval_subset``)."""
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    scored = len(dataset) if limit is None else eval_subset(dataset.labels, limit)
    top1, top5 = top1_top5(lambda ids: inner(normalize(eval_inputs(dataset, ids, img_size).to(device))),
                           dataset.labels, scored, batch_size)
    inner.train(was_training)
    return {"top1": round(top1, 6), "top5": round(top5, 6)}


def evaluate_checkpoint(path: str | os.PathLike, dataset: str, split: str = "test", data_root: str | None = None,
                        batch_size: int = 512) -> dict[str, Any]:
    """``stillroom eval``: score a student checkpoint on ``dataset``/``split``."""
    model, ckpt = load_student(path)
    ds = load_dataset(dataset, split, data_root)
    if ds.num_classes != ckpt["num_classes"]:
        raise UsageError(f"checkpoint {path} predicts {ckpt['num_classes']} classes; {dataset} has {ds.num_classes}")
    if ds.channels != ckpt["in_chans"]:
        raise UsageError(f"checkpoint {path} takes {ckpt['in_chans']}-channel images; {dataset} has "
                         f"{ds.channels}")
    result = evaluate(model, ds, ckpt["img_size"], batch_size)
    return {**result, "samples": len(ds), "checkpoint": str(path), "epoch": ckpt.get("epoch")}
