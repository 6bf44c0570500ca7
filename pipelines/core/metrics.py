"""What a job measures as it runs (views labeled, seconds in decode, samples/s, losses), recorded through a small
``Metrics`` object that the code doing the work is handed.

The work itself never imports an exporter: the Ray entry points (``pipelines.labeling.ray_pool``,
``student.train_ray``) define their metrics (``MetricDef``: kind, help, extra tag keys) and hand the work an
``ExportedMetrics`` built on ``ray.util.metrics`` (passed in as ``make``), tagged with the job, the store and the
node; anywhere else the work gets ``NO_METRICS``, which records nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

JOB_ID_ENV = "STILLROOM_JOB_ID"  # the service's job id, set for the job's process (metrics tag it)
COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
SECONDS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)  # histogram boundaries of a duration


@dataclass(frozen=True)
class MetricDef:
    """One metric: its kind (``COUNTER``, ``GAUGE``, ``HISTOGRAM``), its help text, the tag keys it has beyond the
    common ones (job, store, node) and a histogram's bucket boundaries."""

    kind: str
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = SECONDS


class Metrics:
    """Records nothing: what the work gets when no exporter is there (a plain CLI run, a test)."""

    def add(self, name: str, value: float = 1.0, **tags: str) -> None:
        """Add ``value`` to counter ``name``."""

    def set(self, name: str, value: float, **tags: str) -> None:
        """Set gauge ``name`` to ``value``."""

    def observe(self, name: str, value: float, **tags: str) -> None:
        """Add one observation (e.g. seconds) to histogram ``name``."""


NO_METRICS = Metrics()

# (full name, definition, tag keys) -> an object with inc/set/observe(value, tags=...) (ray.util.metrics' way)
MakeMetric = Callable[[str, MetricDef, tuple[str, ...]], Any]


class ExportedMetrics(Metrics):
    """``definitions`` made by ``make`` as ``<prefix>_<name>``, each recorded with ``tags`` (job, store, node)
    plus its own. A name not defined is a programming error (KeyError), never silently dropped."""

    def __init__(self, prefix: str, definitions: Mapping[str, MetricDef], tags: Mapping[str, str],
                 make: MakeMetric):
        self.tags = dict(tags)
        self.metrics = {name: make(f"{prefix}_{name}", d, (*self.tags, *d.tag_keys))
                        for name, d in definitions.items()}

    def add(self, name: str, value: float = 1.0, **tags: str) -> None:
        if value > 0:  # a counter only grows
            self.metrics[name].inc(value, tags={**self.tags, **tags})

    def set(self, name: str, value: float, **tags: str) -> None:
        self.metrics[name].set(value, tags={**self.tags, **tags})

    def observe(self, name: str, value: float, **tags: str) -> None:
        self.metrics[name].observe(value, tags={**self.tags, **tags})


def job_id(default: str) -> str:
    """The service's job id (``STILLROOM_JOB_ID``), else ``default`` (e.g. the Ray job's id of a CLI run)."""
    return os.environ.get(JOB_ID_ENV) or default
