"""What a teacher's logits become in the store: top-k, the log-sum-exp and the tail, sampled classes, pooled
feature maps, and the label-quality sums.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from stillroom.pipelines.store import QualitySums
from stillroom.pipelines.teachers import (
    as_feature_map,
)
from stillroom.pipelines.views import (
    Recipe,
    stream_key,
    uniforms,
)


def topk_arrays(logits: torch.Tensor, k: int) -> dict[str, np.ndarray]:
    """Top-k indices (best first) and logits (float16), the exact log-sum-exp over all classes (``lse``), the
    log-sum-exp over the classes outside the top-k (``tail_lse``; ``-inf`` when ``k = C``), both float32 and
    computed from the full float32 logits, and the argmax.

    ``tail_lse`` is what rebuilding the tempered teacher needs: ``1 - sum_topk exp(t - lse)`` from float16
    logits is below float16's rounding for a confident teacher. For an ensemble, ``logits`` are
    ``ensemble_log_probs``, so ``tail_lse - lse`` is the log of the averaged probabilities' tail mass.
    """
    logits = logits.float()
    values, idx = logits.topk(k, dim=-1)
    tail = logits.scatter(-1, idx, float("-inf"))
    return {"topk_idx": idx.cpu().numpy(), "topk_logit": values.cpu().numpy().astype(np.float16),
            "lse": torch.logsumexp(logits, -1).cpu().numpy().astype(np.float32),
            "tail_lse": torch.logsumexp(tail, -1).cpu().numpy().astype(np.float32),
            "hard": idx[:, 0].cpu().numpy()}


def quality_sums(logits: torch.Tensor, truth: np.ndarray, crop_area: np.ndarray, k: int) -> QualitySums:
    """What ``stillroom store inspect`` reports about the labels, as sums over views (added up per piece and
    per seed, turned into means by ``pipelines.store.quality_report``), overall and by the crop's area
    (fraction of the image; ``area<0.5`` and ``area>=0.5``):

    ``views``; ``top1``: the teacher's argmax is the ground truth; ``in_topk``: the ground truth is among the
    stored top-k; ``entropy``: of the full teacher distribution, in nats; ``topk_mass``: the probability the
    stored top-k holds. A mixed view (mixup, cutmix) counts its own sample's class as the ground truth.
    """
    logits = logits.float()
    log_p = logits.log_softmax(-1)
    y = torch.from_numpy(np.asarray(truth, dtype=np.int64)).to(logits.device)
    top = logits.topk(k, dim=-1).indices
    per_view = {
        "top1": (top[:, 0] == y).double(),
        "in_topk": (top == y[:, None]).any(1).double(),
        "entropy": -(log_p.exp() * log_p).nan_to_num().sum(-1).double(),
        "topk_mass": log_p.gather(1, top).exp().sum(-1).double(),
    }
    small = torch.from_numpy(np.asarray(crop_area) < 0.5).to(logits.device)
    groups = {"all": torch.ones_like(small), "area<0.5": small, "area>=0.5": ~small}
    # the 15 sums in one tensor, brought to the host at once (one synchronisation on CUDA, not 15)
    sums = torch.stack([torch.stack([rows.sum().double(), *(v[rows].sum() for v in per_view.values())])
                        for rows in groups.values()]).tolist()
    return {group: dict(zip(("views", *per_view), row, strict=True)) for group, row in zip(groups, sums, strict=True)}


def sample_classes(logits: torch.Tensor, recipe: Recipe, seed: int, ids: np.ndarray, m: int) -> np.ndarray:
    """``m`` classes per view drawn with replacement from softmax(logits), by inverse CDF on uniforms from a
    counter-based generator keyed by the view (recipe, seed, sample id): the same view draws the same classes."""
    probs = logits.float().softmax(-1).cpu().double()
    cdf = probs.cumsum(-1)
    cdf[:, -1] = 1.0
    u = torch.from_numpy(uniforms(stream_key(recipe, seed, "sampled"), ids, m))
    return torch.searchsorted(cdf, u).clamp_max(probs.shape[1] - 1).numpy()


def pool_features(fmap: torch.Tensor, grid: int) -> torch.Tensor:
    """A teacher feature map ``(B, C, H, W)`` (or ViT tokens ``(B, N, C)``) average-pooled to ``grid x grid``."""
    return F.adaptive_avg_pool2d(as_feature_map(fmap).float(), grid)


def blank_rows(arrays: dict[str, np.ndarray], rows: np.ndarray) -> None:
    """What the rows of views left out under ``,bad=skip`` (an image that failed to decode) hold, in place:
    class indices -1 (an index no gather takes quietly), logits and feature maps 0, log-sum-exps NaN; the view
    parameters stay (they were drawn, never decoded). The store's record of skipped ids says which rows these are;
    no label of a view that was never seen is written."""
    for name, a in arrays.items():
        if name == "view":
            continue
        if name.endswith(("topk_idx", "hard", "sampled")):
            a[rows] = -1
        elif name.endswith("lse"):
            a[rows] = np.nan
        else:
            a[rows] = 0
