"""ImageNet's shape without images: 1,281,167 ids sorted by class into 1,000 classes of 732 to 1,300 samples."""

from __future__ import annotations

import numpy as np

IMAGENET_TRAIN = 1_281_167
IMAGENET_CLASSES = 1000


def class_sorted_labels(n: int = IMAGENET_TRAIN, classes: int = IMAGENET_CLASSES, seed: int = 0) -> np.ndarray:
    """``(n,)`` labels, sorted: class sizes vary as ImageNet's do (its smallest train class has 732 images)."""
    sizes = np.random.default_rng(seed).integers(732, 1301, classes).astype(np.float64)
    sizes = np.floor(sizes * n / sizes.sum()).astype(np.int64)
    sizes[: n - sizes.sum()] += 1
    return np.repeat(np.arange(classes), sizes)


def distinct_per_batch(labels: np.ndarray, order: np.ndarray, batch: int) -> float:
    """The mean number of distinct classes in the full batches of ``order``."""
    full = len(order) // batch * batch
    by_batch = np.sort(labels[order[:full]].reshape(-1, batch), axis=1)
    return float(1 + (np.diff(by_batch, axis=1) != 0).sum(axis=1).mean())
