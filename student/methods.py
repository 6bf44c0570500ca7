"""Distillation methods, registered by name (as timm registers models).

A method is one small unit: the options it reads (``MethodOptions``, all of them ``TrainConfig``'s; their bounds
and choices checked by the config itself, ``pipelines.core.options``; what the run needs from the store by
``check_run``), its extra modules (the MEAL V2 discriminator, the TaT embeddings), its step (``forward``
returns a dict of named loss terms; formulas in ``student.losses``) and its checkpoint state (its modules'
weights and its own optimizer). ``@register_method("kd")`` puts a class in ``METHODS``; the order of
registration is the order of ``method_names()``::

    @register_method("kd")
    class KnowledgeDistillation(Method):
        default_temperature = 4.0

        def forward(self, heads: Heads, batch: Batch) -> dict[str, torch.Tensor]:
            return {"kd": L.kd_loss(heads.cls, self.soft_targets(batch, self.T), heads.truth(batch), ...)}

``student.trainer.DistillationStep`` runs the student and sums the named terms into ``"loss"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from stillroom.pipelines.core import UsageError
from stillroom.pipelines.store import LabelStore, StoreError
from stillroom.student import losses as L
from stillroom.student.data import Batch


class MethodOptions(Protocol):
    """What a method reads of the run's options (``student.config.TrainConfig`` has them all): named here so
    that the registry, which the config asks for the method names, does not import the config back."""

    @property
    def alpha(self) -> float: ...

    @property
    def smoothing(self) -> float: ...

    @property
    def deit_soft_reduction(self) -> str: ...

    @property
    def adv_weight(self) -> float: ...

    @property
    def disc_lr(self) -> float: ...

    @property
    def mealv2_form(self) -> str: ...

    @property
    def tat_variant(self) -> str: ...

    @property
    def tat_groups(self) -> int: ...

    @property
    def tat_patches_per_group(self) -> int: ...

    @property
    def tat_anchors(self) -> int: ...

    @property
    def tat_weight(self) -> float: ...

    @property
    def resolved_temperature(self) -> float: ...


METHODS: dict[str, type[Method]] = {}


def register_method(name: str):  # type: ignore[no-untyped-def]
    """Class decorator: register a ``Method`` subclass under ``name`` (the ``--loss`` value)."""

    def register(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice ({METHODS[name].__name__}, {cls.__name__})")
        cls.name = name
        METHODS[name] = cls
        return cls

    return register


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(METHODS)


def method_class(name: str) -> type[Method]:
    """The method registered as ``name``; UsageError naming the known ones otherwise."""
    if name not in METHODS:
        raise UsageError(f"unknown loss {name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]


@dataclass
class Heads:
    """What the student gave for a batch: class logits, distillation-head logits (two-head students in
    distilled training, else None) and the feature map (methods with ``student_features``, else None)."""

    cls: torch.Tensor
    dist: torch.Tensor | None
    features: torch.Tensor | None = None

    @staticmethod
    def truth(batch: Batch) -> torch.Tensor:
        """The ground truth: class indices, or class probabilities for mixed views."""
        return batch.targets if batch.mixed else batch.labels


class Method(nn.Module):
    """A distillation method. Subclasses set the class attributes and ``forward``; the rest has defaults.

    ``forward(heads, batch)`` returns the named terms whose sum is the student's objective, plus any term
    named in ``own_objectives`` (left out of the sum, minimised by the method's own optimizer).
    """

    name = ""
    default_temperature = 1.0  # when --temperature is not given
    two_heads = False  # a two-head student returns (cls, dist) in training (DeiT's distillation token)
    student_features = False  # the student's feature map at --student-layer is computed (Heads.features)
    own_objectives: tuple[str, ...] = ()
    ground_truth = True  # has a ground-truth term, which --smoothing smooths (the teacher's term never)

    def __init__(self, config: MethodOptions, num_classes: int, feature_shape: tuple[int, int, int] | None = None,
                 student_channels: int | None = None):
        super().__init__()
        self.config, self.num_classes = config, num_classes
        self.T = config.resolved_temperature

    # -- options -------------------------------------------------------------------------------------

    @classmethod
    def check_run(cls, config: MethodOptions, store: LabelStore) -> None:
        """Refuse a run of this method that cannot work: options that contradict it, a store that lacks
        what it needs."""

    # -- the step ------------------------------------------------------------------------------------

    def soft_targets(self, batch: Batch, T: float) -> torch.Tensor:
        """The teacher's ``softmax(t / T)``: the full logits online, else the store's top-k rebuilt."""
        return L.teacher_targets(batch.teacher, self.num_classes, T=T)

    def forward(self, heads: Heads, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def student_side_parameters(self) -> list[nn.Parameter]:
        """Parameters trained with the student by the student's optimizer (e.g. TaT's embeddings)."""
        return []

    def make_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer of the method's own modules (e.g. MEAL V2's discriminator), if it has one."""
        return None

    def backward(self, losses: dict[str, torch.Tensor], student_params: list[nn.Parameter]) -> None:
        """Backpropagate the step's objectives (``"loss"``; one backward reaches every module in its graph)."""
        losses["loss"].backward()

    # -- checkpoint ----------------------------------------------------------------------------------

    def checkpoint_state(self, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """What a checkpoint keeps of the method: its modules' weights and its optimizer's state."""
        return {"step": self.state_dict(), "disc_optimizer": optimizer.state_dict() if optimizer else None}

    def load_checkpoint_state(self, ckpt: dict[str, Any], optimizer: torch.optim.Optimizer | None) -> None:
        self.load_state_dict(ckpt["step"])
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["disc_optimizer"])


# -- the methods, in the order the command line lists them ---------------------------------------------


@register_method("ce")
class CrossEntropy(Method):
    """Cross-entropy with the ground truth (mixed views: ``lam * y + (1 - lam) * y_partner``); no teacher."""

    def forward(self, heads: Heads, batch: Batch) -> dict[str, torch.Tensor]:
        return {"ce": F.cross_entropy(heads.cls, heads.truth(batch), label_smoothing=self.config.smoothing)}


@register_method("kd")
class KnowledgeDistillation(Method):
    """Hinton KD at temperature T (default 4): ``(1 - alpha) CE(s, y) + alpha T^2 KL(p_T || q_T)``
    (``student.losses.kd_loss``; ``alpha`` weights the teacher term)."""

    default_temperature = 4.0

    def forward(self, heads: Heads, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.config
        return {"kd": L.kd_loss(heads.cls, self.soft_targets(batch, self.T), heads.truth(batch), alpha=cfg.alpha,
                                T=self.T, smoothing=cfg.smoothing)}


@register_method("deit-soft")
class DeiTSoft(Method):
    """DeiT soft distillation, the KL divided by ``B C`` as the authors' code does
    (``deit_soft_reduction="batch"``: by ``B``). A two-head student puts the ground-truth term on its class
    head and the teacher term on its distillation head; a one-head student puts both on its head."""

    two_heads = True

    def forward(self, heads: Heads, batch: Batch) -> dict[str, torch.Tensor]:
        cfg, truth = self.config, heads.truth(batch)
        probs = self.soft_targets(batch, self.T)
        reduction = cfg.deit_soft_reduction
        if heads.dist is None:
            return {"deit_soft": L.deit_soft_loss(heads.cls, probs, truth, alpha=cfg.alpha, T=self.T,
                                                  reduction=reduction, smoothing=cfg.smoothing)}
        # class head: the ground truth (smoothed as asked); distillation head: the teacher
        return {"ce": (1 - cfg.alpha) * F.cross_entropy(heads.cls, truth, label_smoothing=cfg.smoothing),
                "distill": cfg.alpha * L.deit_soft_loss(heads.dist, probs, truth, alpha=1.0, T=self.T,
                                                        reduction=reduction)}


@register_method("deit-hard")
class DeiTHard(Method):
    """DeiT hard distillation with the teacher's argmax, fixed halves 0.5/0.5 (``alpha`` must stay 0.5); the
    same head split as ``deit-soft``."""

    two_heads = True

    @classmethod
    def check_run(cls, config: MethodOptions, store: LabelStore) -> None:
        if config.alpha != 0.5:
            raise UsageError(f"--alpha {config.alpha} with deit-hard: DeiT's hard distillation has fixed halves, "
                             "0.5 CE(y) + 0.5 CE(teacher argmax); leave --alpha at 0.5")

    def forward(self, heads: Heads, batch: Batch) -> dict[str, torch.Tensor]:
        dist = heads.dist if heads.dist is not None else heads.cls
        return {"deit_hard": L.deit_hard_loss(heads.cls, dist, heads.truth(batch), batch.teacher["hard"],
                                              smoothing=self.config.smoothing)}


@register_method("mealv2")
class MealV2(Method):
    """MEAL V2: soft cross-entropy with the (ensemble) soft labels, no ground truth, plus the authors'
    discriminator loss in one joint backward (``mealv2_form="gan"``: a GAN generator term ``adv`` and a
    discriminator trained on its own loss ``gan_disc`` by its own optimizer); ``adv_weight`` weights the
    adversarial term, ``disc_lr`` is the discriminator's learning rate."""

    own_objectives = ("gan_disc",)
    ground_truth = False

    def __init__(self, config: MethodOptions, num_classes: int, feature_shape: tuple[int, int, int] | None = None,
                 student_channels: int | None = None):
        super().__init__(config, num_classes)
        self.discriminator = L.make_discriminator(num_classes, config.mealv2_form)

    def forward(self, heads: Heads, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.config
        terms = L.mealv2_losses(heads.cls, self.soft_targets(batch, 1.0), self.discriminator, form=cfg.mealv2_form)
        if cfg.mealv2_form == "authors":  # one objective, one backward (MEAL-V2 train.py)
            return {"soft_ce": terms["soft_ce"], "disc": cfg.adv_weight * terms["disc"]}
        return {"soft_ce": terms["soft_ce"], "adv": cfg.adv_weight * terms["adv"], "gan_disc": terms["disc"]}

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.discriminator.parameters(), lr=self.config.disc_lr, betas=(0.5, 0.999))

    def backward(self, losses: dict[str, torch.Tensor], student_params: list[nn.Parameter]) -> None:
        if "gan_disc" not in losses:  # the authors' form: the discriminator's loss is in "loss"
            losses["loss"].backward()
            return
        losses["loss"].backward(inputs=student_params, retain_graph=True)
        losses["gan_disc"].backward(inputs=list(self.discriminator.parameters()))


@register_method("sampled")
class SampledCrossEntropy(Method):
    """The unbiased estimate of the soft cross-entropy from the stored sampled classes."""

    ground_truth = False

    @classmethod
    def check_run(cls, config: MethodOptions, store: LabelStore) -> None:
        if not store.schema.sampled:
            raise StoreError(f"store {store.cache_key} holds no sampled classes: the sampled loss needs a store "
                             "labeled with --sampled M")

    def forward(self, heads: Heads, batch: Batch) -> dict[str, torch.Tensor]:
        return {"sampled_ce": L.unbiased_sampled_ce(heads.cls, batch.teacher["sampled"], T=self.T)}


@register_method("tat")
class TargetAware(Method):
    """TaT feature distillation of the student's map at ``student_layer`` onto the stored teacher feature
    map (``tat_variant``, ``tat_groups``, ``tat_patches_per_group``, ``tat_anchors``; weighted by
    ``tat_weight``) plus the ``kd`` term at T = 1."""

    student_features = True

    @classmethod
    def check_run(cls, config: MethodOptions, store: LabelStore) -> None:
        if not store.schema.feature_shape:
            raise StoreError(f"store {store.cache_key} holds no teacher features: the tat loss needs a store "
                             "labeled with --features LAYER")
        _, h, w = store.schema.feature_shape
        patches = config.tat_variant in ("patch", "patch-anchor")
        if patches and not 1 <= config.tat_groups <= min(h, w):
            raise UsageError(f"--tat-groups {config.tat_groups} (patches per side) must lie in [1, {min(h, w)}] for "
                             f"the stored {h}x{w} teacher map")
        if patches and (config.tat_patches_per_group < 1 or config.tat_groups ** 2 % config.tat_patches_per_group):
            raise UsageError(f"--tat-patches-per-group {config.tat_patches_per_group} must divide the "
                             f"{config.tat_groups ** 2} patches")
        if config.tat_variant in ("anchor", "patch-anchor") and not 1 <= config.tat_anchors <= min(h, w):
            raise UsageError(f"--tat-anchors {config.tat_anchors} must lie in [1, {min(h, w)}] for the stored "
                             f"{h}x{w} teacher map")

    def __init__(self, config: MethodOptions, num_classes: int, feature_shape: tuple[int, int, int] | None = None,
                 student_channels: int | None = None):
        super().__init__(config, num_classes)
        if feature_shape is None or student_channels is None:
            raise UsageError("the tat loss needs the teacher feature shape and the student's channel count")
        self.tat = L.TargetAwareTransformer(student_channels, feature_shape[0],
                                            L.tat_embedding_form(config.tat_variant))

    def forward(self, heads: Heads, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.config
        if heads.features is None:
            raise UsageError("the tat loss needs the student's feature map")
        return {"kd": L.kd_loss(heads.cls, self.soft_targets(batch, self.T), heads.truth(batch), alpha=cfg.alpha,
                                T=self.T, smoothing=cfg.smoothing),
                "tat": cfg.tat_weight * L.tat_loss(heads.features, batch.teacher["features"], self.tat,
                                                   variant=cfg.tat_variant, groups=cfg.tat_groups,
                                                   patches_per_group=cfg.tat_patches_per_group,
                                                   anchors=cfg.tat_anchors)}

    def student_side_parameters(self) -> list[nn.Parameter]:
        return list(self.tat.parameters())


__all__ = ["METHODS", "Heads", "Method", "method_class", "method_names", "register_method"]
