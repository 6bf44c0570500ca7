"""Online mode: the store's teacher(s) in the loop, labeling each batch's views live.

The baseline that a cached run is compared against. The teachers come from the store manifest's sources
(``NAME@PATH``) and must have the weights the store records. Two kinds of targets:

- ``"full"`` (the default; online KD as DeiT, MEAL V2 and Hinton KD users run it): the teachers' full
  float32 logits (an ensemble's: ``log mean softmax``), under ``"logits"``; soft targets are
  ``softmax(logits / T)`` over every class, the argmax and sampled classes come from them, and the pooled
  feature map stays float32. Cached vs full online measures what keeping only the top-k costs.
- ``"encoded"``: the same logits turned into the arrays the store holds (top-k in float16, ``lse``,
  ``tail_lse``, argmax, sampled classes, float16 features) through the labeling job's own functions and the
  store format's codes (``LabelStore.as_read``), so a cached run and this one see the same targets up to the batch
  composition (an exactness check).
"""

from __future__ import annotations

import numpy as np
import torch

from stillroom.pipelines.labeling import pool_features, sample_classes, topk_arrays
from stillroom.pipelines.store import LabelStore, StoreError
from stillroom.pipelines.teachers import Teacher, ensemble_log_probs, load_teacher
from stillroom.pipelines.views import Recipe
from stillroom.student.data import Batch, label_tensors

ONLINE_TARGETS = ("full", "encoded")


class OnlineTeacher:
    """Loads the store's teachers once; ``labels(batch)`` returns the teacher targets for its views."""

    def __init__(self, store: LabelStore, recipe: Recipe, device: torch.device | str = "cpu",
                 targets: str = "full"):
        if targets not in ONLINE_TARGETS:
            raise ValueError(f"unknown online targets {targets!r}: expected one of {', '.join(ONLINE_TARGETS)}")
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
        self.store, self.schema, self.recipe, self.targets = store, store.schema, recipe, targets

    @torch.no_grad()  # not inference_mode: the labels enter the student's autograd graph
    def labels(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The teacher targets for the batch's views, as tensors like ``Batch.teacher``."""
        views = batch.views
        fmap = None
        members = []
        for i, teacher in enumerate(self.teachers):
            if i == 0 and self.feature_layer:
                logits0, fmap = teacher.features(views, self.feature_layer)
                members.append(logits0.float())
            else:
                members.append(teacher.logits(views).float())
        logits = ensemble_log_probs(members)
        if self.targets == "full":
            out = {"logits": logits, "hard": logits.argmax(1)}
            if self.schema.sampled:
                out["sampled"] = torch.from_numpy(self._sampled(logits, batch)).long()
            if fmap is not None:
                out["features"] = pool_features(fmap, self.feature_grid)
            return {k: v.to(views.device) for k, v in out.items()}
        arrays: dict[str, np.ndarray] = self.store.as_read(topk_arrays(logits, self.schema.top_k))
        if self.schema.sampled:
            arrays["sampled"] = self._sampled(logits, batch)
        if fmap is not None:
            arrays["features"] = pool_features(fmap, self.feature_grid).cpu().numpy().astype(np.float16)
        return {k: v.to(views.device) for k, v in label_tensors(arrays).items()}

    def _sampled(self, logits: torch.Tensor, batch: Batch) -> np.ndarray:
        """The classes drawn for each view, as labeling draws them: keyed by the view's own seed."""
        if batch.row_seeds is None:
            return sample_classes(logits, self.recipe, batch.seed, batch.ids, self.schema.sampled)
        out = np.empty((len(batch.ids), self.schema.sampled), dtype=np.int64)
        for seed in np.unique(batch.row_seeds):
            rows = np.flatnonzero(batch.row_seeds == seed)
            out[rows] = sample_classes(logits[torch.from_numpy(rows).to(logits.device)], self.recipe, int(seed),
                                       batch.ids[rows], self.schema.sampled)
        return out
