"""``train(config)``: the entry point of a student run, in this process or on Ray Train.

It checks everything first (the device, the store against the data set, its recipe and class count, the loss
against what the store holds and what the student has, a run to resume), resolves what the run reads once
(``student.plan.RunPlan``: the store's seeds, the data set, the recipe, the checkpoint), then runs
``student.trainer.fit`` here or ``student.train_ray.train_distributed`` on ``config.workers`` Ray Train workers,
each handed the plan. It is the one module that imports both: the loop (``student.trainer``) imports neither.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from typing import Any

from stillroom.pipelines.core import NO_METRICS, Location, Metrics
from stillroom.pipelines.data import use_index_cache
from stillroom.pipelines.training import resolve_device
from stillroom.student.config import TrainConfig
from stillroom.student.data import left_out_of
from stillroom.student.plan import resolve_plan
from stillroom.student.tracking import check_tracker
from stillroom.student.trainer import CHECKPOINT, Distributed, check_resume, fit, make_student, prepare


def train(config: TrainConfig) -> dict[str, Any]:
    """Train a student from a label store and return its final metrics.

    One worker runs in this process; ``config.workers > 1`` runs through Ray Train (``student.train_ray``),
    each worker a distinct shard of every epoch. Bad input (a store made for other data, a loss the store
    cannot feed, a student without the head the loss asks for) raises UsageError/StoreError before training.
    """
    resolve_device(config.device)  # a device that is not here: one error line, before any data is read
    # data on a URL finds its index where the labeling job cached it (next to the data, else its store root)
    use_index_cache(os.fspath(config.store).rstrip("/").rpartition("/")[0] or ".")
    check_tracker(config.tracker)
    setup = prepare(config)
    # what the run reads, resolved here once (student.plan): the seeds above all, which every rank then replays
    config, checkpoint = check_resume(config.out, config)  # a resumed run keeps its own seed list
    plan = resolve_plan(setup.store, setup.dataset, setup.recipe, config.seeds, config.dataset, config.data_root,
                        resume_from=str(Location(config.out) / CHECKPOINT) if checkpoint is not None else None)
    config = replace(config, seeds=plan.seeds)
    for i, why in left_out_of(setup.store, plan.seeds).items():  # one line each, in the job's log (the driver's)
        print(f"stillroom: skipped: sample {i} is left out of every epoch: {why} (,bad=skip at labeling)",
              file=sys.stderr)
    if config.workers > 1:
        from stillroom.student.train_ray import train_distributed

        make_student(setup)  # refuses a bad student or --init before any worker starts
        return train_distributed(config, plan)
    return fit(config, Distributed(metrics=_process_metrics(config)), setup=setup, plan=plan, checkpoint=checkpoint)


def _process_metrics(config: TrainConfig) -> Metrics:
    """Ray's metrics for a one-worker run inside a Ray job or a process connected to Ray; Ray is not imported
    otherwise."""
    if not os.environ.get("RAY_ADDRESS") and "ray" not in sys.modules:
        return NO_METRICS
    from stillroom.student.train_ray import process_metrics

    return process_metrics(config)


__all__ = ["train"]
