"""The labeling job's Ray side: a pool of actors, each holding the teachers, labeling whole pieces.

The only module of ``pipelines`` that imports Ray. Each actor reserves CPUs on one node (Ray sets
OMP_NUM_THREADS to the actor's ``num_cpus``; the default of 1 would run torch on one thread): its teacher's
threads and its decode processes (``pipelines._label_stream``) share them. Resources are counted per node:
an actor never asks for more CPUs than one node has, and the actors are spread over the nodes. With
``gpus_per_worker`` the actors ask for GPUs; a cluster without them yet is waited for (``gpu_wait_s``) and
then refused, never labeled on CPUs instead. An actor that dies is restarted and its call retried
(``max_restarts``/``max_task_retries``); a piece is written whole by one call, so a retry rewrites it.

Why actors with their own decode processes rather than a Ray Data pipeline (``map_batches`` decode stage,
then an ``ActorPoolStrategy`` teacher stage): a piece stays the unit of work, retry and resumption, written
whole by the actor that labeled it, and uint8 views go from a decode process to the teacher through shared
memory rather than through the object store; on a small node Ray Data's read and map tasks compete with the
teacher actor for the same CPUs (ray #44687) and its executor adds seconds of start-up.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import ray
import torch

from stillroom.pipelines.core import (
    COUNTER,
    GAUGE,
    HISTOGRAM,
    ExportedMetrics,
    MetricDef,
    Metrics,
    UsageError,
    from_worker,
    job_id,
)
from stillroom.pipelines.labeling.config import LabelConfig
from stillroom.pipelines.labeling.worker import Labeler

RETRIES = 3

# what the labeling job exports to Ray's metrics (Prometheus: ray_stillroom_label_<name>[_total]), each tagged with
# the job, the store's cache key and the node; recorded by the workers' Labeler, seeds_committed by the driver
LABEL_METRICS = {
    "views_labeled": MetricDef(COUNTER, "views labeled and written (samples x seeds, less those skipped)"),
    "images_per_s": MetricDef(GAUGE, "views labeled per second by one worker, over its last piece"),
    "decode_seconds": MetricDef(HISTOGRAM, "seconds a worker waited for a batch of decoded views"),
    "forward_seconds": MetricDef(HISTOGRAM, "seconds in the teachers' forward pass (and targets) of a batch"),
    "write_seconds": MetricDef(HISTOGRAM, "seconds writing one seed's piece to the store"),
    "bytes_written": MetricDef(COUNTER, "bytes of label arrays written to the store (before compression)"),
    "views_skipped": MetricDef(COUNTER, "views left out under ,bad=skip: their image failed to decode"),
    "seeds_committed": MetricDef(COUNTER, "seeds committed (COMPLETE written) by the job"),
}


def make_ray_metric(name: str, d: MetricDef, tag_keys: tuple[str, ...]) -> Any:
    """A ``ray.util.metrics`` Counter, Gauge or Histogram for ``d`` (``pipelines.core.ExportedMetrics``' maker)."""
    from ray.util import metrics

    if d.kind == HISTOGRAM:
        return metrics.Histogram(name, description=d.description, boundaries=list(d.boundaries), tag_keys=tag_keys)
    kind = metrics.Counter if d.kind == COUNTER else metrics.Gauge
    return kind(name, description=d.description, tag_keys=tag_keys)


def label_metrics(job: str, store_path: str) -> Metrics:
    """The labeling metrics of this process (a worker or the driver), tagged with ``job``, the store's key and
    this node."""
    tags = {"job": job, "store": os.path.basename(store_path.rstrip("/")),
            "node": ray.get_runtime_context().get_node_id()}
    return ExportedMetrics("stillroom_label", LABEL_METRICS, tags, make_ray_metric)


def this_job() -> str:
    """The job the metrics name: the service's job id, else this Ray job's id."""
    return job_id(ray.get_runtime_context().get_job_id())


@ray.remote(max_restarts=RETRIES, max_task_retries=RETRIES)
class LabelWorker:
    """One Ray actor: loads the dataset and the teachers once, then labels pieces on request."""

    def __init__(self, config: LabelConfig, store_path: str, num_threads: int, device: str, job: str = ""):
        if device == "cuda" and not torch.cuda.is_available():  # never a silent CPU fallback
            raise UsageError(f"label worker on {socket.gethostname()} was given a GPU by Ray but torch sees no CUDA")
        torch.set_num_threads(max(1, num_threads))
        self.labeler = Labeler(config, store_path, device)  # its decode processes: by the threads just set
        self.labeler.metrics = label_metrics(job, store_path)

    def pid(self) -> int:
        return os.getpid()

    def label_piece(self, seeds: tuple[int, ...], piece: int, start: int, stop: int,
                    generations: dict[int, int] | None = None) -> dict:
        return {**self.labeler.label_piece(seeds, piece, start, stop, generations),
                "node_id": ray.get_runtime_context().get_node_id()}


def item_seeds(seed: int | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    return (seed,) if isinstance(seed, int) else tuple(seed)


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


def node_cpus(with_gpus: bool = False) -> list[int]:
    """The CPU count of each alive node of the cluster that has CPUs (and GPUs, ``with_gpus``)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return [int(r["CPU"]) for r in nodes if r.get("CPU", 0) >= 1 and (r.get("GPU", 0) > 0 or not with_gpus)]


def cpus_per_worker(cpus: list[int], workers: int) -> int:
    """CPUs each of ``workers`` CPU actors asks for: the workers spread over the nodes (``ceil(workers /
    nodes)`` on a node), every actor sized for the smallest node, so every one fits on any node."""
    if not cpus:
        raise UsageError("the Ray cluster has no node with CPUs")
    per_node = -(-workers // len(cpus))
    return max(1, min(cpus) // per_node)


def wait_for_gpus(needed: float, wait_s: float, poll_s: float = 1.0) -> float:
    """Wait until the cluster holds ``needed`` GPUs (a GPU node may still be joining), up to ``wait_s``; refuse
    with a UsageError saying what is there otherwise. Returns the GPUs seen."""
    deadline = time.monotonic() + wait_s
    while True:
        have = float(ray.cluster_resources().get("GPU", 0))
        if have >= needed:
            return have
        if time.monotonic() >= deadline:
            raise UsageError(f"--gpus-per-worker: {needed:g} GPUs needed, the Ray cluster has {have:g} after waiting "
                             f"{wait_s:g} s; start the GPU nodes or drop the flag to label on CPUs")
        time.sleep(poll_s)


def label_on_ray(config: LabelConfig, store_path: str, work: list[tuple[Any, ...]],
                 on_done: Callable[[int, dict[str, Any]], object], start_timeout_s: float = 600.0) -> dict[str, Any]:
    """Label ``work`` (seeds, piece, start, stop[, the seeds' lease generations]) on a pool of
    ``config.num_workers`` actors spread over the nodes;
    return the seconds spent starting the actors (teachers loaded) and labeling, and how many pieces each node
    (by Ray node id) labeled. ``on_done(views, record)`` is called as each piece is written (``Labeler.label_piece``'s
    record: its ``skipped`` views among them)."""
    t0 = time.perf_counter()
    connect(config.ray_address)
    gpus = config.gpus_per_worker
    workers = max(1, min(config.num_workers, len(work)))
    if gpus > 0:
        wait_for_gpus(gpus * workers, config.gpu_wait_s)
    # a GPU worker's CPUs read (and, with decode=cpu, decode) the images for its GPU: counted on the GPU nodes
    cpus_each = cpus_per_worker(node_cpus(with_gpus=gpus > 0), workers)
    device = "cuda" if gpus else "cpu"
    # named for the dashboard's Actors view: the store's cache key and the worker's number
    key = os.path.basename(store_path.rstrip("/"))
    actors = [
        LabelWorker.options(num_cpus=cpus_each, num_gpus=gpus, scheduling_strategy="SPREAD",  # type: ignore[attr-defined]
                            name=f"stillroom-label-{key}-{os.getpid()}-{i}").remote(
            config, store_path, cpus_each, device, this_job())
        for i in range(workers)
    ]
    try:
        try:  # every actor up, its teachers loaded
            ray.get([a.pid.remote() for a in actors], timeout=start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise UsageError(f"{workers} label workers of {cpus_each} CPU(s) and {gpus:g} GPU(s) did not start in "
                             f"{start_timeout_s:g} s: the cluster has {ray.available_resources()} free") from None
        t_ready = time.perf_counter()
        pending = list(work)
        piece_nodes: dict[tuple[int, int], str] = {}
        in_flight: dict[ray.ObjectRef, tuple[int, int]] = {}
        free = list(range(workers))
        while pending or in_flight:
            while pending and free:
                slot = free.pop()
                item = pending.pop(0)
                in_flight[actors[slot].label_piece.remote(*item)] = (slot, (item[3] - item[2]) * len(item[0]))
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                slot, n = in_flight.pop(ref)
                try:
                    done = ray.get(ref)  # raises if the piece failed after every retry
                except ray.exceptions.RayTaskError as e:  # its cause on one line; Ray's traceback for the log
                    raise from_worker(e.cause, str(e), "label worker") from None
                except ray.exceptions.RayActorError as e:
                    raise from_worker(None, str(e), f"label worker (it died {RETRIES + 1} times)") from None
                for seed in item_seeds(done["seed"]):  # counted per seed's piece
                    piece_nodes[(seed, done["piece"])] = done["node_id"]
                free.append(slot)
                on_done(n, done)
        t_end = time.perf_counter()
    finally:  # a failed piece must not leave actors holding the cluster's CPUs
        for actor in actors:
            ray.kill(actor)
    per_node = Counter(piece_nodes.values())
    return {"startup_s": t_ready - t0, "work_s": t_end - t_ready, "nodes": len(per_node),
            "pieces_per_node": dict(per_node), "cpus_per_worker": cpus_each}
