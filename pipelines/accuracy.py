"""Top-1 and top-5 accuracy over a split, batch by batch: one definition for teachers and students."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


@torch.no_grad()
def top1_top5(logits_of: Callable[[np.ndarray], torch.Tensor], labels: np.ndarray, n: int,
              batch_size: int = 512) -> tuple[float, float]:
    """The fractions of samples ``0 .. n - 1`` whose label is the argmax of ``logits_of(ids)`` (top-1) and among
    its ``k = min(5, classes)`` highest (top-5), scored ``batch_size`` samples at a time."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"n={n}, batch_size={batch_size}: expected both >= 1")
    hits1 = hits5 = 0
    for start in range(0, n, batch_size):
        ids = np.arange(start, min(start + batch_size, n))
        logits = logits_of(ids)
        h1, h5 = topk_hits(logits, torch.from_numpy(labels[ids]).to(logits.device))
        hits1, hits5 = hits1 + int(h1), hits5 + int(h5)
    return hits1 / n, hits5 / n


def topk_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How many of the batch's labels are the argmax of ``logits`` (top-1) and among its ``k = min(5, classes)``
    highest (top-5), as 0-d tensors on the logits' device (no host synchronisation)."""
    best = logits.topk(min(5, logits.shape[1]), dim=-1).indices
    return (best[:, 0] == labels).sum(), (best == labels[:, None]).any(dim=1).sum()
