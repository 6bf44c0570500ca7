"""Distillation losses: plain functions of tensors, each with its paper's formula.

Soft targets are rebuilt from what the label store holds (top-k logits, the log-sum-exp over all classes,
the argmax, classes sampled from the teacher), then fed to one of:

- ``soft_targets_from_topk``: the tempered teacher ``softmax(t/T)`` rebuilt from top-k and the tail's
  log-sum-exp (FKD's top-k labels, rebuilt in log space).
- ``soft_cross_entropy``: ``-sum_c p_c log softmax(s/T)_c``, mean over the batch.
- ``kd_loss``: Hinton KD, ``(1-a) CE(s, y) + a T^2 KL(p_T || softmax(s/T))`` (torchdistill's KDLoss).
- ``deit_soft_loss``: DeiT soft distillation, the KL summed and divided by ``B C`` (facebookresearch/deit).
- ``deit_hard_loss``: DeiT hard distillation, ``0.5 CE(s_cls, y) + 0.5 CE(s_dist, argmax t)``.
- ``unbiased_sampled_ce``: the unbiased Monte-Carlo estimate of the soft cross-entropy from sampled classes.
- ``MealDiscriminator`` and ``mealv2_losses``: MEAL V2's soft cross-entropy and discriminator (authors' form;
  a GAN form as an option).
- ``TargetAwareTransformer`` and ``tat_loss``: TaT one-to-many feature distillation (full, patch groups,
  anchors).

The names the command line accepts are the methods registered in ``student.methods`` (``method_names()``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

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


def soft_targets_from_topk(topk_idx: torch.Tensor, topk_logit: torch.Tensor, tail_lse: torch.Tensor,
                           num_classes: int, T: float = 1.0) -> torch.Tensor:
    """The tempered teacher ``softmax(t / T)`` ``(B, C)`` rebuilt from its stored top-k (FKD, Shen & Xing
    2022), in log space.

    The store holds the top-k logits ``t_c`` and ``tail_lse = log sum_{c not in top-k} exp(t_c)``, the
    log-sum-exp of the other ``C - k`` classes, computed from the full float32 logits at labeling. The
    rebuild gives every class outside the top-k the same logit, the one with the same total mass::

        z_c = t_c                        (c in the top-k)
        z_c = tail_lse - log(C - k)      (every other class)
        q_T = softmax(z / T)

    At ``T = 1`` this is exact for the top-k and for the tail's total mass; at ``T != 1`` its only error is
    the tail's spread (the equal-tail approximation). It stays sound for a confident teacher, whose tail
    mass ``exp(tail_lse - lse)`` lies far below float16's rounding of ``1 - sum_topk p``. ``tail_lse = -inf``
    (``k = C``) leaves the tail at probability 0.
    """
    _check_temperature(T)
    if topk_idx.ndim != 2 or topk_logit.shape != topk_idx.shape:
        raise ValueError(f"topk_idx {tuple(topk_idx.shape)} and topk_logit {tuple(topk_logit.shape)}: "
                         "expected both (B, k)")
    if tail_lse.shape != topk_idx.shape[:1]:
        raise ValueError(f"tail_lse of shape {tuple(tail_lse.shape)}: expected ({topk_idx.shape[0]},)")
    if topk_idx.is_floating_point():
        raise ValueError(f"topk_idx is {topk_idx.dtype}: expected integer class indices")
    k = topk_idx.shape[1]
    if not k <= num_classes:
        raise ValueError(f"num_classes={num_classes} with top-{k} labels: expected num_classes >= k")
    if topk_idx.numel() and (int(topk_idx.min()) < 0 or int(topk_idx.max()) >= num_classes):
        raise ValueError(f"topk_idx holds classes outside [0, {num_classes}): expected indices of "
                         f"{num_classes} classes")
    dtype = torch.promote_types(topk_logit.dtype, torch.float32)  # float16 logits are computed with in float32
    tail = tail_lse.to(dtype)[:, None] - math.log(num_classes - k) if k < num_classes else \
        torch.full_like(tail_lse.to(dtype)[:, None], float("-inf"))
    z = tail.expand(-1, num_classes).scatter(1, topk_idx.long(), topk_logit.to(dtype))
    return F.softmax(z / T, dim=1)


def teacher_targets(teacher: dict[str, torch.Tensor], num_classes: int, T: float = 1.0) -> torch.Tensor:
    """``softmax(t / T)`` from what a batch carries: the full teacher logits (``"logits"``, online KD) when
    present, else the stored top-k rebuilt by ``soft_targets_from_topk``."""
    if "logits" in teacher:
        return F.softmax(teacher["logits"].float() / T, dim=1)
    return soft_targets_from_topk(teacher["topk_idx"], teacher["topk_logit"], teacher["tail_lse"], num_classes, T=T)


def soft_cross_entropy(student_logits: torch.Tensor, target_probs: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """``mean_b ( -sum_c p_bc log softmax(s_b / T)_c )``: cross-entropy with soft targets ``p``."""
    _check_temperature(T)
    _check_probs(student_logits, target_probs)
    return -(target_probs * F.log_softmax(student_logits / T, dim=1)).sum(dim=1).mean()


def kd_loss(student_logits: torch.Tensor, target_probs: torch.Tensor, labels: torch.Tensor,
            alpha: float = 0.5, T: float = 4.0, smoothing: float = 0.0) -> torch.Tensor:
    """Hinton KD: ``(1 - alpha) CE(s, y) + alpha T^2 KL(p_T || softmax(s / T))``.

    ``target_probs`` are the teacher's probabilities already at temperature ``T`` (``p_T``, e.g.
    ``soft_targets_from_topk(..., T=T)``); ``labels`` are class indices ``(B,)`` or, for mixed views,
    class probabilities ``(B, C)``. The KL is summed over classes and averaged over the batch
    (``F.kl_div(..., reduction="batchmean")``); classes with ``p = 0`` contribute 0. The ``T^2`` keeps the
    soft term's gradients on the scale of the hard term's as ``T`` changes.

    This is torchdistill's ``KDLoss`` (``torchdistill/losses/single.py``, reduction ``batchmean``) with its
    weights swapped: here ``alpha`` weights the teacher term, there ``alpha`` weights the ground truth and
    ``beta = 1 - alpha`` the teacher (our ``alpha`` is torchdistill's ``beta``).

    ``smoothing`` smooths the ground truth of ``CE(s, y)`` only (``y (1 - e) + e / C``, ``F.cross_entropy``'s
    ``label_smoothing``); the teacher term is untouched.
    """
    _check_temperature(T)
    _check_alpha(alpha)
    _check_probs(student_logits, target_probs)
    _check_labels("labels", labels, student_logits)
    ce = F.cross_entropy(student_logits, labels, label_smoothing=smoothing)
    kl = F.kl_div(F.log_softmax(student_logits / T, dim=1), target_probs, reduction="batchmean")
    return (1 - alpha) * ce + alpha * T * T * kl


DEIT_SOFT_REDUCTIONS = ("numel", "batch")


def deit_soft_loss(student_logits: torch.Tensor, target_probs: torch.Tensor, labels: torch.Tensor,
                   alpha: float = 0.5, T: float = 1.0, reduction: str = "numel", smoothing: float = 0.0
                   ) -> torch.Tensor:
    """DeiT soft distillation (Touvron et al. 2021), as facebookresearch/deit ``losses.py`` computes it::

        (1 - alpha) CE(s, y) + alpha T^2 sum_{b,c} KL_bc(softmax(t / T) || softmax(s / T)) / (B C)

    ``reduction="numel"`` (the default, the authors' code: ``reduction='sum'`` divided by
    ``outputs.numel()``) divides the summed KL by ``B * C``; ``reduction="batch"`` divides it by ``B``
    (the per-sample KL of Hinton KD, ``C`` times larger: with 1,000 classes and ``alpha = 0.5`` it acts like
    the authors' form at ``alpha = 0.999``). ``target_probs`` is ``softmax(t / T)`` (rebuilt from the store).
    A two-head student takes the ground-truth term on its class head and calls this with ``alpha=1`` on its
    distillation head. ``smoothing`` smooths the ground truth of ``CE(s, y)`` only (DeiT's runs: 0.1, its
    ``base_criterion`` ``LabelSmoothingCrossEntropy``); the KL is untouched.
    """
    _check_temperature(T)
    _check_alpha(alpha)
    _check_probs(student_logits, target_probs)
    _check_labels("labels", labels, student_logits)
    if reduction not in DEIT_SOFT_REDUCTIONS:
        raise ValueError(f"unknown DeiT soft reduction {reduction!r}: expected one of "
                         f"{', '.join(DEIT_SOFT_REDUCTIONS)}")
    kl = F.kl_div(F.log_softmax(student_logits / T, dim=1), target_probs, reduction="sum")
    kl = kl / (student_logits.numel() if reduction == "numel" else student_logits.shape[0])
    ce = (F.cross_entropy(student_logits, labels, label_smoothing=smoothing) if alpha < 1
          else student_logits.new_zeros(()))
    return (1 - alpha) * ce + alpha * T * T * kl


def deit_hard_loss(cls_logits: torch.Tensor, dist_logits: torch.Tensor, labels: torch.Tensor,
                   teacher_hard: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """DeiT hard distillation: ``0.5 CE(s_cls, y) + 0.5 CE(s_dist, argmax t)``, the paper's fixed halves
    (it takes no ``alpha``).

    ``cls_logits`` and ``dist_logits`` are the class and distillation heads (a one-head student passes its
    head twice); ``labels`` are class indices ``(B,)`` or class probabilities ``(B, C)``; ``teacher_hard``
    is the teacher's argmax ``(B,)``. ``smoothing`` smooths the ground truth of ``CE(s_cls, y)`` only (as DeiT's
    ``base_criterion``); the teacher's argmax term is a plain cross-entropy.
    """
    _check_logits("cls_logits", cls_logits)
    if dist_logits.shape != cls_logits.shape:
        raise ValueError(f"dist_logits of shape {tuple(dist_logits.shape)}: expected the class head's shape "
                         f"{tuple(cls_logits.shape)}")
    _check_labels("labels", labels, cls_logits)
    if teacher_hard.shape != cls_logits.shape[:1] or teacher_hard.is_floating_point():
        raise ValueError(f"teacher_hard of shape {tuple(teacher_hard.shape)} ({teacher_hard.dtype}): expected "
                         f"integer class indices ({cls_logits.shape[0]},)")
    return (0.5 * F.cross_entropy(cls_logits, labels, label_smoothing=smoothing)
            + 0.5 * F.cross_entropy(dist_logits, teacher_hard.long()))


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

MEALV2_FORMS = ("authors", "gan")


class MealDiscriminator(nn.Module):
    """MEAL V2's discriminator as the authors wrote it (szq0214/MEAL-V2 ``models/discriminator.py``, built with
    ``K = 8`` in ``train.py``): three 1x1 convolutions on a ``C x 1 x 1`` class-score map, a ReLU after
    each (the last one too), ``C -> C/8 -> C/64 -> 2``: for 1,000 classes ``1000 -> 125 -> 15 -> 2``.
    A 1x1 convolution on a 1x1 map is a fully connected layer, which is what this uses.

    Widths scale with the class count: ``h1 = max(C // 8, 8)``, ``h2 = max(h1 // 8, 4)`` (the floors keep a
    10-class discriminator at ``10 -> 8 -> 4 -> 2``). Returns two scores per sample ``(B, 2)``, read as
    logits of (student, teacher) by ``mealv2_losses``.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}: expected >= 1")
        self.num_classes = num_classes
        h1 = max(num_classes // 8, 8)
        h2 = max(h1 // 8, 4)
        self.widths = (num_classes, h1, h2, 2)
        self.net = nn.Sequential(nn.Linear(num_classes, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(),
                                 nn.Linear(h2, 2), nn.ReLU())

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        if scores.ndim != 2 or scores.shape[1] != self.num_classes:
            raise ValueError(f"discriminator input of shape {tuple(scores.shape)}: expected (B, {self.num_classes})")
        return self.net(scores)


class LogitDiscriminator(nn.Module):
    """The GAN-form discriminator (``form="gan"``): 3 fully connected layers on a class-score vector,
    ``C -> hidden -> hidden -> 1`` with LeakyReLU(0.2); returns one logit per sample ``(B,)`` (high: looks
    like the teacher). Not the authors' (see ``MealDiscriminator``)."""

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


def make_discriminator(num_classes: int, form: str = "authors") -> nn.Module:
    """The discriminator of ``mealv2_losses(..., form=form)``."""
    if form not in MEALV2_FORMS:
        raise ValueError(f"unknown MEAL V2 form {form!r}: expected one of {', '.join(MEALV2_FORMS)}")
    return MealDiscriminator(num_classes) if form == "authors" else LogitDiscriminator(num_classes)


def mealv2_losses(student_logits: torch.Tensor, target_probs: torch.Tensor,
                  discriminator: nn.Module | None, form: str = "authors") -> dict[str, torch.Tensor]:
    """MEAL V2 (Shen & Savvides 2020): the training terms, by name. ``p`` are the (ensemble-averaged) teacher
    probabilities, ``q = softmax(s)``; BCE is binary cross-entropy with logits, averaged over its elements.

    ``form="authors"`` (szq0214/MEAL-V2 ``train.py``, ``loss.py`` ``discriminatorLoss``,
    ``extensions/kd_loss.py`` ``KLLoss``), with ``D`` a ``MealDiscriminator``:

    - ``"soft_ce"``: ``mean_b -sum_c p_c log q_c`` (``KLLoss``: no ground truth).
    - ``"disc"``: ``BCE(D([q; p]), [[1, 0]] * B + [[0, 1]] * B)``: the student's rows labelled (1, 0), the
      teacher's (0, 1), mean over the ``2B x 2`` entries.

      Both enter one objective ``soft_ce + disc`` and one backward: the discriminator learns to tell the two
      apart, and the student, not detached, also lowers ``disc`` (the authors' regulariser).
      The authors feed the raw logits (the student's output and the teachers' mean logit); the store holds
      the teacher only through its top-k, so here both sides enter as probabilities (``q`` and ``p``).

    ``form="gan"`` (a GAN generator term, not the authors'), with ``D`` a ``LogitDiscriminator``:

    - ``"soft_ce"`` as above; ``"adv"``: ``BCE(D(q), 1)``, the student tries to look like the teacher;
    - ``"disc"``: ``(BCE(D(p), 1) + BCE(D(q.detach()), 0)) / 2``, minimised over the discriminator only.
    """
    if discriminator is None:
        raise ValueError("mealv2_losses got no discriminator: expected one from make_discriminator")
    if form not in MEALV2_FORMS:
        raise ValueError(f"unknown MEAL V2 form {form!r}: expected one of {', '.join(MEALV2_FORMS)}")
    _check_probs(student_logits, target_probs)
    q = F.softmax(student_logits, dim=1)
    p = target_probs.detach().to(q.dtype)
    soft_ce = soft_cross_entropy(student_logits, p)
    if form == "authors":
        scores = discriminator(torch.cat([q, p]))
        B = q.shape[0]
        target = torch.zeros_like(scores)
        target[:B, 0] = 1.0
        target[B:, 1] = 1.0
        return {"soft_ce": soft_ce, "disc": F.binary_cross_entropy_with_logits(scores, target)}
    real, fake = discriminator(p), discriminator(q.detach())
    disc = 0.5 * (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                  + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    fooled = discriminator(q)
    return {"soft_ce": soft_ce, "adv": F.binary_cross_entropy_with_logits(fooled, torch.ones_like(fooled)),
            "disc": disc}


# -- TaT -----------------------------------------------------------------------------------------------


class _Embed(nn.Module):
    """A convolution and BatchNorm, TaT's embedding (``Embed`` in both reference repositories)."""

    def __init__(self, c_in: int, c_out: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False)
        self.norm = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class TargetAwareTransformer(nn.Module):
    """TaT's embeddings (Lin et al., CVPR 2022): the student map's query and value, the teacher map's key.

    ``form="imagenet"`` follows sihaoevery/TaT (``torchdistill/models/special.py``: ``Embed`` is a 3x3
    convolution + BatchNorm; ``AttnEmbed``: query and value embed the student map, the key is the teacher
    map itself, ``nn.Identity``). ``form="seg"`` follows sihaoevery/TaT-seg (``distiller_tat.py``: ``Embed``
    is a 1x1 convolution + BatchNorm, on the student for query and value and on the teacher for the key).
    All embed to the teacher's ``C_t`` channels. ``forward(f_s, f_t)`` returns ``(q, k, v)``, each
    ``(B, C_t, H, W)``; ``tat_loss`` does the rest.
    """

    def __init__(self, student_channels: int, teacher_channels: int, form: str = "imagenet"):
        super().__init__()
        if min(student_channels, teacher_channels) < 1:
            raise ValueError(f"student_channels={student_channels}, teacher_channels={teacher_channels}: "
                             "expected both >= 1")
        if form not in ("imagenet", "seg"):
            raise ValueError(f"unknown TaT embedding form {form!r}: expected imagenet or seg")
        self.student_channels, self.teacher_channels, self.form = student_channels, teacher_channels, form
        kernel = 3 if form == "imagenet" else 1
        self.query = _Embed(student_channels, teacher_channels, kernel)
        self.value = _Embed(student_channels, teacher_channels, kernel)
        self.key: nn.Module = nn.Identity() if form == "imagenet" else _Embed(teacher_channels, teacher_channels, 1)

    def check_maps(self, f_s: torch.Tensor, f_t: torch.Tensor) -> None:
        if f_s.ndim != 4 or f_t.ndim != 4 or f_s.shape[0] != f_t.shape[0]:
            raise ValueError(f"feature maps {tuple(f_s.shape)} (student) and {tuple(f_t.shape)} (teacher): "
                             "expected (B, C, H, W) each with the same B")
        if f_s.shape[1] != self.student_channels or f_t.shape[1] != self.teacher_channels:
            raise ValueError(f"feature maps with {f_s.shape[1]} (student) and {f_t.shape[1]} (teacher) channels: "
                             f"expected {self.student_channels} and {self.teacher_channels}")

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.check_maps(f_s, f_t)
        f_t = f_t.to(f_s.dtype)
        return self.query(f_s), self.key(f_t), self.value(f_s)


def tat_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int = 1) -> torch.Tensor:
    """One-to-many re-assembly: channels split into ``heads`` groups of ``d = C / heads``; per group, over the
    ``N = H W`` positions, ``out = softmax(q k^T, dim=-1) v`` (no ``1 / sqrt(d)``, as the reference).
    Maps ``(B, C, H, W)`` in and out."""
    B, C, H, W = v.shape
    if C % heads:
        raise ValueError(f"{C} channels in {heads} heads: expected heads dividing the channels")

    def split(x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, heads, N, d)
        return x.reshape(B, heads, C // heads, H * W).transpose(2, 3)

    attn = torch.softmax(split(q) @ split(k).transpose(2, 3), dim=-1)  # (B, heads, N, N)
    return (attn @ split(v)).transpose(2, 3).reshape(B, C, H, W)


def _patch_stack(x: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, n*n*C, H/n, W/n)``: the ``n x n`` patches (row-major) stacked along channels,
    patch-major (TaT-seg ``grid_tensor_seq`` then the ``stack_attn`` reshape)."""
    B, C, H, W = x.shape
    h, w = H // n, W // n
    x = x[:, :, : n * h, : n * w].reshape(B, C, n, h, n, w).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, n * n * C, h, w)


TAT_VARIANTS = ("full", "patch", "anchor", "patch-anchor")


def tat_loss(f_s: torch.Tensor, f_t: torch.Tensor, module: nn.Module | None, variant: str = "full",
             groups: int = 2, patches_per_group: int = 2, anchors: int = 2) -> torch.Tensor:
    """TaT feature distillation of the student map ``f_s`` onto the teacher map ``f_t``; ``module`` (a
    ``TargetAwareTransformer``) gives ``q, k, v``. The student map is first average-pooled onto the teacher's
    grid when the grids differ. Every variant's loss is a mean squared error over all entries
    (``nn.MSELoss()``), of the re-assembled student against the teacher map ``f_t`` (not its key):

    - ``"full"`` (TaT ``torchdistill/losses/single.py`` ``MaskedFM``, one head):
      ``MSE(tat_attend(q, k, v), f_t)``, one-to-many over all ``H W`` positions.
    - ``"patch"`` (TaT-seg ``distiller_tat.py`` ``distillation_patchgroup``, ``stack_attn``): the maps are
      cut into ``groups x groups`` patches of ``H // groups x W // groups``, stacked along channels, and
      attended with ``groups^2 / patches_per_group`` heads: each head is a group of ``patches_per_group``
      neighbouring patches that share one attention over the positions of a patch (the segmentation scripts
      use 2 or 4 per group).
    - ``"anchor"`` (``distillation_anchorpoint``): ``q, k, v, f_t`` average-pooled with kernel and stride
      ``(H // anchors, W // anchors)``, then one head.
    - ``"patch-anchor"``: the sum of the two, trained together as the segmentation code does (its
      ``beta`` and ``gamma`` both 1 here).
    """
    if not isinstance(module, TargetAwareTransformer):
        raise ValueError(f"tat_loss got {type(module).__name__}: expected a TargetAwareTransformer")
    if variant not in TAT_VARIANTS:
        raise ValueError(f"unknown TaT variant {variant!r}: expected one of {', '.join(TAT_VARIANTS)}")
    module.check_maps(f_s, f_t)
    H, W = f_t.shape[2], f_t.shape[3]
    if f_s.shape[2:] != f_t.shape[2:]:
        f_s = F.adaptive_avg_pool2d(f_s, (H, W))
    f_t = f_t.to(f_s.dtype)
    q, k, v = module(f_s, f_t)
    if variant == "full":
        return F.mse_loss(tat_attend(q, k, v), f_t)
    loss = f_s.new_zeros(())
    if variant in ("patch", "patch-anchor"):
        if not 1 <= groups <= min(H, W):
            raise ValueError(f"groups={groups} patches per side of a {H}x{W} teacher map: expected 1 <= groups "
                             f"<= {min(H, W)}")
        if patches_per_group < 1 or (groups * groups) % patches_per_group:
            raise ValueError(f"patches_per_group={patches_per_group}: expected a divisor of the "
                             f"{groups * groups} patches")
        heads = groups * groups // patches_per_group
        sq, sk, sv, st = (_patch_stack(x, groups) for x in (q, k, v, f_t))
        loss = loss + F.mse_loss(tat_attend(sq, sk, sv, heads=heads), st)
    if variant in ("anchor", "patch-anchor"):
        if not 1 <= anchors <= min(H, W):
            raise ValueError(f"anchors={anchors} on a {H}x{W} teacher map: expected 1 <= anchors <= {min(H, W)}")
        kernel = (H // anchors, W // anchors)
        pq, pk, pv, pt = (F.avg_pool2d(x, kernel, kernel) for x in (q, k, v, f_t))
        loss = loss + F.mse_loss(tat_attend(pq, pk, pv), pt)
    return loss


def tat_embedding_form(variant: str) -> str:
    """The embedding each variant's reference uses: ``imagenet`` (3x3 conv) for ``full``, ``seg`` (1x1)
    for the segmentation code's patch-group and anchor variants."""
    return "imagenet" if variant == "full" else "seg"
