"""Student checkpoints and evaluation: top-1/top-5 of a student on a split, views un-augmented.

Images on disk are scored through timm's eval transform (``validate.py``'s: the shorter side resized to
``size / crop_pct`` with the student's interpolation, then a centre crop) with the crop_pct, interpolation and
mean/std the checkpoint records (``student.models.InputConfig``); in-memory data sets (Fashion-MNIST,
synthetic) are resized whole, bilinear, as they train. Across Ray Train ranks each rank scores every W-th
sample of the split, through its loader workers, and the hit counts are summed over the ranks.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stillroom.pipelines.core import Location, UsageError, open_binary, write_atomically
from stillroom.pipelines.data import DataError, Dataset, load_dataset
from stillroom.pipelines.training import eval_subset, topk_hits
from stillroom.pipelines.views import float_views
from stillroom.student.models import (
    LEGACY_INPUT,
    InputConfig,
    build_student,
    resolve_input_config,
    set_input_config,
    unwrap,
)

CHECKPOINT_FORMAT = "stillroom-student/1"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write a student checkpoint atomically (temporary file, then rename)."""
    write_atomically(path, lambda tmp: torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp))


def _torch_load(path: str | os.PathLike) -> Any:
    """``torch.load`` (tensors only) of a local file or a URL's object."""
    with open_binary(path) as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (a local path or a URL: ``s3://.../best.pt``); UsageError
    if it is missing or not one."""
    if not Location(path).is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        ckpt = _torch_load(path)
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
    set_input_config(model, checkpoint_input_config(ckpt))
    return model.eval(), ckpt


def checkpoint_input_config(ckpt: dict[str, Any]) -> InputConfig:
    """The input config a checkpoint records (``LEGACY_INPUT`` for one written before it was recorded)."""
    recorded = ckpt.get("input_config")
    return InputConfig.from_dict(recorded) if isinstance(recorded, dict) else LEGACY_INPUT


def load_init_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """``--init``: load pretrained student weights from a student checkpoint or a plain state dict (a local path
    or a URL)."""
    if not Location(path).is_file():
        raise UsageError(f"--init checkpoint {path} does not exist")
    try:
        ckpt = _torch_load(path)
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
    if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:  # a stillroom student: its own input
        set_input_config(model, checkpoint_input_config(ckpt))
    try:
        unwrap(model).load_state_dict(state)
    except RuntimeError as e:
        first = " ".join(str(e).strip().splitlines()[:2])[:300]
        raise UsageError(f"--init {path} does not fit the student: {first}") from None


class EvalSource:
    """The eval split's uint8 images for a DataLoader: ``__getitems__(ids)`` gives ``(images, labels)``. Images on
    disk come out at ``size`` through timm's eval transform; in-memory images at their own size (resized on the
    device, ``eval_batches``)."""

    def __init__(self, dataset: Dataset, size: int | None, input_config: InputConfig):
        self.dataset, self.size, self.input_config = dataset, size, input_config
        self._transform: Any = None
        if not dataset.in_memory:
            if size is None:
                raise UsageError(f"{dataset.spec} holds images of many sizes: evaluation needs an output size")
            from timm.data.transforms_factory import transforms_imagenet_eval

            self._transform = transforms_imagenet_eval(
                size, crop_pct=input_config.crop_pct, crop_mode=input_config.crop_mode,
                interpolation=input_config.interpolation, use_prefetcher=True)  # PIL -> uint8 (C, H, W)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([i])

    def __getitems__(self, ids: Any) -> tuple[torch.Tensor, torch.Tensor]:
        ids = np.asarray(ids, dtype=np.int64)
        labels = torch.from_numpy(np.asarray(self.dataset.labels[ids], dtype=np.int64))
        if self.dataset.in_memory:
            return self.dataset.read(ids), labels
        return torch.stack([self._transform(_rgb(data, where)) for data, where in self.dataset.encoded(ids)]), labels


def _rgb(data: bytes, where: str) -> Any:
    """A decoded RGB PIL image (CMYK, grayscale, palette files converted); DataError naming ``where``."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{where}: cannot decode ({str(e).splitlines()[0][:120]})") from None


def _collated(items: Any) -> Any:
    """The DataLoader's collate: ``__getitems__`` already made the batch."""
    return items


def eval_batches(dataset: Dataset, ids: np.ndarray, size: int | None, input_config: InputConfig,
                 batch_size: int, loader_workers: int, device: torch.device | str
                 ) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """``(student input, labels)`` batches of ``ids`` on ``device``: built by ``loader_workers`` processes (0: this
    one), finished there (float, in-memory images resized whole with bilinear, normalised)."""
    source = EvalSource(dataset, size, input_config)
    batches = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
    parts: Iterable[tuple[torch.Tensor, torch.Tensor]]
    if loader_workers == 0:
        parts = (source.__getitems__(b) for b in batches)
    else:
        import multiprocessing

        parts = torch.utils.data.DataLoader(
            cast(Any, source), batch_sampler=cast(Any, batches), collate_fn=_collated, num_workers=loader_workers,
            multiprocessing_context="fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    for images, labels in parts:
        x = float_views(images.to(device))
        if size is not None and x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        yield input_config.normalize(x), labels.to(device)


def eval_ids(n: int, limit: int | None, rank: int = 0, world_size: int = 1,
             labels: np.ndarray | None = None) -> np.ndarray:
    """The eval samples rank ``rank`` of ``world_size`` scores: every W-th of all, or of ``limit`` of them (a
    fixed class-balanced subset, ``eval_subset``, when ``labels`` are given; else the first ``limit``)."""
    if limit is None or limit >= n:
        return np.arange(rank, n, world_size, dtype=np.int64)
    scored = eval_subset(labels, limit) if labels is not None else np.arange(limit, dtype=np.int64)
    return scored[rank::world_size]


@torch.no_grad()
def buffers_from_rank0(model: nn.Module, rank: int, world_size: int,
                       all_reduce_mean: Callable[[torch.Tensor], None]) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics), as DDP does at its next forward: after the last
    training step each rank's hold its own batch's update, and all ranks must score the weights rank 0 saves.
    A broadcast made of the one collective ``Distributed`` has: rank 0's values, zeros elsewhere, summed."""
    for buf in model.buffers():
        t = buf.detach().to(torch.float64) if rank == 0 else torch.zeros(buf.shape, dtype=torch.float64,
                                                                         device=buf.device)
        all_reduce_mean(t)
        buf.copy_((t * world_size).to(buf.dtype))


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, img_size: int | None, batch_size: int = 512,
             limit: int | None = None, device: torch.device | str = "cpu", *, rank: int = 0, world_size: int = 1,
             all_reduce_mean: Callable[[torch.Tensor], None] | None = None, loader_workers: int = 0,
             input_config: InputConfig | None = None) -> dict[str, float]:
    """Top-1 and top-5 accuracy (top-k with k = min(5, classes)) of ``model`` in eval mode; a two-head
    student is scored on the mean of its heads (timm's eval behaviour).

    With ``world_size > 1`` every rank calls it: each scores its share (``eval_ids``) and the hit counts are
    summed over the ranks with ``all_reduce_mean`` (times the world size: counts in float64 are exact), so every
    rank returns the whole split's accuracy. ``limit`` scores a fixed class-balanced subset of that many samples
    (``eval_subset``). ``input_config`` defaults to the student's own (``resolve_input_config``).
    """
    inner = unwrap(model)
    if world_size > 1:
        if all_reduce_mean is None:
            raise ValueError("evaluate across ranks needs all_reduce_mean")
        buffers_from_rank0(inner, rank, world_size, all_reduce_mean)
    was_training = inner.training
    inner.eval()
    cfg = input_config or resolve_input_config(inner, dataset.channels)
    n = len(eval_ids(len(dataset), limit, labels=dataset.labels))
    if n < 1:
        raise UsageError("the eval split is empty")
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits
    mine = eval_ids(len(dataset), limit, rank, world_size, dataset.labels)
    for x, y in eval_batches(dataset, mine, img_size, cfg, batch_size, loader_workers, device):
        counts += torch.stack(topk_hits(inner(x), y)).to(counts.dtype)
    if world_size > 1:
        cast(Callable[[torch.Tensor], None], all_reduce_mean)(counts)
        counts.mul_(world_size)
    inner.train(was_training)
    top1, top5 = (float(v) / n for v in counts.round().tolist())
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
    result = evaluate(model, ds, ckpt["img_size"], batch_size, input_config=checkpoint_input_config(ckpt))
    return {**result, "samples": len(ds), "checkpoint": str(path), "epoch": ckpt.get("epoch")}
