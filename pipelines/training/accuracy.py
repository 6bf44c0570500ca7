"""Top-1 and top-5 accuracy over a split (or a class-balanced subset of it), batch by batch: one definition for
teachers and students."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

EVAL_SUBSET_SEED = 0  # every run scores the same subset, so runs compare


@torch.no_grad()
def top1_top5(logits_of: Callable[[np.ndarray], torch.Tensor], labels: np.ndarray, n: int | np.ndarray,
              batch_size: int = 512) -> tuple[float, float]:
    """The fractions of the scored samples (``0 .. n - 1``, or the ids ``n`` when it is an array) whose label is
    the argmax of ``logits_of(ids)`` (top-1) and among its ``k = min(5, classes)`` highest (top-5), scored
    ``batch_size`` samples at a time."""
    scored = np.arange(n) if isinstance(n, (int, np.integer)) else np.asarray(n, dtype=np.int64)
    if len(scored) < 1 or batch_size < 1:
        raise ValueError(f"{len(scored)} samples, batch_size={batch_size}: expected both >= 1")
    hits1 = hits5 = 0
    for start in range(0, len(scored), batch_size):
        ids = scored[start : start + batch_size]
        logits = logits_of(ids)
        h1, h5 = topk_hits(logits, torch.from_numpy(labels[ids]).to(logits.device))
        hits1, hits5 = hits1 + int(h1), hits5 + int(h5)
    return hits1 / len(scored), hits5 / len(scored)


def topk_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How many of the batch's labels are the argmax of ``logits`` (top-1) and among its ``k = min(5, classes)``
    highest (top-5), as 0-d tensors on the logits' device (no host synchronisation)."""
    best = logits.topk(min(5, logits.shape[1]), dim=-1).indices
    return (best[:, 0] == labels).sum(), (best == labels[:, None]).any(dim=1).sum()


def eval_subset(labels: np.ndarray, limit: int, seed: int = EVAL_SUBSET_SEED) -> np.ndarray:
    """``limit`` sample ids (sorted) balanced over the classes, fixed by ``seed``: every class gives one sample
    (drawn at random within it) before any gives a second; which classes give one more when ``limit`` is not a
    multiple of the classes, and which samples, are drawn at random; a class that runs out leaves its turn to
    the others. On a split sorted by class the first ``limit`` ids would be its first classes alone."""
    labels = np.asarray(labels, dtype=np.int64)
    if limit >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(labels))
    by_class = shuffled[np.argsort(labels[shuffled], kind="stable")]  # each class's ids in a random order
    sorted_labels = labels[by_class]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    rank = np.arange(len(labels)) - np.repeat(starts, np.diff(np.r_[starts, len(labels)]))
    turn = rng.permutation(int(labels.max()) + 1)  # the classes' order within each round
    chosen = by_class[np.argsort(rank * len(turn) + turn[sorted_labels], kind="stable")[:limit]]
    return np.sort(chosen)
