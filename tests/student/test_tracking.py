"""What a run reports: TensorBoard event files read back with tensorboard's own reader, metrics.jsonl with the
learning rate and images/s, MLflow when asked (and installed), the student's own normalisation recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stillroom.pipelines.core import UsageError
from stillroom.pipelines.labeling import LabelConfig, run_labeling
from stillroom.student.config import TrainConfig
from stillroom.student.run import train
from stillroom.student.tracking import Tracker

DATA = "synthetic:n=64,classes=4,size=16"


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher) -> str:
    config = LabelConfig(dataset=DATA, teachers=(tiny_teacher,), store_root=str(tmp_path_factory.mktemp("stores")),
                         batch_size=64, chunk_rows=64, top_k=2)
    return run_labeling(config, backend="local", progress=False)["store"]


def _config(store: str, out: Path, **kw) -> TrainConfig:
    base = dict(store=store, dataset=DATA, student="test_resnet", loss="kd", out=str(out), batch_size=16,
                max_steps=3, epochs=2, progress=False, log_interval=1)
    return TrainConfig(**{**base, **kw})


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_and_metrics_carry_losses_lr_grad_norm_throughput_and_accuracy(store, tmp_path):
    out = tmp_path / "run"
    train(_config(store, out, lr=0.01))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    scalars = _scalars(out / "tensorboard")
    for tag in ("train/kd", "train/loss", "train/lr", "train/grad_norm", "throughput/images_per_s",
                "throughput/images_per_s_rank0", "eval/top1", "eval/top5"):
        assert tag in scalars, sorted(scalars)
    assert [s for s, _ in scalars["train/kd"]] == [1, 2, 3, 4, 5, 6]  # every step of the two epochs
    for r, per_step in zip(records, (scalars["train/kd"][:3], scalars["train/kd"][3:]), strict=True):
        assert [v for _, v in per_step] == pytest.approx(r["step_losses"]["losses"]["kd"], abs=1e-5)
    assert [(s, v) for s, v in scalars["eval/top1"]] == [(3, pytest.approx(records[0]["top1"])),
                                                         (6, pytest.approx(records[1]["top1"]))]
    # the learning rate of each step: the schedule's (cosine over 6 steps from 0.01), as the optimizer had it
    lrs = [v for _, v in scalars["train/lr"]]
    assert lrs[0] == pytest.approx(0.01) and all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert all(v > 0 for _, v in scalars["train/grad_norm"])
    assert [r["lr"] for r in records] == pytest.approx([lrs[2], lrs[5]])  # the epochs' last steps'
    for r in records:
        assert r["lr"] > 0 and r["images_per_s"] > 0 and r["images_per_s_per_rank"] == [r["images_per_s"]]
    assert records[1]["lr"] < records[0]["lr"]

    # the student's own data config is in the checkpoint (test_resnet's: mean/std 0.5, one channel here)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["input_config"]["mean"] == [0.5] and ckpt["input_config"]["crop_pct"] == 0.95

    # a resumed run purges what the first wrote past the step it resumes from, and goes on from there
    train(_config(store, out, lr=0.01, epochs=3, resume=True))
    steps = [s for s, _ in _scalars(out / "tensorboard")["train/kd"]]
    assert steps == list(range(1, 10))


def test_the_tracker_logs_ema_accuracy_when_the_epoch_has_it(tmp_path):
    tracker = Tracker(tmp_path, rank=0, world_size=1, log_interval=1)
    tracker.after_step(4, {"loss": 1.0}, 16, lr=0.1, grad_norm=lambda: 1.0)
    fields = tracker.end_epoch({"epoch": 0, "samples": 64, "seconds": 2.0, "top1": 0.5, "top5": 0.9,
                                "ema_top1": 0.55}, global_step=4, all_reduce_mean=lambda t: None)
    tracker.close()
    assert fields == {"lr": 0.1, "images_per_s": 32.0, "images_per_s_per_rank": [32.0]}
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["eval/ema_top1"] == [(4, pytest.approx(0.55))] and "eval/ema_top5" not in scalars


def test_no_tracker_writes_no_events_and_mlflow_is_checked_before_training(store, tmp_path, monkeypatch):
    train(_config(store, tmp_path / "quiet", tracker="none", epochs=1))
    assert not (tmp_path / "quiet" / "tensorboard").exists()
    import builtins

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.raises(UsageError, match=r"--tracker mlflow needs MLflow"):
        train(_config(store, tmp_path / "nomlflow", tracker="mlflow"))
    assert not (tmp_path / "nomlflow").exists()


def test_mlflow_tracker_logs_the_run(store, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow-skinny has no database store
    out = tmp_path / "run"
    train(_config(store, out, tracker="mlflow"))
    run_id = json.loads((out / "mlflow.json").read_text())["run_id"]
    client = mlflow.tracking.MlflowClient(uri)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    top1 = client.get_metric_history(run_id, "eval.top1")
    assert [(m.step, m.value) for m in top1] == [(3, pytest.approx(records[0]["top1"])),
                                                 (6, pytest.approx(records[1]["top1"]))]
    assert len(client.get_metric_history(run_id, "train.lr")) == 6
    assert client.get_run(run_id).data.params["loss"] == "kd"
