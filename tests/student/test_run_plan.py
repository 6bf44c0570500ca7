"""The run's plan (student.plan): the store's seeds are resolved once, before any rank starts, and every rank
replays them: a seed committed between two ranks' starts changes nothing either rank replays. The same on two
real Ray Train workers: tests/student/test_train_ray.py."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from stillroom.pipelines.labeling import LabelConfig, run_labeling
from stillroom.pipelines.store import LabelStore, StoreError
from stillroom.student.config import TrainConfig
from stillroom.student.plan import RunPlan, resolve_plan
from stillroom.student.train_ray import worker_config, worker_loop_config, worker_plan
from stillroom.student.trainer import Distributed, prepare, start_run

DATA = "synthetic:n=64,classes=4,size=16"


def _label(root: Path, teacher: str, seeds: tuple[int, ...]) -> str:
    config = LabelConfig(dataset=DATA, teachers=(teacher,), store_root=str(root), batch_size=64, chunk_rows=32,
                         top_k=3, seeds=seeds)
    return str(run_labeling(config, backend="local", progress=False)["store"])


def _config(store: str, out: Path, **kw: Any) -> TrainConfig:
    return TrainConfig(**{**dict(store=store, dataset=DATA, student="test_resnet", loss="kd", out=str(out),
                                 batch_size=16, epochs=3, progress=False, loader_workers=0), **kw})


def _plan(config: TrainConfig) -> RunPlan:
    setup = prepare(config)
    return resolve_plan(setup.store, setup.dataset, setup.recipe, config.seeds, config.dataset, config.data_root)


def test_a_seed_committed_between_two_ranks_starts_changes_nothing_either_rank_replays(tmp_path, tiny_teacher):
    root = tmp_path / "stores"
    store = _label(root, tiny_teacher, (0, 1))
    config = _config(store, tmp_path / "run", workers=2)
    plan = _plan(config)
    # what each Ray Train worker reads back (student.train_ray): the config and the plan of the driver
    loop_config = worker_loop_config(replace(config, seeds=plan.seeds), use_gpu=False, plan=plan)
    loop_config = json.loads(json.dumps(loop_config))  # as Ray hands it over: by value

    def rank_stream(rank: int) -> Any:
        cfg = worker_config(loop_config)
        return start_run(cfg, Distributed(rank=rank, world_size=2), prepare(cfg), plan=worker_plan(loop_config)).stream

    rank0 = rank_stream(0)
    _label(root, tiny_teacher, (1, 2))  # a label job commits seed 2 while the ranks start
    assert LabelStore(store).seeds() == [0, 1, 2]  # a rank listing the store now would see it
    rank1 = rank_stream(1)
    assert rank0.seeds == rank1.seeds == (0, 1)
    assert [rank0.seed_for_epoch(e) for e in range(3)] == [rank1.seed_for_epoch(e) for e in range(3)] == [0, 1, 0]


def test_a_rank_that_opens_another_store_than_the_plans_is_refused(tmp_path, tiny_teacher):
    store = _label(tmp_path / "stores", tiny_teacher, (0,))
    config = _config(store, tmp_path / "run")
    plan = replace(_plan(config), cache_key="0" * 16)
    with pytest.raises(StoreError, match="cache_key .* where the run planned"):
        start_run(config, Distributed(), prepare(config), plan=plan)


def test_the_plan_names_every_complete_seed_once_or_refuses_missing_ones(tmp_path, tiny_teacher):
    store = _label(tmp_path / "stores", tiny_teacher, (0, 2))
    plan = _plan(_config(store, tmp_path / "run"))
    assert plan.seeds == (0, 2) and plan.cache_key == LabelStore(store).cache_key
    assert RunPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    with pytest.raises(StoreError, match=r"seeds \[1\] are not in store"):
        _plan(_config(store, tmp_path / "run", seeds=(0, 1)))
