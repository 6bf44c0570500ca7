"""``RunPlan``: what a student run reads from its store, its data set and a checkpoint, resolved once.

``student.run.train`` resolves it before any worker starts (``resolve_plan``) and hands the same plan to every
rank (``student.trainer.fit``; through Ray Train's ``train_loop_config`` on several workers), so no rank asks
the store on its own which seeds it holds: a label job that commits a seed while the ranks start changes
nothing a rank replays (before, each rank listed the store itself and two ranks could replay different seeds in
one epoch). A rank checks that what it opened is what the plan names (``RunPlan.check``) and refuses otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from stillroom.pipelines.core import StoreError
from stillroom.pipelines.data import Dataset
from stillroom.pipelines.store import LabelStore
from stillroom.pipelines.views import Recipe


@dataclass(frozen=True)
class RunPlan:
    """A run's inputs as resolved when it started: the store (its path or URL and cache key) and the seeds it
    replays, the data set (spec, split, root, size, fingerprint), the recipe that rebuilds its views, and the
    checkpoint it continues from (None: a new run)."""

    store: str
    cache_key: str
    seeds: tuple[int, ...]
    dataset: str
    split: str
    data_root: str | None
    num_samples: int
    fingerprint: str
    recipe: str
    resume_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seeds": list(self.seeds)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunPlan:
        return cls(**{**d, "seeds": tuple(int(s) for s in d["seeds"])})

    def check(self, store: LabelStore, dataset: Dataset, recipe: Recipe) -> None:
        """Refuse (StoreError) a rank whose store, data set or recipe is not the plan's."""
        found = {"cache_key": store.cache_key, "num_samples": len(dataset), "fingerprint": dataset.fingerprint,
                 "recipe": recipe.name}
        for name, value in found.items():
            if getattr(self, name) != value:
                raise StoreError(f"this worker opened {name} {value!r} where the run planned {getattr(self, name)!r} "
                                 f"(store {self.store}): the store or data set changed under the run")


def resolve_plan(store: LabelStore, dataset: Dataset, recipe: Recipe, seeds: tuple[int, ...] | None,
                 dataset_spec: str, data_root: str | None, resume_from: str | None = None) -> RunPlan:
    """The run's plan: ``seeds``, or every seed complete in ``store`` now (listed once, here), checked to exist."""
    available = store.seeds()
    chosen = tuple(int(s) for s in (seeds if seeds else available))
    if not chosen:
        raise StoreError(f"store {store.path} has no complete seed: label one first")
    missing = sorted(set(chosen) - set(available))
    if missing:
        raise StoreError(f"seeds {missing} are not in store {store.cache_key}: complete seeds are {available}")
    return RunPlan(store=str(store.path), cache_key=store.cache_key, seeds=chosen, dataset=dataset_spec,
                   split=dataset.split, data_root=data_root, num_samples=len(dataset),
                   fingerprint=dataset.fingerprint, recipe=recipe.name, resume_from=resume_from)


__all__ = ["RunPlan", "resolve_plan"]
