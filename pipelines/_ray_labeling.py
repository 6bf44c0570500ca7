"""The labeling job's Ray side: a pool of actors, each holding the teachers, labeling whole pieces.

The only module of ``pipelines`` that imports Ray. Each actor reserves the CPUs its teacher should use
(Ray sets OMP_NUM_THREADS to the actor's ``num_cpus``; the default of 1 would run torch on one thread),
or ``gpus_per_worker`` GPUs. An actor that dies is restarted and its call retried
(``max_restarts``/``max_task_retries``); a piece is written whole by one call, so a retry rewrites it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import ray
import torch

from pipelines.errors import UsageError
from pipelines.labeling import LabelConfig, Labeler

RETRIES = 3


@ray.remote(max_restarts=RETRIES, max_task_retries=RETRIES)
class LabelWorker:
    """One Ray actor: loads the dataset and the teachers once, then labels pieces on request."""

    def __init__(self, config: LabelConfig, store_path: str, num_threads: int, device: str):
        torch.set_num_threads(max(1, num_threads))
        self.labeler = Labeler(config, store_path, device)

    def pid(self) -> int:
        return os.getpid()

    def label_piece(self, seed: int, piece: int, start: int, stop: int) -> dict:
        return {**self.labeler.label_piece(seed, piece, start, stop),
                "node_id": ray.get_runtime_context().get_node_id()}


def connect(address: str | None) -> None:
    """Join the cluster at ``address``, or start a local one; a clear error if nothing answers there."""
    if address and address != "auto":
        _check_reachable(address)
    if ray.is_initialized():
        _check_same_cluster(address)
        return
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UsageError(f"no Ray cluster at {address or 'local'}: {str(e).splitlines()[0][:200]}") from None


def _check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """Fail in seconds, not minutes (ray.init retries a dead GCS for about two), when nothing listens there."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not port.isdigit():
        return  # a form Ray resolves itself
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise UsageError(f"no Ray cluster at {address}: {e.strerror or e}") from None


def _check_same_cluster(address: str | None) -> None:
    """This process already holds a Ray connection (one per process): refuse an address of another cluster
    rather than label on the wrong one. Compared by GCS port: the host may be spelled several ways."""
    if not address or address == "auto" or "://" in address:
        return
    current = ray.get_runtime_context().gcs_address or ""
    port, current_port = address.rpartition(":")[2], current.rpartition(":")[2]
    if port.isdigit() and current_port.isdigit() and int(port) != int(current_port):
        raise UsageError(f"this process is connected to the Ray cluster at {current}; cannot also join {address}")


def label_on_ray(config: LabelConfig, store_path: str, work: list[tuple[int, int, int, int]],
                 on_done: Callable[[int], object]) -> dict[str, float]:
    """Label ``work`` (seed, piece, start, stop) on a pool of ``config.num_workers`` actors; return the
    seconds spent starting the actors (teachers loaded) and labeling."""
    t0 = time.perf_counter()
    connect(config.ray_address)
    gpus = config.gpus_per_worker
    if gpus > 0 and ray.cluster_resources().get("GPU", 0) <= 0:  # the actors would wait for GPUs forever
        raise UsageError(f"--gpus-per-worker {gpus}: the Ray cluster has no GPU; drop the flag to label on CPUs")
    cpus_total = int(ray.cluster_resources().get("CPU", 1))
    workers = max(1, min(config.num_workers, len(work)))
    # leave nothing idle, but never ask for more CPUs than the cluster has (the actors would never start)
    cpus_each = 1 if gpus else max(1, cpus_total // workers)
    device = "cuda" if gpus else "cpu"
    # named for the dashboard's Actors view: the store's cache key and the worker's number
    key = os.path.basename(store_path.rstrip("/"))
    actors = [
        LabelWorker.options(num_cpus=cpus_each, num_gpus=gpus,  # type: ignore[attr-defined]
                            name=f"stillroom-label-{key}-{os.getpid()}-{i}").remote(
            config, store_path, cpus_each, device)
        for i in range(workers)
    ]
    try:
        ray.get([a.pid.remote() for a in actors])  # every actor up, its teachers loaded
        t_ready = time.perf_counter()
        pending = list(work)
        nodes: set[str] = set()
        in_flight: dict[ray.ObjectRef, tuple[int, int]] = {}
        free = list(range(workers))
        while pending or in_flight:
            while pending and free:
                slot = free.pop()
                item = pending.pop(0)
                in_flight[actors[slot].label_piece.remote(*item)] = (slot, item[3] - item[2])
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                slot, n = in_flight.pop(ref)
                nodes.add(ray.get(ref)["node_id"])  # raises if the piece failed after every retry
                free.append(slot)
                on_done(n)
        t_end = time.perf_counter()
    finally:  # a failed piece must not leave actors holding the cluster's CPUs
        for actor in actors:
            ray.kill(actor)
    return {"startup_s": t_ready - t0, "work_s": t_end - t_ready, "nodes": len(nodes)}
