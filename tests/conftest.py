"""Shared fixtures: one local Ray cluster per test session, tiny teachers made on the spot."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from stillroom.pipelines.data import FASHION_MNIST_DIR

SYNTHETIC = "synthetic:n=256,classes=4,size=16"
needs_fmnist = pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                                  reason="Debian package dataset-fashion-mnist is not installed")


def run_cli(*args: str, cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """``stillroom ARGS`` run in this process (``services.cli.main``), its exit code and output as a finished
    process's: a command's own behaviour at no process start (torch and stillroom imported again, about 4 s
    each). Where the process itself is the point (a killed run, an installed script, Ray), tests start one.
    What a command changes for the process (torch's threads, the environment, the directory) is put back."""
    import io

    import torch

    from stillroom.services.cli import main

    threads, env, here = torch.get_num_threads(), dict(os.environ), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse: --help, a bad flag
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["stillroom", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session", autouse=True)
def _shard_stage(tmp_path_factory):
    """Parquet shards staged from object storage (``pipelines.data.stage``) go under the session's temp folder,
    here and in every process a test starts."""
    os.environ.setdefault("STILLROOM_SHARD_STAGE", str(tmp_path_factory.mktemp("shard-stage")))


@pytest.fixture(scope="session")
def ray_cluster(request):
    """A real local Ray (2 CPUs, with its dashboard for the Jobs API), shared by every Ray test; shut down
    at the end. The S3 server starts first where it can: its credentials are then in the environment that the
    cluster's processes inherit, as a real cluster's nodes have theirs, so runs on s3:// use this cluster too."""
    import ray

    from stillroom.services.launcher import free_port  # here: a bare GPU machine's `pytest -m gpu` has no SQLAlchemy

    # Ray's metrics every 2 s, not 10: the metrics test reads them back (before the cluster starts: its processes
    # take it from the environment)
    os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")
    if not ray.is_initialized():
        with contextlib.suppress(pytest.skip.Exception):  # no S3 server here: only the tests that need one skip
            request.getfixturevalue("s3")
        _agent_port_of_our_own(free_port())
        # address="local": always a new cluster of our own, never one that `ray start` left on this machine
        ctx = ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                       dashboard_port=free_port(), log_to_driver=False)
        _DASHBOARD.append(f"http://{ctx.dashboard_url}")
    yield ray
    ray.shutdown()


_DASHBOARD: list[str] = []


def _agent_port_of_our_own(port: int) -> None:
    """Gives the cluster's dashboard agent a free port instead of Ray's fixed 52365, which `ray.init` offers no
    argument for: two test runs on one machine would otherwise share one agent, and the second's Jobs API answers
    "No available agent to submit job"."""
    from ray._private import parameter

    init = parameter.RayParams.__init__
    if getattr(init, "_stillroom_port", None):
        return

    def with_port(self, *args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", port)
        init(self, *args, **kwargs)

    with_port._stillroom_port = port  # type: ignore[attr-defined]
    parameter.RayParams.__init__ = with_port  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def ray_dashboard(ray_cluster) -> str:
    """The shared cluster's dashboard URL: where the job service submits Ray jobs."""
    return _DASHBOARD[0]


@pytest.fixture(scope="session")
def s3():
    """A real S3-compatible server on 127.0.0.1 (moto), its credentials in the environment (tests/s3_server.py)."""
    from s3_server import serve_s3

    yield from serve_s3()


def make_teacher(path: Path, num_classes: int = 4, in_chans: int = 1, resolution: int = 16, seed: int = 0,
                 name: str = "test_resnet") -> str:
    """A randomly initialised timm test model saved as a stillroom teacher checkpoint; returns NAME@PATH."""
    import timm
    import torch

    from stillroom.pipelines.teachers import Preprocess, save_checkpoint

    torch.manual_seed(seed)
    kwargs = {"num_classes": num_classes, "in_chans": in_chans}
    model = timm.create_model(name, pretrained=False, **kwargs)
    save_checkpoint(path, name, model, kwargs, Preprocess(resolution, (0.5,) * in_chans, (0.25,) * in_chans, in_chans),
                    extra={})
    return f"{name}@{path}"


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    return make_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt")


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("ensemble")
    return [make_teacher(d / f"t{i}.pt", seed=i) for i in range(2)]


@pytest.fixture
def decodes(monkeypatch) -> list[int]:
    """Counts PIL decoder runs in this process (``ImageFile.load`` with tiles left to decode)."""
    from PIL import ImageFile

    calls = [0]
    load = ImageFile.ImageFile.load

    def counting(self):
        calls[0] += bool(self.tile)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting)
    return calls


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An offline hub cache holding ``HUB_ID``'s weights, used by timm's real download code in this process
    (``HF_HOME`` for subprocesses; huggingface_hub reads its constants at import, so they are set too)."""
    import huggingface_hub.constants as hf

    home = tmp_path / "hf"
    from hub_cache import write_hub_cache

    model = write_hub_cache(home)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    return model
