"""Ray Train runs on a real local Ray: a worker killed mid-run is restarted from the last reported checkpoint and
the run ends; TaT on a student with no known last module keeps DDP (the ranks' weights stay equal); the eval
split is shared by the ranks."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
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
from stillroom.student.run import train

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
def test_a_killed_worker_is_restarted_from_the_last_checkpoint_and_the_run_ends(feature_store, tmp_path,
                                                                                ray_dashboard):
    from ray.util.state import list_actors

    out = tmp_path / "run"
    epochs = 20  # at 8 steps of 4 views per rank an epoch: long enough to be killed mid-run
    config = _config(feature_store, out, workers=2, epochs=epochs, batch_size=4, max_failures=2)
    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(train(config)))
    runner.start()
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    # two epochs recorded and Ray's controller has registered a reported checkpoint (it polls the workers)
    registered = out / "ray_train" / "checkpoint_manager_snapshot.json"
    while not (registered.exists() and len(metrics.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    before = metrics.read_text().splitlines()
    assert runner.is_alive() and 2 <= len(before) < epochs  # mid-run: some epochs done, not all
    workers = list_actors(ray_dashboard, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 2
    os.kill(workers[-1].pid, signal.SIGKILL)
    runner.join(timeout=400)
    assert not runner.is_alive()

    assert result["workers"] == 2 and result["epochs"] == epochs
    lines = metrics.read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == list(range(epochs))
    assert lines[0] == before[0]  # the restart continued from a checkpoint; it did not train epoch 0 again
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == epochs - 1 and len(ckpt["history"]) == epochs
    dead = list_actors(ray_dashboard, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "DEAD")])
    assert workers[-1].pid in [a.pid for a in dead]  # the worker killed is one that died


@pytest.mark.slow
@pytest.mark.ray
def test_tat_on_a_student_without_a_known_last_module_keeps_ddp_and_the_ranks_equal(feature_store, tmp_path,
                                                                                    ray_cluster):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from stillroom.student.plan import resolve_plan
    from stillroom.student.train_ray import worker_loop_config
    from stillroom.student.trainer import prepare

    out = tmp_path / "tat"
    config = _config(feature_store, out, loss="tat", workers=2, max_steps=3, **NAMELESS)

    def loop(loop_config: dict[str, Any]) -> None:
        from stillroom.student.models import unwrap
        from stillroom.student.train_ray import worker_config, worker_distributed
        from stillroom.student.trainer import prepare, start_run, train_one_epoch

        cfg = worker_config(loop_config)
        dist = worker_distributed()
        run = start_run(cfg, dist, prepare(cfg))
        before = {k: v.clone() for k, v in unwrap(run.student).named_parameters()}
        train_one_epoch(run, 0)
        after = dict(unwrap(run.student).named_parameters())
        torch.save({"before": before, "after": {k: v.detach() for k, v in after.items()}},
                   Path(cfg.out) / f"rank{dist.rank}.pt")

    setup = prepare(config)
    plan = resolve_plan(setup.store, setup.dataset, setup.recipe, None, config.dataset, config.data_root)
    TorchTrainer(loop, train_loop_config=worker_loop_config(config, use_gpu=False, plan=plan),
                 scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(name="tat", storage_path=str(tmp_path / "ray"))).fit()
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
