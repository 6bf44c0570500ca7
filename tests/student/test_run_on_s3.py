"""A student run directory on object storage, against a real S3 server on 127.0.0.1 (moto, ``tests/s3_server.py``):
``stillroom train --out s3://...`` killed mid-run leaves each checkpoint beside its epoch's metrics, ``--resume``
from the URL finishes the run, ``stillroom eval`` scores ``best.pt`` from the URL; a two-worker Ray Train run
keeps its reported checkpoints on s3:// and a worker killed mid-run is restarted from there; the credentials
appear in nothing written or printed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from s3_server import S3Server

from stillroom.pipelines.core import RunDirectory, UsageError
from stillroom.pipelines.labeling import LabelConfig, run_labeling
from stillroom.student.config import TrainConfig
from stillroom.student.run import train

STILLROOM = str(Path(sys.executable).parent / "stillroom")
DATA = "synthetic:n=64,classes=4,size=16"
RUN_FILES = {"config.json", "metrics.jsonl", "metrics.json", "curves.png", "last.pt", "best.pt"}


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher) -> str:
    config = LabelConfig(dataset=DATA, teachers=(tiny_teacher,), store_root=str(tmp_path_factory.mktemp("stores")),
                         batch_size=64, chunk_rows=64, top_k=3)
    return run_labeling(config, backend="local", progress=False)["store"]


def _env(tmp: Path) -> dict[str, str]:
    """The run's environment: its staging directories under ``tmp`` (to see that none is left behind)."""
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}


def _train_args(store: str, out: str, *extra: str) -> list[str]:
    return [STILLROOM, "train", "--store", store, "--student", "test_resnet", "--loss", "kd", "--out", out,
            "--batch-size", "16", "--no-progress", *extra]


def _config(store: str, out: str, **kw) -> TrainConfig:
    return TrainConfig(**{"store": store, "dataset": DATA, "student": "test_resnet", "loss": "kd", "out": out,
                          "batch_size": 16, "progress": False, **kw})


def _objects(s3: S3Server, prefix: str) -> set[str]:
    root = f"{s3.bucket}/{prefix}/"
    return {p[len(root):] for p in s3.fs().find(root)}


def _lines(s3: S3Server, key: str) -> list[dict]:
    return [json.loads(x) for x in s3.fs().cat_file(f"{s3.bucket}/{key}").decode().splitlines()]


def test_run_directory_uploads_what_changed_checkpoints_last(s3: S3Server, tmp_path):
    run = RunDirectory(s3.url("unit"), last=("best.pt", "last.pt"))
    try:
        for name in ("last.pt", "best.pt", "metrics.jsonl", "tensorboard/events.1", ".last.pt.123.tmp.pt"):
            (run.local / name).parent.mkdir(parents=True, exist_ok=True)
            (run.local / name).write_text(name)
        assert run.sync() == ["metrics.jsonl", "tensorboard/events.1", "best.pt", "last.pt"]  # no hidden file
        assert run.sync() == []
        time.sleep(0.01)
        (run.local / "metrics.jsonl").write_text("two lines\n")
        assert run.sync() == ["metrics.jsonl"] and s3.fs().cat_file(f"{s3.bucket}/unit/metrics.jsonl") == b"two lines\n"
        assert str(run / "last.pt") == s3.url("unit", "last.pt") and run.url == s3.url("unit")
    finally:
        run.close()
    assert not run.local.exists()
    again = RunDirectory(s3.url("unit"))
    try:
        assert again.pull(skip=("last.pt", "tensorboard")) == ["best.pt", "metrics.jsonl"]
        assert (again.local / "metrics.jsonl").read_text() == "two lines\n" and again.sync() == []
    finally:
        again.close()
    local = RunDirectory(tmp_path / "plain")  # a plain path: written in place, nothing to upload or remove
    (tmp_path / "plain").mkdir()
    (local.local / "x").write_text("x")
    assert local.local == tmp_path / "plain" and local.sync() == [] and local.pull() == []
    local.close()
    assert (tmp_path / "plain" / "x").exists()


@pytest.mark.slow
def test_train_on_s3_killed_then_resumed_from_the_url_then_evaluated_from_it(s3: S3Server, store, tmp_path):
    out = s3.url("runs", "killed")
    epochs = 30  # 4 steps an epoch: long enough to be caught part-way
    printed = []
    proc = subprocess.Popen(_train_args(store, out, "--epochs", str(epochs)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(tmp_path / "tmp1"))
    try:
        deadline = time.monotonic() + 180
        while not s3.fs().exists(f"{s3.bucket}/runs/killed/last.pt"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no checkpoint was uploaded (rc {proc.poll()})")
            time.sleep(0.05)
        time.sleep(0.5)  # an epoch or two further
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        printed.append(proc.communicate(timeout=30)[0])
    assert proc.returncode == -signal.SIGKILL, "the run finished before it was killed"

    # what the crash left: each uploaded checkpoint with its epoch's metrics beside it (they went first)
    with s3.fs().open(f"{s3.bucket}/runs/killed/last.pt", "rb") as f:
        saved = torch.load(f, weights_only=True)
    done = [r["epoch"] for r in _lines(s3, "runs/killed/metrics.jsonl")]
    assert done[: saved["epoch"] + 1] == list(range(saved["epoch"] + 1)) and saved["epoch"] < epochs - 1
    assert len(done) <= saved["epoch"] + 2  # at most the epoch under way lost

    resumed = subprocess.run(_train_args(store, out, "--epochs", str(epochs), "--resume"), capture_output=True,
                             text=True, timeout=300, env=_env(tmp_path / "tmp2"))
    printed.append(resumed.stdout + resumed.stderr)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    metrics = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert metrics["run_dir"] == out and metrics["best_checkpoint"] == f"{out}/best.pt"
    objects = _objects(s3, "runs/killed")
    assert objects >= RUN_FILES and any(o.startswith("tensorboard/events.out.tfevents.") for o in objects)
    history = _lines(s3, "runs/killed/metrics.jsonl")
    assert [r["epoch"] for r in history] == list(range(epochs))
    # the resume continued from the checkpoint: the epochs it held kept as the killed run recorded them
    assert history[: saved["epoch"] + 1] == saved["history"]
    assert json.loads(s3.fs().cat_file(f"{s3.bucket}/runs/killed/metrics.json")) == metrics

    scored = subprocess.run([STILLROOM, "eval", "--checkpoint", f"{out}/best.pt"], capture_output=True, text=True,
                            timeout=300, env=_env(tmp_path / "tmp3"))
    printed.append(scored.stdout + scored.stderr)
    assert scored.returncode == 0, scored.stderr[-2000:]
    score = json.loads(scored.stdout.strip().splitlines()[-1])
    assert score["checkpoint"] == f"{out}/best.pt" and score["top1"] == metrics["best"]["top1"]

    for config, error in ((_config(store, s3.url("runs", "none"), resume=True), "holds no last.pt"),
                          (_config(store, out), "already holds a run")):
        with pytest.raises(UsageError, match=error) as e:
            train(config)
        printed.append(str(e.value))
    # the staging directory: the killed run left its own, the finished run removed its own
    assert [p for p in (tmp_path / "tmp1").iterdir() if p.name.startswith("stillroom-run-")]
    assert not [p for p in (tmp_path / "tmp2").iterdir() if p.name.startswith("stillroom-run-")]
    assert s3.secret.encode() not in s3.everything() and not any(s3.secret in text for text in printed)


@pytest.mark.slow
@pytest.mark.ray
def test_two_workers_on_ray_train_keep_their_checkpoints_on_s3_and_a_killed_one_restarts_from_there(
        s3: S3Server, store, tmp_path, ray_dashboard, capfd):
    """The session's Ray (its workers took the S3 credentials from the environment, as a cluster's nodes would:
    conftest starts the S3 server before it) runs two Ray Train workers; one is SIGKILLed after two epochs and Ray
    restarts the group from the checkpoint it reported to s3://; the run ends with every epoch trained once."""
    from ray.util.state import list_actors

    out = s3.url("runs", "ray")
    epochs = 10  # at 8 steps of 4 views per rank an epoch: long enough to be killed mid-run
    config = _config(store, out, workers=2, epochs=epochs, batch_size=4, max_failures=2)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(train(config)))
    runner.start()
    fs, root = s3.fs(), f"{s3.bucket}/runs/ray"

    def epochs_done() -> list[str]:
        try:
            return fs.cat_file(root + "/metrics.jsonl").decode().splitlines()
        except FileNotFoundError:
            return []

    deadline = time.monotonic() + 300
    # two epochs on s3 and Ray's controller has registered a reported checkpoint there
    while runner.is_alive() and time.monotonic() < deadline and not (
            len(epochs_done()) >= 2 and fs.exists(root + "/ray_train/checkpoint_manager_snapshot.json")):
        time.sleep(0.1)
    before = epochs_done()
    assert runner.is_alive() and 2 <= len(before) < epochs  # mid-run: some epochs done, not all
    workers = list_actors(ray_dashboard, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 2
    os.kill(workers[-1].pid, signal.SIGKILL)
    runner.join(timeout=400)
    assert not runner.is_alive()
    dead = list_actors(ray_dashboard, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "DEAD")])
    assert workers[-1].pid in [a.pid for a in dead]  # the worker killed is one that died, and the run went on

    assert result["workers"] == 2 and result["epochs"] == epochs and result["run_dir"] == out
    history = _lines(s3, "runs/ray/metrics.jsonl")
    assert [r["epoch"] for r in history] == list(range(epochs))
    assert json.dumps(history[0]) == before[0]  # the restart continued from s3; epoch 0 not trained again
    objects = _objects(s3, "runs/ray")
    assert objects >= RUN_FILES and any(o.startswith("ray_train/") and o.endswith("/last.pt") for o in objects)
    with s3.fs().open(f"{s3.bucket}/runs/ray/last.pt", "rb") as f:
        ckpt = torch.load(f, weights_only=True)
    assert ckpt["epoch"] == epochs - 1 and len(ckpt["history"]) == epochs
    printed = capfd.readouterr()
    assert s3.secret.encode() not in s3.everything() and s3.secret not in printed.out + printed.err


def test_init_weights_and_a_missing_checkpoint_on_s3(s3: S3Server):
    import io

    from stillroom.student.evaluate import load_init_weights, read_checkpoint
    from stillroom.student.models import build_student

    torch.manual_seed(1)
    trained = build_student("test_resnet", 4, 1, 16)
    buf = io.BytesIO()
    torch.save(trained.state_dict(), buf)
    s3.fs().pipe_file(f"{s3.bucket}/init/weights.pt", buf.getvalue())
    torch.manual_seed(2)
    student = build_student("test_resnet", 4, 1, 16)
    load_init_weights(student, s3.url("init", "weights.pt"))
    for name, value in trained.state_dict().items():
        assert torch.equal(student.state_dict()[name], value), name
    with pytest.raises(UsageError, match="does not exist"):
        read_checkpoint(s3.url("init", "none.pt"))
    with pytest.raises(UsageError, match="not a stillroom student checkpoint"):
        read_checkpoint(s3.url("init", "weights.pt"))
