"""Ray Train runs on a real local Ray: the ranks replay the run's plan and TaT on a student with no known last
module keeps DDP (the ranks' weights stay equal); the eval split is shared by the ranks; a worker's error is one
line. A worker killed mid-run is restarted from the last reported checkpoint in tests/student/test_run_on_s3.py
(a run directory on S3: the harder case of the two)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from stillroom.pipelines.data import load_dataset
from stillroom.pipelines.labeling import LabelConfig, run_labeling
from stillroom.student.config import TrainConfig
from stillroom.student.evaluate import eval_ids, evaluate
from stillroom.student.models import build_student

DATA = "synthetic:n=64,classes=4,size=16"
# a timm student none of whose modules is a known last one (norm, final_conv, conv_head, layer4, stages, blocks)
NAMELESS = {"student": "rexnet_100", "student_kwargs": {"width_mult": 0.25}}


@pytest.fixture(scope="module")
def feature_store(tmp_path_factory, tiny_teacher) -> str:
    config = LabelConfig(dataset=DATA, teachers=(tiny_teacher,), store_root=str(tmp_path_factory.mktemp("stores")),
                         batch_size=64, chunk_rows=64, top_k=3, features="final", feature_grid=2)
    return run_labeling(config, backend="local", progress=False)["store"]


def _config(store: str, out: Path, **kw: Any) -> TrainConfig:
    base = dict(store=store, dataset=DATA, student="test_resnet", loss="kd", out=str(out), batch_size=16,
                epochs=1, progress=False)
    return TrainConfig(**{**base, **kw})


def _eval_rank(rank: int, port: int, results: Any) -> None:
    """One of two gloo ranks (forked): the same student, its BatchNorm statistics made to differ from rank 0's,
    scoring its share of the split."""
    import torch.distributed as torch_dist

    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = build_student("test_resnet", 4, 1, 16)
        if rank == 1:  # what a rank's own last training batch leaves in its buffers
            for name, buf in model.named_buffers():
                if name.endswith("running_mean"):
                    buf.add_(3.0)

        def all_reduce_mean(t: torch.Tensor) -> None:
            torch_dist.all_reduce(t)
            t.div_(2)

        ds = load_dataset("synthetic:n=50,classes=4,size=16", "test")
        score = evaluate(model, ds, 16, batch_size=8, rank=rank, world_size=2, all_reduce_mean=all_reduce_mean)
        results.put((rank, (score, {k: v.numpy().copy() for k, v in model.named_buffers()})))  # by value
    finally:
        torch_dist.destroy_process_group()


def test_the_ranks_eval_shares_partition_the_split_and_sum_to_one_process():
    import multiprocessing

    from stillroom.services.launcher import free_port

    parts = [eval_ids(10, None, r, 3) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))
    assert sorted(np.concatenate([eval_ids(10, 7, r, 3) for r in range(3)]).tolist()) == list(range(7))

    # two real gloo ranks: each scores its half with rank 0's buffers; the summed counts are one process's score
    # spawned, not forked: a fork of this process (torch's thread pools already running) can hang in gloo
    ctx = multiprocessing.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_eval_rank, args=(r, port, results)) for r in range(2)]
    for proc in procs:
        proc.start()
    scores = dict(results.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
    torch.manual_seed(0)
    model = build_student("test_resnet", 4, 1, 16)
    whole = evaluate(model, load_dataset("synthetic:n=50,classes=4,size=16", "test"), 16, batch_size=8)
    assert scores[0][0] == scores[1][0] == whole
    for name, buf in model.named_buffers():  # rank 1 scored with rank 0's statistics, the ones last.pt keeps
        assert np.array_equal(scores[1][1][name], buf.numpy()) and np.array_equal(scores[0][1][name], buf.numpy()), name


@pytest.mark.slow
@pytest.mark.ray
def test_ray_train_ranks_replay_the_plans_seeds_and_tat_keeps_ddp_on_a_nameless_student(tmp_path, tiny_teacher,
                                                                                      ray_cluster):
    """One Ray Train start (its worker group costs tens of seconds here), two checks on two real workers:
    - the run's plan: rank 1 opens its run only after a label job committed seed 2, and both ranks replay the seeds
      the driver resolved before they started (student.plan);
    - TaT on a student none of whose modules is a known last one keeps DDP: the ranks' weights stay equal."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from stillroom.pipelines.store import LabelStore
    from stillroom.student.plan import resolve_plan
    from stillroom.student.train_ray import worker_loop_config
    from stillroom.student.trainer import prepare

    def label(seeds: tuple[int, ...]) -> str:
        config = LabelConfig(dataset=DATA, teachers=(tiny_teacher,), store_root=str(tmp_path / "stores"),
                             batch_size=64, chunk_rows=64, top_k=3, features="final", feature_grid=2, seeds=seeds)
        return str(run_labeling(config, backend="local", progress=False)["store"])

    store = label((0, 1))
    out = tmp_path / "tat"
    out.mkdir()
    config = _config(store, out, loss="tat", workers=2, max_steps=3, **NAMELESS)
    setup = prepare(config)
    plan = resolve_plan(setup.store, setup.dataset, setup.recipe, None, config.dataset, config.data_root)

    def loop(loop_config: dict[str, Any]) -> None:
        from stillroom.student.models import unwrap
        from stillroom.student.train_ray import worker_config, worker_distributed, worker_plan
        from stillroom.student.trainer import prepare, start_run, train_one_epoch

        cfg, dist = worker_config(loop_config), worker_distributed()
        where = Path(cfg.out)
        if dist.rank == 0:  # before start_run: its DDP set-up waits for rank 1, which waits for the commit
            (where / "rank0-started").touch()
        if dist.rank == 1:
            deadline = time.monotonic() + 240
            while not (where / "committed").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        run = start_run(cfg, dist, prepare(cfg), plan=worker_plan(loop_config))
        (where / f"rank{dist.rank}.json").write_text(json.dumps(list(run.stream.seeds)))
        before = {k: v.clone() for k, v in unwrap(run.student).named_parameters()}
        train_one_epoch(run, 0)
        after = dict(unwrap(run.student).named_parameters())
        torch.save({"before": before, "after": {k: v.detach() for k, v in after.items()}},
                   where / f"rank{dist.rank}.pt")

    trainer = TorchTrainer(loop, train_loop_config=worker_loop_config(replace(config, seeds=plan.seeds), False, plan),
                           scaling_config=ScalingConfig(num_workers=2),
                           run_config=RunConfig(name="tat", storage_path=str(tmp_path / "ray")))
    runner = threading.Thread(target=trainer.fit)
    runner.start()
    deadline = time.monotonic() + 240
    while not (out / "rank0-started").exists() and runner.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    label((2,))
    (out / "committed").touch()
    runner.join(timeout=300)
    assert not runner.is_alive()
    assert LabelStore(store).seeds() == [0, 1, 2]
    assert json.loads((out / "rank0.json").read_text()) == json.loads((out / "rank1.json").read_text()) == [0, 1]

    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    names = list(ranks[0]["after"])
    assert names and any(not torch.equal(ranks[0]["before"][k], ranks[0]["after"][k]) for k in names)  # it trained
    diverged = [k for k in names if not torch.equal(ranks[0]["after"][k], ranks[1]["after"][k])]
    assert diverged == []


@pytest.mark.ray
def test_a_training_worker_error_is_one_line_with_ray_traceback_kept(ray_cluster):
    """What Ray Train's fit raises for a worker's DataError (Ray's own RayTaskError, inside a WorkerGroupError
    by rank, or as a cause): its cause on one line, Ray's traceback kept for the job's log, colour codes gone."""
    import ray
    from ray.train.v2.api.exceptions import WorkerGroupError

    from stillroom.pipelines.core import DataError, error_line
    from stillroom.student.train_ray import worker_error

    @ray.remote
    def decode() -> None:
        raise DataError("/data/train/n01/x.JPEG: cannot decode (broken data stream when reading image file)")

    with pytest.raises(ray.exceptions.RayTaskError) as caught:
        ray.get(decode.remote())
    raised = caught.value
    chained = RuntimeError("Training failed")
    chained.__cause__ = raised
    for wrapped in (WorkerGroupError("rank 0 failed", {0: raised}), chained):
        error = worker_error(wrapped)
        assert isinstance(error, DataError)
        assert error_line(error) == ("DataError: /data/train/n01/x.JPEG: cannot decode (broken data stream when "
                                     "reading image file)")
        tb = error.worker_traceback or ""
        assert "ray::decode()" in tb and ", in decode" in tb and "\x1b[" not in tb
    assert worker_error(RuntimeError("the controller failed")) is None
