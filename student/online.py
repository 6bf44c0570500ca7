"""Online mode: the store's teacher(s) in the loop, labeling each batch's views as the labeling job would.

The baseline that a cached run is compared against. The teachers come from the store manifest's sources
(``NAME@PATH``) and must have the weights the store records; their live logits become the same arrays the
store holds (top-k in float16, log-sum-exp, argmax, sampled classes, pooled features) through the labeling
job's own functions, so a cached and an online run see the same targets up to the batch composition.
"""

from __future__ import annotations

import numpy as np
import torch

from pipelines.labeling import pool_features, sample_classes, topk_arrays
from pipelines.store import LabelStore, StoreError
from pipelines.teachers import Teacher, ensemble_logits, load_teacher
from pipelines.views import Recipe
from student.data import Batch, label_tensors


class OnlineTeacher:
    """Loads the store's teachers once; ``labels(batch)`` returns what the store would hold for its views."""

    def __init__(self, store: LabelStore, recipe: Recipe, device: torch.device | str = "cpu"):
        specs = store.manifest.get("sources", {}).get("teachers") or []
        recorded = store.provenance.get("teachers", [])
        if not specs:
            raise StoreError(f"store {store.cache_key} does not record its teachers' checkpoints: --online "
                             "needs manifest sources.teachers")
        if len(specs) != len(recorded):
            raise StoreError(f"store {store.cache_key} lists {len(specs)} teacher checkpoints but "
                             f"{len(recorded)} teachers in its provenance")
        num_classes = store.schema.num_classes
        self.teachers: list[Teacher] = [load_teacher(s, num_classes, device) for s in specs]
        for spec, teacher, want in zip(specs, self.teachers, recorded, strict=True):
            if teacher.weights_sha256 != want.get("weights_sha256"):
                raise StoreError(f"teacher {spec} has weights {teacher.weights_sha256}; store {store.cache_key} "
                                 f"was labeled with {want.get('weights_sha256')}")
        labels_cfg = store.provenance.get("labels", {})
        features = labels_cfg.get("features") or None
        self.feature_layer = features["layer"] if features else None
        self.feature_grid = int(features["grid"]) if features else 0
        self.schema, self.recipe = store.schema, recipe

    @torch.no_grad()  # not inference_mode: the labels enter the student's autograd graph
    def labels(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The store arrays for the batch's views, computed live, as tensors like ``Batch.teacher``."""
        views = batch.views
        fmap = None
        if self.feature_layer:
            members = []
            for i, teacher in enumerate(self.teachers):
                if i == 0:
                    logits0, fmap = teacher.features(views, self.feature_layer)
                    members.append(logits0.float())
                else:
                    members.append(teacher.logits(views).float())
            logits = members[0] if len(members) == 1 else \
                torch.stack([m.softmax(-1) for m in members]).mean(0).clamp_min(1e-30).log()
        else:
            logits = ensemble_logits(self.teachers, views)
        arrays: dict[str, np.ndarray] = topk_arrays(logits, self.schema.top_k)
        if self.schema.sampled:
            arrays["sampled"] = sample_classes(logits, self.recipe, batch.seed, batch.ids, self.schema.sampled)
        if fmap is not None:
            arrays["features"] = pool_features(fmap, self.feature_grid).cpu().numpy().astype(np.float16)
        return {k: v.to(views.device) for k, v in label_tensors(arrays).items()}
