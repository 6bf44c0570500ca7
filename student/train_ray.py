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

Ray is started locally (``ray.init()``) unless a cluster is already connected or ``RAY_ADDRESS`` names one.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pipelines.errors import StillroomError
from student.config import TrainConfig
from student.trainer import Distributed, fit


def _absolute(config: TrainConfig) -> TrainConfig:
    """Workers may run in another directory: make every path absolute."""
    def absolute(p: str) -> str:
        return str(Path(p).resolve())

    return replace(config, store=absolute(config.store), out=absolute(config.out),
                   init=absolute(config.init) if config.init else None,
                   data_root=absolute(config.data_root) if config.data_root else None)


def _worker_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as torch_dist

    cfg = dict(loop_config["config"])
    cfg["seeds"] = tuple(cfg["seeds"]) if cfg["seeds"] is not None else None
    config = TrainConfig(**cfg)
    ctx = ray.train.get_context()
    world = ctx.get_world_size()
    if config.loader_workers is None:  # the cores of this machine, shared by the ranks on it
        from pipelines.datasets import load_dataset
        from student._loader import default_loader_workers

        in_memory = load_dataset(config.dataset, config.split, config.data_root).in_memory
        config = replace(config, loader_workers=default_loader_workers(in_memory, ctx.get_local_world_size()))

    def all_reduce_mean(t: torch.Tensor) -> None:
        torch_dist.all_reduce(t)
        t.div_(world)

    fit(config, Distributed(rank=ctx.get_world_rank(), world_size=world, wrap=ray.train.torch.prepare_model,
                            all_reduce_mean=all_reduce_mean, device=ray.train.torch.get_device()))


def train_distributed(config: TrainConfig) -> dict[str, Any]:
    """Train on ``config.workers`` Ray Train workers and return rank 0's final metrics."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = _absolute(config)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    # cuda: the workers ask Ray for GPUs even where this (coordinating) process sees none; auto: as it sees
    use_gpu = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    loop_config = {"config": {**config.__dict__, "seeds": list(config.seeds) if config.seeds else None,
                              "device": "cuda" if use_gpu else "cpu"}}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        _worker_loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=use_gpu, resources_per_worker=(
            {"CPU": 1 + config.loader_workers} if config.loader_workers is not None else None)),
        run_config=RunConfig(name="ray_train", storage_path=str(out)),
    )
    try:
        trainer.fit()
    except Exception as e:  # a worker's StillroomError arrives wrapped; say what it was
        cause: BaseException = e
        while cause.__cause__ is not None and not isinstance(cause, StillroomError):
            cause = cause.__cause__
        if isinstance(cause, StillroomError):
            raise cause from None
        raise
    metrics = out / "metrics.json"
    if not metrics.exists():
        raise StillroomError(f"Ray Train finished but rank 0 wrote no {metrics}")
    return json.loads(metrics.read_text())
