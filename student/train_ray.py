"""Data-parallel student training through Ray Train: the only module of ``student`` that imports Ray.

``train_distributed(config)`` runs ``student.trainer.fit`` on ``config.workers`` Ray Train workers
(``TorchTrainer``; DDP over gloo on CPU, nccl on GPU). Worker ``r`` of ``W`` takes every W-th sample of each
epoch's permutation, so the workers see distinct shards and together the whole epoch; DDP averages the
student's gradients, and the loss modules' own gradients (discriminator, TaT) are averaged by an all-reduce.
Rank 0 evaluates and writes the run directory; the driver returns its ``metrics.json``.

Each rank streams its shard through its own loader (``student.data.StoreStream``): its batch sampler holds only
its ids, so its ``--loader-workers`` processes decode only its images. An explicit ``--loader-workers N`` asks Ray
for ``1 + N`` CPUs per rank (the training process and its loader workers), so ranks are placed where those cores
are; left at its default, each rank asks for Ray's default (a CPU, or a GPU) and sizes its loader from the
cores of its machine shared by the ranks on it (``default_loader_workers``).

After each epoch every rank scores its share of the eval split (``student.evaluate``) and calls
``ray.train.report``, rank 0 with a checkpoint (its ``last.pt``, kept by Ray under ``RUN_DIR/ray_train``: on
object storage when ``--out`` is a URL, through Ray's ``storage_filesystem``, pyarrow's ``PyFileSystem`` over
stillroom's own fsspec filesystem, so Ray writes with the same endpoint and credentials chain; there Ray's copy is
made by the object store from the ``last.pt`` rank 0 uploaded, so it goes up once an epoch), so
``FailureConfig(max_failures=config.max_failures)`` restarts a run whose worker died: the new workers continue
from the last reported checkpoint (``ray.train.get_checkpoint``), the epochs it holds kept as they were.

Ray is started locally (``ray.init()``) unless a cluster is already connected or ``RAY_ADDRESS`` names one.

Every worker exports ``TRAIN_METRICS`` to Ray's metrics (Prometheus: ``ray_stillroom_train_<name>[_total]``),
tagged with the job, the store's cache key, the node and the rank; a one-worker run inside a Ray job (the
service's) exports them from its own process (``process_metrics``).
"""

from __future__ import annotations

import functools
import os
import shutil
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from stillroom.pipelines.core import (
    COUNTER,
    GAUGE,
    HISTOGRAM,
    NO_METRICS,
    ExportedMetrics,
    Location,
    MetricDef,
    Metrics,
    StillroomError,
    from_worker,
    is_url,
    job_id,
)
from stillroom.student.config import TrainConfig
from stillroom.student.plan import RunPlan
from stillroom.student.trainer import CHECKPOINT, RAY_TRAIN_DIR, Distributed, fit

TRAIN_METRICS = {
    "samples": MetricDef(COUNTER, "training samples seen by the rank"),
    "samples_per_s": MetricDef(GAUGE, "training samples per second of the rank over its last epoch"),
    "loss": MetricDef(GAUGE, "each named loss term of the rank's last step", tag_keys=("term",)),
    "learning_rate": MetricDef(GAUGE, "the learning rate of the last step"),
    "epoch": MetricDef(GAUGE, "the epoch being trained (from 0)"),
    "eval_top1": MetricDef(GAUGE, "top-1 accuracy on the eval split after the last evaluated epoch"),
    "loader_wait_seconds": MetricDef(HISTOGRAM, "seconds the step waited for the loader's next batch"),
}


def train_metrics(job: str, store: str, rank: int) -> Metrics:
    """This process's training metrics, tagged with ``job``, the store's key, this node and ``rank``."""
    import ray

    from stillroom.pipelines.labeling.ray_pool import make_ray_metric

    tags = {"job": job, "store": os.path.basename(store.rstrip("/")),
            "node": ray.get_runtime_context().get_node_id(), "rank": str(rank)}
    return ExportedMetrics("stillroom_train", TRAIN_METRICS, tags, make_ray_metric)


def this_job() -> str:
    """The job the metrics name: the service's job id, else this Ray job's id."""
    import ray

    return job_id(ray.get_runtime_context().get_job_id())


def process_metrics(config: TrainConfig) -> Metrics:
    """The metrics of a one-worker run in this process: Ray's when this process is a Ray job's (``RAY_ADDRESS``
    set by the job's supervisor) or is connected to Ray already, else none."""
    import ray

    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):
            return NO_METRICS
        ray.init(address=os.environ["RAY_ADDRESS"], include_dashboard=False, log_to_driver=False)
    return train_metrics(this_job(), config.store, 0)


def _absolute(config: TrainConfig) -> TrainConfig:
    """Workers may run in another directory: make every path absolute."""
    def absolute(p: str) -> str:  # a URL (s3://...) is the same on every node already
        return p if is_url(p) else str(Path(p).resolve())

    return replace(config, store=absolute(config.store), out=absolute(config.out),
                   init=absolute(config.init) if config.init else None,
                   data_root=absolute(config.data_root) if config.data_root else None)


def worker_distributed(resume_from: str | None = None, metrics: Metrics = NO_METRICS, out: str | None = None
                       ) -> Distributed:
    """This Ray Train worker's ``Distributed``: its rank, DDP, gloo/nccl all-reduce, its device and the epoch
    report (``report_epoch`` for the run directory ``out``)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as torch_dist

    ctx = ray.train.get_context()
    world = ctx.get_world_size()

    def all_reduce_mean(t: torch.Tensor) -> None:
        torch_dist.all_reduce(t)
        t.div_(world)

    return Distributed(rank=ctx.get_world_rank(), world_size=world, wrap=ray.train.torch.prepare_model,
                       all_reduce_mean=all_reduce_mean, device=ray.train.torch.get_device(), resume_from=resume_from,
                       end_epoch=functools.partial(report_epoch, out=out), metrics=metrics)


def report_epoch(record: dict[str, Any], checkpoint: Path | None, out: str | None = None) -> None:
    """``ray.train.report`` on every rank (it is a barrier): the epoch's scalars, and from rank 0 its checkpoint
    (``checkpoint``, a ``last.pt``), which Ray keeps in its storage and hands to the workers of a restart. A run
    directory ``out`` on a URL has that ``last.pt`` uploaded already (``RunDirectory.sync``): Ray's copy is made
    from it in the object store (``copy_uploaded``), so the checkpoint goes up once an epoch, not twice."""
    import ray.train

    metrics = {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    metrics.update({f"loss/{k}": v for k, v in record.get("losses", {}).items()})
    if checkpoint is None:
        ray.train.report(metrics, checkpoint=None)
        return
    staging = checkpoint.parent / ".ray-checkpoint"  # beside last.pt: a hard link costs nothing on one disk
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        try:
            os.link(checkpoint, staging / CHECKPOINT)
        except OSError:
            shutil.copy2(checkpoint, staging / CHECKPOINT)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(staging)),
                         checkpoint_dir_name=f"epoch_{int(record['epoch']):04d}",
                         checkpoint_upload_fn=copy_uploaded(out) if out is not None and is_url(out) else None)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def copy_uploaded(out: str) -> Callable[[Any, str], Any]:
    """Ray Train's ``checkpoint_upload_fn`` for a run directory ``out`` on object storage: the ``last.pt`` that
    rank 0 uploaded to ``out`` is copied to Ray's checkpoint directory there (``ray_train/<dir_name>``) by the
    object store itself (S3's CopyObject: no byte goes up again), and Ray is handed that directory."""
    def upload(checkpoint: Any, dir_name: str) -> Any:
        import ray.train

        run = Location(out)
        target = run / RAY_TRAIN_DIR / dir_name
        (run / CHECKPOINT).copy_to(target / CHECKPOINT)
        filesystem, path = target.arrow_filesystem()
        return ray.train.Checkpoint(path=path, filesystem=filesystem)

    return upload


def worker_config(loop_config: dict[str, Any]) -> TrainConfig:
    """The run's config as a worker sees it: its loader workers sized from its machine when not given."""
    import ray.train

    cfg = dict(loop_config["config"])
    cfg["seeds"] = tuple(cfg["seeds"]) if cfg["seeds"] is not None else None
    config = TrainConfig(**cfg)
    if config.loader_workers is None:  # the cores of this machine, shared by the ranks on it
        from stillroom.pipelines.data import load_dataset
        from stillroom.student._loader import default_loader_workers

        in_memory = load_dataset(config.dataset, config.split, config.data_root).in_memory
        config = replace(config, loader_workers=default_loader_workers(
            in_memory, ray.train.get_context().get_local_world_size()))
    return config


def worker_plan(loop_config: dict[str, Any]) -> RunPlan:
    """The run's plan (``student.plan``) as ``train`` resolved it before the workers started: every rank's."""
    return RunPlan.from_dict(loop_config["plan"])


def _worker_loop(loop_config: dict[str, Any]) -> None:
    import ray.train

    config, plan = worker_config(loop_config), worker_plan(loop_config)
    metrics = train_metrics(loop_config["job"], config.store, ray.train.get_context().get_world_rank())
    restart = ray.train.get_checkpoint()  # set when Ray restarts the run after a worker died
    if restart is None:
        if not config.resume and (Location(config.out) / CHECKPOINT).exists():
            # train() refused a run directory holding a run, so an earlier attempt of this run wrote it: Ray
            # restarted the run before its controller registered a reported checkpoint (it polls every 2 s)
            config = replace(config, resume=True)
        fit(config, worker_distributed(metrics=metrics, out=config.out), plan=plan)
        return
    with restart.as_directory() as d:
        fit(config, worker_distributed(resume_from=str(Path(d) / CHECKPOINT), metrics=metrics, out=config.out),
            plan=plan)


def worker_loop_config(config: TrainConfig, use_gpu: bool, plan: RunPlan) -> dict[str, Any]:
    """The ``train_loop_config`` that ``worker_config`` and ``worker_plan`` read back on each worker."""
    return {"config": {**config.__dict__, "seeds": list(config.seeds) if config.seeds else None,
                       "device": "cuda" if use_gpu else "cpu"}, "plan": plan.to_dict(), "job": this_job()}


def worker_error(error: BaseException) -> StillroomError | None:
    """What a training worker raised, out of what Ray Train's ``fit`` raised (the cause chain; a
    ``WorkerGroupError``'s failures by rank; a ``RayTaskError``'s ``cause``), as ``from_worker`` makes it, with
    Ray's text of it as the traceback; None when no worker's error is in there."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # a RayTaskError: the exception the worker raised
        if isinstance(cause, BaseException):
            return from_worker(cause, str(e), "training worker")
        if isinstance(e, StillroomError):
            return from_worker(e, "".join(traceback.format_exception(e)), "training worker")
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo += [f for _, f in sorted(failures.items()) if isinstance(f, BaseException)]
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
    return None


def train_distributed(config: TrainConfig, plan: RunPlan) -> dict[str, Any]:
    """Train on ``config.workers`` Ray Train workers, each given ``plan`` (``student.run.train`` resolved it),
    and return rank 0's final metrics."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = _absolute(config)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    # cuda: the workers ask Ray for GPUs even where this (coordinating) process sees none; auto: as it sees
    use_gpu = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    loop_config = worker_loop_config(config, use_gpu, plan)
    out = Location(config.out)
    out.makedirs()
    # a URL: Ray writes its checkpoints through our fsspec filesystem (pyarrow's, over it), to the path without
    # its protocol (bucket/prefix/run), as RunConfig's storage_filesystem asks
    storage_fs, storage_path = out.arrow_filesystem()
    trainer = TorchTrainer(
        _worker_loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=use_gpu, resources_per_worker=(
            {"CPU": 1 + config.loader_workers} if config.loader_workers is not None else None)),
        run_config=RunConfig(name=RAY_TRAIN_DIR, storage_path=storage_path,
                             storage_filesystem=storage_fs if out.local is None else None,
                             failure_config=FailureConfig(max_failures=config.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    try:
        trainer.fit()
    except Exception as e:  # a worker's error arrives wrapped: its cause on one line, the traceback for the log
        error = worker_error(e)
        if error is not None:
            raise error from None
        raise
    metrics = out / "metrics.json"
    if not metrics.exists():
        raise StillroomError(f"Ray Train finished but rank 0 wrote no {metrics}")
    return dict(metrics.read_json())
