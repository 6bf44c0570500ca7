"""stillroom: run the teacher once per augmentation seed, store its labels, train many students from the store.

The installed packages are ``stillroom.pipelines`` (the stages: core, data, views, teachers, store, labeling,
training), ``stillroom.student`` and ``stillroom.services``; this module is the small public API on top.
Importing it is cheap: it imports neither torch nor Ray until a name is used (docs/python-api.md):

- ``open_store(store, store_root=None)``: a ``LabelStore`` by its directory, URL or cache key;
- ``ReplayDataset(store, epoch)``: one epoch's replayed views with their teacher labels, a map-style torch
  ``Dataset`` for a ``DataLoader(..., collate_fn=collate)`` under any sampler; ``finish(parts, device)`` builds
  the ``Batch`` (uint8 views become floats on ``device``);
- ``soft_targets(batch, T)``: the teacher's full distribution at temperature T; ``mixing(batch)``: partners,
  lambdas and the mixed ground truth of mixed views; ``input_config(model, channels)``: the normalisation.
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers see; at run time ``__getattr__`` imports each name on first use
    from stillroom.pipelines.store import LabelStore
    from stillroom.student.dataset import (
        Batch,
        BatchParts,
        InputConfig,
        Mixing,
        ReplayDataset,
        collate,
        finish,
        input_config,
        mixing,
        open_store,
        soft_targets,
    )

try:
    __version__ = metadata.version("stillroom")
except metadata.PackageNotFoundError:  # run from a checkout that is not installed
    __version__ = "0+unknown"

# name -> the module that defines it; imported on first use (PEP 562), so `import stillroom` stays cheap
_PUBLIC = {
    "open_store": "stillroom.student.dataset",
    "ReplayDataset": "stillroom.student.dataset",
    "collate": "stillroom.student.dataset",
    "finish": "stillroom.student.dataset",
    "soft_targets": "stillroom.student.dataset",
    "mixing": "stillroom.student.dataset",
    "Mixing": "stillroom.student.dataset",
    "input_config": "stillroom.student.dataset",
    "InputConfig": "stillroom.student.dataset",
    "Batch": "stillroom.student.dataset",
    "BatchParts": "stillroom.student.dataset",
    "LabelStore": "stillroom.pipelines.store",
}

__all__ = ["Batch", "BatchParts", "InputConfig", "LabelStore", "Mixing", "ReplayDataset", "__version__", "collate",
           "finish", "input_config", "mixing", "open_store", "soft_targets"]


def __getattr__(name: str) -> object:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'stillroom' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module), name)
    globals()[name] = value  # the next use does not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
