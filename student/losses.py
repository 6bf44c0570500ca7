"""Distillation losses: plain functions of tensors, each with its paper's formula.

Soft targets are rebuilt from what the label store holds (top-k logits, the log-sum-exp over all classes,
the argmax, classes sampled from the teacher), then fed to one of:

- ``soft_targets_from_topk``: FKD's rebuild of the teacher distribution from top-k (optionally tempered).
- ``soft_cross_entropy``: ``-sum_c p_c log softmax(s/T)_c``, mean over the batch.
- ``kd_loss``: Hinton KD, ``(1-a) CE(s, y) + a T^2 KL(p_T || softmax(s/T))``.
- ``deit_soft_loss``: DeiT soft distillation (the same formula as ``kd_loss``).
- ``deit_hard_loss``: DeiT hard distillation, ``0.5 CE(s_cls, y) + 0.5 CE(s_dist, argmax t)``.
- ``unbiased_sampled_ce``: the unbiased Monte-Carlo estimate of the soft cross-entropy from sampled classes.
- ``LogitDiscriminator`` and ``mealv2_losses``: MEAL V2's soft cross-entropy and adversarial terms.
- ``TargetAwareTransformer`` and ``tat_loss``: TaT one-to-many feature distillation (full, patch, anchor).

``LOSS_NAMES`` lists the loss names the command line accepts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOSS_NAMES = ("ce", "kd", "deit-soft", "deit-hard", "mealv2", "sampled", "tat")
TAT_VARIANTS = ("full", "patch", "anchor")


# -- input checks --------------------------------------------------------------------------------------


def _check_temperature(T: float) -> None:
    if not T > 0:
        raise ValueError(f"temperature T={T}: expected T > 0")


def _check_logits(name: str, logits: torch.Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"{name} of shape {tuple(logits.shape)}: expected (B, C)")


def _check_probs(logits: torch.Tensor, probs: torch.Tensor) -> None:
    _check_logits("student_logits", logits)
    if probs.shape != logits.shape:
        raise ValueError(f"target_probs of shape {tuple(probs.shape)}: expected the student's shape "
                         f"{tuple(logits.shape)}")


def _check_labels(name: str, labels: torch.Tensor, logits: torch.Tensor) -> None:
    """Class indices ``(B,)`` or class probabilities ``(B, C)`` (mixed views), as ``F.cross_entropy`` takes."""
    if labels.shape != logits.shape[:1] and labels.shape != logits.shape:
        raise ValueError(f"{name} of shape {tuple(labels.shape)}: expected class indices ({logits.shape[0]},) "
                         f"or class probabilities {tuple(logits.shape)}")
    if labels.ndim == 1 and labels.is_floating_point():
        raise ValueError(f"{name} are {labels.dtype}: expected integer class indices")


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: expected 0 <= alpha <= 1")


# -- soft targets and cross-entropies ------------------------------------------------------------------


def soft_targets_from_topk(topk_idx: torch.Tensor, topk_logit: torch.Tensor, lse: torch.Tensor,
                           num_classes: int, T: float = 1.0) -> torch.Tensor:
    """The teacher distribution ``(B, C)`` rebuilt from its stored top-k (FKD, Shen & Xing 2022).

    For a top-k class ``c``: ``q_c = exp(t_c - lse)``, the teacher's exact probability (``lse`` is the
    log-sum-exp over all ``C`` teacher logits). Every other class gets an equal share of the missing mass:
    ``q_c = max(0, 1 - sum_topk q) / (C - k)``. Each row is renormalised to sum to 1, which only matters
    when rounding (float16 logits) pushes the top-k mass past 1.

    For ``T != 1`` the rebuilt distribution is tempered: ``q_T = q^(1/T) / sum(q^(1/T))``. Since
    ``p^(1/T)`` is proportional to ``exp(t/T)``, this is exactly ``softmax(t/T)`` when ``q`` is the full
    teacher distribution; here it is an approximation, because only the top-k logits are stored and the
    tail is treated as if every missing class had the same logit.
    """
    _check_temperature(T)
    if topk_idx.ndim != 2 or topk_logit.shape != topk_idx.shape:
        raise ValueError(f"topk_idx {tuple(topk_idx.shape)} and topk_logit {tuple(topk_logit.shape)}: "
                         "expected both (B, k)")
    if lse.shape != topk_idx.shape[:1]:
        raise ValueError(f"lse of shape {tuple(lse.shape)}: expected ({topk_idx.shape[0]},)")
    if topk_idx.is_floating_point():
        raise ValueError(f"topk_idx is {topk_idx.dtype}: expected integer class indices")
    k = topk_idx.shape[1]
    if not k <= num_classes:
        raise ValueError(f"num_classes={num_classes} with top-{k} labels: expected num_classes >= k")
    if topk_idx.numel() and (int(topk_idx.min()) < 0 or int(topk_idx.max()) >= num_classes):
        raise ValueError(f"topk_idx holds classes outside [0, {num_classes}): expected indices of "
                         f"{num_classes} classes")
    p_top = torch.exp(topk_logit.float() - lse.float()[:, None])
    missing = (1.0 - p_top.sum(dim=1, keepdim=True)).clamp(min=0.0)
    fill = missing / (num_classes - k) if k < num_classes else torch.zeros_like(missing)
    q = fill.repeat(1, num_classes).scatter(1, topk_idx.long(), p_top)
    if T != 1.0:
        q = q.pow(1.0 / T)
    return q / q.sum(dim=1, keepdim=True)


def soft_cross_entropy(student_logits: torch.Tensor, target_probs: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """``mean_b ( -sum_c p_bc log softmax(s_b / T)_c )``: cross-entropy with soft targets ``p``."""
    _check_temperature(T)
    _check_probs(student_logits, target_probs)
    return -(target_probs * F.log_softmax(student_logits / T, dim=1)).sum(dim=1).mean()


def kd_loss(student_logits: torch.Tensor, target_probs: torch.Tensor, labels: torch.Tensor,
            alpha: float = 0.5, T: float = 4.0) -> torch.Tensor:
    """Hinton KD: ``(1 - alpha) CE(s, y) + alpha T^2 KL(p_T || softmax(s / T))``.

    ``target_probs`` are the teacher's probabilities already at temperature ``T`` (``p_T``, e.g.
    ``soft_targets_from_topk(..., T=T)``); ``labels`` are class indices ``(B,)`` or, for mixed views,
    class probabilities ``(B, C)``. The KL is summed over classes and averaged over the batch
    (``F.kl_div(..., reduction="batchmean")``); classes with ``p = 0`` contribute 0. The ``T^2`` keeps the
    soft term's gradients on the scale of the hard term's as ``T`` changes.
    """
    _check_temperature(T)
    _check_alpha(alpha)
    _check_probs(student_logits, target_probs)
    _check_labels("labels", labels, student_logits)
    ce = F.cross_entropy(student_logits, labels)
    kl = F.kl_div(F.log_softmax(student_logits / T, dim=1), target_probs, reduction="batchmean")
    return (1 - alpha) * ce + alpha * T * T * kl


def deit_soft_loss(student_logits: torch.Tensor, target_probs: torch.Tensor, labels: torch.Tensor,
                   alpha: float = 0.5, T: float = 1.0) -> torch.Tensor:
    """DeiT soft distillation (Touvron et al. 2021):
    ``(1 - a) CE(s, y) + a T^2 KL(softmax(t / T) || softmax(s / T))``.

    ``target_probs`` is ``softmax(t / T)`` (rebuilt from the store). This is ``kd_loss`` with DeiT's default
    ``T = 1``. A two-head student takes the ground-truth term on its class head and calls this with
    ``alpha=1`` on its distillation head.
    """
    return kd_loss(student_logits, target_probs, labels, alpha=alpha, T=T)


def deit_hard_loss(cls_logits: torch.Tensor, dist_logits: torch.Tensor, labels: torch.Tensor,
                   teacher_hard: torch.Tensor) -> torch.Tensor:
    """DeiT hard distillation: ``0.5 CE(s_cls, y) + 0.5 CE(s_dist, argmax t)``.

    ``cls_logits`` and ``dist_logits`` are the class and distillation heads (a one-head student passes its
    head twice); ``labels`` are class indices ``(B,)`` or class probabilities ``(B, C)``; ``teacher_hard``
    is the teacher's argmax ``(B,)``.
    """
    _check_logits("cls_logits", cls_logits)
    if dist_logits.shape != cls_logits.shape:
        raise ValueError(f"dist_logits of shape {tuple(dist_logits.shape)}: expected the class head's shape "
                         f"{tuple(cls_logits.shape)}")
    _check_labels("labels", labels, cls_logits)
    if teacher_hard.shape != cls_logits.shape[:1] or teacher_hard.is_floating_point():
        raise ValueError(f"teacher_hard of shape {tuple(teacher_hard.shape)} ({teacher_hard.dtype}): expected "
                         f"integer class indices ({cls_logits.shape[0]},)")
    return 0.5 * F.cross_entropy(cls_logits, labels) + 0.5 * F.cross_entropy(dist_logits, teacher_hard.long())


def unbiased_sampled_ce(student_logits: torch.Tensor, sampled: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """The unbiased Monte-Carlo estimate of the soft cross-entropy from classes sampled from the teacher.

    With ``c_1..c_m`` drawn with replacement from the teacher distribution ``p`` and
    ``q = softmax(s / T)``: ``mean_b ( -(1/m) sum_j log q_{c_j} )``.

    Unbiased: each draw has ``E_{c~p}[-log q_c] = -sum_c p_c log q_c``, the soft cross-entropy, and an
    average of ``m`` such draws has the same expectation (its variance falls as ``1/m``); so does its
    gradient, since ``p`` does not depend on the student. A top-k label is biased instead: it replaces
    ``p`` by a ``p~`` that guesses the tail (uniform, or renormalised top-k), so its loss is off by
    ``sum_c (p~_c - p_c) log q_c`` however many samples are seen. The draws come from the teacher at
    ``T = 1``; ``T`` only tempers the student.
    """
    _check_temperature(T)
    _check_logits("student_logits", student_logits)
    if sampled.ndim != 2 or sampled.shape[0] != student_logits.shape[0] or sampled.shape[1] == 0:
        raise ValueError(f"sampled of shape {tuple(sampled.shape)}: expected ({student_logits.shape[0]}, m) "
                         "with m >= 1")
    if sampled.is_floating_point():
        raise ValueError(f"sampled is {sampled.dtype}: expected integer class indices")
    C = student_logits.shape[1]
    if int(sampled.min()) < 0 or int(sampled.max()) >= C:
        raise ValueError(f"sampled holds classes outside [0, {C}): expected indices of the student's {C} classes")
    log_q = F.log_softmax(student_logits / T, dim=1)
    return -log_q.gather(1, sampled.long()).mean(dim=1).mean()


# -- MEAL V2 -------------------------------------------------------------------------------------------


class LogitDiscriminator(nn.Module):
    """MEAL V2's discriminator: 3 fully connected layers on a class-score vector, ``C -> hidden -> hidden -> 1``
    with LeakyReLU(0.2); returns one logit per sample ``(B,)`` (high: looks like the teacher)."""

    def __init__(self, num_classes: int, hidden: int = 256):
        super().__init__()
        if num_classes < 1 or hidden < 1:
            raise ValueError(f"num_classes={num_classes}, hidden={hidden}: expected both >= 1")
        self.num_classes = num_classes
        self.net = nn.Sequential(
            nn.Linear(num_classes, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        if scores.ndim != 2 or scores.shape[1] != self.num_classes:
            raise ValueError(f"discriminator input of shape {tuple(scores.shape)}: expected (B, {self.num_classes})")
        return self.net(scores).squeeze(1)


def mealv2_losses(student_logits: torch.Tensor, target_probs: torch.Tensor,
                  discriminator: nn.Module | None) -> dict[str, torch.Tensor]:
    """MEAL V2 (Shen & Savvides 2020): the student's and the discriminator's terms, by name.

    With ``p`` the (ensemble-averaged) teacher probabilities, ``q = softmax(s)`` and ``D`` the
    discriminator (a logit per sample, BCE = binary cross-entropy with logits, means over the batch):

    - ``"soft_ce"``: ``-sum_c p_c log q_c``, the soft cross-entropy (no ground truth).
    - ``"adv"``: ``BCE(D(q), 1)``, the generator side: the student tries to look like the teacher.
    - ``"disc"``: ``(BCE(D(p), 1) + BCE(D(q.detach()), 0)) / 2``, the discriminator's loss.

    The discriminator sees probabilities, for the teacher and the student alike: the store holds the
    teacher only as probabilities (its tail rebuilt evenly), and on a log scale that flat tail alone would
    give the teacher away. The student minimises ``soft_ce + adv_weight * adv`` over its own parameters
    and the discriminator minimises ``disc`` over its own (``adv`` also reaches the discriminator's
    parameters; the caller restricts each backward to its parameters).
    """
    if discriminator is None:
        raise ValueError("mealv2_losses got no discriminator: expected a LogitDiscriminator")
    _check_probs(student_logits, target_probs)
    q = F.softmax(student_logits, dim=1)
    p = target_probs.detach().to(q.dtype)
    real, fake = discriminator(p), discriminator(q.detach())
    disc = 0.5 * (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                  + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    fooled = discriminator(q)
    return {
        "soft_ce": soft_cross_entropy(student_logits, p),
        "adv": F.binary_cross_entropy_with_logits(fooled, torch.ones_like(fooled)),
        "disc": disc,
    }


# -- TaT -----------------------------------------------------------------------------------------------


class TargetAwareTransformer(nn.Module):
    """TaT (Lin et al., CVPR 2022): the student's feature map re-assembled one-to-many, then an L2 loss.

    ``forward(f_s, f_t)`` takes maps ``(B, C_s, H_s, W_s)`` and ``(B, C_t, H, W)``. The student map is
    average-pooled onto the teacher's grid if the grids differ (``F.adaptive_avg_pool2d``; a smaller
    student map is repeated, not interpolated) and, if ``C_s != C_t``, projected to ``C_t`` channels by a
    1x1 convolution. Flattened to ``(B, N, C)`` with ``N = H W``::

        q = theta(f_s)   k = phi(f_t)   v = g(f_s)          (1x1 convolutions; theta, phi: C_t -> d)
        f_s' = softmax(q k^T / sqrt(d), dim=-1) v           (each student position: a mix of all N)
        loss = mean_b (1/N) sum_{i,c} (f_s' - f_t)_{bic}^2

    The loss is the squared L2 distance per position (summed over channels), averaged over positions and
    the batch, so it does not grow with the size of the map. ``d = embed_dim`` (default ``C_t``).
    """

    def __init__(self, student_channels: int, teacher_channels: int, embed_dim: int | None = None):
        super().__init__()
        d = embed_dim if embed_dim is not None else teacher_channels
        if min(student_channels, teacher_channels, d) < 1:
            raise ValueError(f"student_channels={student_channels}, teacher_channels={teacher_channels}, "
                             f"embed_dim={d}: expected all >= 1")
        self.student_channels, self.teacher_channels, self.embed_dim = student_channels, teacher_channels, d
        self.proj: nn.Module = (nn.Identity() if student_channels == teacher_channels
                                else nn.Conv2d(student_channels, teacher_channels, 1, bias=False))
        self.query = nn.Conv2d(teacher_channels, d, 1, bias=False)  # theta, on the student
        self.key = nn.Conv2d(teacher_channels, d, 1, bias=False)  # phi, on the teacher
        self.value = nn.Conv2d(teacher_channels, teacher_channels, 1, bias=False)  # g, on the student

    def check_maps(self, f_s: torch.Tensor, f_t: torch.Tensor) -> None:
        if f_s.ndim != 4 or f_t.ndim != 4 or f_s.shape[0] != f_t.shape[0]:
            raise ValueError(f"feature maps {tuple(f_s.shape)} (student) and {tuple(f_t.shape)} (teacher): "
                             "expected (B, C, H, W) each with the same B")
        if f_s.shape[1] != self.student_channels or f_t.shape[1] != self.teacher_channels:
            raise ValueError(f"feature maps with {f_s.shape[1]} (student) and {f_t.shape[1]} (teacher) channels: "
                             f"expected {self.student_channels} and {self.teacher_channels}")

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        self.check_maps(f_s, f_t)
        f_t = f_t.to(f_s.dtype)
        if f_s.shape[2:] != f_t.shape[2:]:
            f_s = F.adaptive_avg_pool2d(f_s, (f_t.shape[2], f_t.shape[3]))
        f_s = self.proj(f_s)
        q = self.query(f_s).flatten(2).transpose(1, 2)  # (B, N, d)
        k = self.key(f_t).flatten(2).transpose(1, 2)  # (B, N, d)
        v = self.value(f_s).flatten(2).transpose(1, 2)  # (B, N, C_t)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(self.embed_dim), dim=-1)  # (B, N, N)
        target = f_t.flatten(2).transpose(1, 2)
        return ((attn @ v - target) ** 2).sum(dim=2).mean()


def _patches(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B * groups^2, C, H / groups, W / groups)``: the spatial patches as a batch."""
    B, C, H, W = x.shape
    h, w = H // groups, W // groups
    x = x.reshape(B, C, groups, h, groups, w).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B * groups * groups, C, h, w)


def tat_loss(f_s: torch.Tensor, f_t: torch.Tensor, module: nn.Module | None, variant: str = "full",
             groups: int = 2, anchors: int = 2) -> torch.Tensor:
    """TaT feature distillation of the student map ``f_s`` onto the teacher map ``f_t`` through ``module``
    (a ``TargetAwareTransformer``), in one of three variants:

    - ``"full"``: one-to-many matching over all ``H W`` positions (cost ``(H W)^2``).
    - ``"patch"``: patch-group distillation: the map is cut into ``groups x groups`` patches of
      ``H/groups x W/groups`` and each patch is matched on its own (each position mixes only its patch's
      positions); the loss is the mean over patches. ``H`` and ``W`` must be divisible by ``groups``.
    - ``"anchor"``: anchor-point distillation: both maps are average-pooled to ``anchors x anchors``
      (``F.adaptive_avg_pool2d``) and matched there.

    The student map is first pooled onto the teacher's grid when the grids differ (as in the module).
    """
    if not isinstance(module, TargetAwareTransformer):
        raise ValueError(f"tat_loss got {type(module).__name__}: expected a TargetAwareTransformer")
    if variant not in TAT_VARIANTS:
        raise ValueError(f"unknown TaT variant {variant!r}: expected one of {', '.join(TAT_VARIANTS)}")
    module.check_maps(f_s, f_t)
    H, W = f_t.shape[2], f_t.shape[3]
    if f_s.shape[2:] != f_t.shape[2:]:
        f_s = F.adaptive_avg_pool2d(f_s, (H, W))
    if variant == "full":
        return module(f_s, f_t)
    if variant == "patch":
        if groups < 1 or H % groups or W % groups:
            raise ValueError(f"teacher map of {H}x{W} cut into groups={groups} per side: expected groups >= 1 "
                             "dividing both sides")
        return module(_patches(f_s, groups), _patches(f_t, groups))
    if not 1 <= anchors <= min(H, W):
        raise ValueError(f"anchors={anchors} on a {H}x{W} teacher map: expected 1 <= anchors <= {min(H, W)}")
    return module(F.adaptive_avg_pool2d(f_s, anchors), F.adaptive_avg_pool2d(f_t, anchors))
