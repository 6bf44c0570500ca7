"""Teachers: loading stillroom checkpoints and plain state dicts, weight digests, preprocessing, bad
checkpoints, and ``stillroom teacher train`` through its console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import SYNTHETIC, make_teacher

from pipelines.errors import UsageError
from pipelines.teachers import Preprocess, load_teacher, weights_digest

STILLROOM = str(Path(sys.executable).parent / "stillroom")


def test_load_a_stillroom_checkpoint(tmp_path):
    spec = make_teacher(tmp_path / "t.pt", num_classes=4, in_chans=1, resolution=24, seed=3)
    teacher = load_teacher(spec, num_classes=4)
    assert (teacher.name, teacher.num_classes, teacher.source) == ("test_resnet", 4, str(tmp_path / "t.pt"))
    assert teacher.preprocess == Preprocess(24, (0.5,), (0.25,), 1)
    assert teacher.kwargs == {"num_classes": 4, "in_chans": 1}
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    # the same weights as the model that was saved
    torch.manual_seed(3)
    saved = timm.create_model("test_resnet", num_classes=4, in_chans=1)
    assert teacher.weights_sha256 == weights_digest(saved.state_dict())
    views = torch.rand(2, 1, 16, 16)
    with torch.inference_mode():
        expected = saved.eval()((torch.nn.functional.interpolate(views, size=24, mode="bilinear") - 0.5) / 0.25)
        torch.testing.assert_close(teacher.logits(views), expected)
    assert teacher.describe()["preprocess"]["resolution"] == 24


@pytest.mark.parametrize("nested", [False, True])
def test_load_a_plain_state_dict(tmp_path, nested):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5).eval()
    path = tmp_path / "plain.pt"
    torch.save({"state_dict": model.state_dict()} if nested else model.state_dict(), path)
    teacher = load_teacher(f"test_resnet@{path}", num_classes=5)
    assert teacher.num_classes == 5 and teacher.weights_sha256 == weights_digest(model.state_dict())
    # preprocessing from timm's pretrained config: its resolution, 3 channels, its mean/std
    cfg = model.pretrained_cfg
    assert teacher.preprocess.resolution == cfg["input_size"][-1] and teacher.preprocess.in_chans == 3
    assert teacher.preprocess.mean == tuple(cfg["mean"])
    x = torch.rand(2, 3, cfg["input_size"][-1], cfg["input_size"][-1])
    with torch.inference_mode():
        torch.testing.assert_close(teacher.logits(x), model(teacher.preprocess(x)))


def test_weights_digest_follows_the_weights():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4)
    state = model.state_dict()
    digest = weights_digest(state)
    assert weights_digest(dict(reversed(list(state.items())))) == digest  # order does not matter
    changed = {k: v.clone() for k, v in state.items()}
    name = next(k for k, v in changed.items() if v.is_floating_point())
    changed[name].view(-1)[0] += 1e-3
    assert weights_digest(changed) != digest
    renamed = {("x." + k if k == name else k): v for k, v in state.items()}
    assert weights_digest(renamed) != digest  # names count too


def test_preprocess_resizes_expands_and_normalises():
    views = torch.rand(3, 1, 16, 16)
    out = Preprocess(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 3)(views)
    assert out.shape == (3, 3, 32, 32)
    up = torch.nn.functional.interpolate(views, size=(32, 32), mode="bilinear", align_corners=False)
    for c in range(3):  # one grey channel copied to all three, then normalised
        torch.testing.assert_close(out[:, c : c + 1], (up - 0.5) / 0.25)
    grey = Preprocess(16, (0.5,), (0.5,), 1)(torch.rand(2, 3, 16, 16))
    assert grey.shape == (2, 1, 16, 16)
    same = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(Preprocess(8, (0.0,), (1.0,), 1)(same), same)  # no resize at its own size
    with pytest.raises(UsageError, match="cannot feed 2-channel views"):
        Preprocess(8, (0.0,) * 3, (1.0,) * 3, 3)(torch.rand(1, 2, 8, 8))


def test_bad_teachers_raise_usage_errors(tmp_path):
    spec = make_teacher(tmp_path / "t.pt", num_classes=4)
    ckpt = spec.partition("@")[2]
    torch.manual_seed(0)
    plain = tmp_path / "plain4.pt"
    torch.save(timm.create_model("test_resnet", num_classes=4).state_dict(), plain)
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    cases = {
        "no_such_model_xyz": "unknown model 'no_such_model_xyz'",
        f"no_such_model_xyz@{ckpt}": "unknown model",
        f"resnet18@{ckpt}": "holds a test_resnet, not a resnet18",
        f"resnet18@{plain}": "does not fit resnet18",
        f"test_resnet@{tmp_path / 'missing.pt'}": "does not exist",
        f"test_resnet@{tmp_path / 'text.pt'}": "cannot read teacher checkpoint",
        f"test_resnet@{tmp_path / 'list.pt'}": "neither a stillroom teacher checkpoint nor a state dict",
        "test_resnet@": "expected NAME@CHECKPOINT",
    }
    for bad, message in cases.items():
        with pytest.raises(UsageError, match=message):
            load_teacher(bad, num_classes=4)
    with pytest.raises(UsageError, match="predicts 4 classes; the dataset has 10"):
        load_teacher(spec, num_classes=10)


def test_teacher_train_command_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "teacher.pt"
    run = subprocess.run([STILLROOM, "teacher", "train", "--dataset", SYNTHETIC, "--model", "test_resnet",
                          "--epochs", "1", "--batch-size", "32", "--train-samples", "64", "--resolution", "20",
                          "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert 0.0 <= result["top1"] <= 1.0 and result["out"] == str(out) and result["train_samples"] == 64
    teacher = load_teacher(f"test_resnet@{out}", num_classes=4)
    assert teacher.preprocess.resolution == 20 and teacher.preprocess.in_chans == 1
    assert teacher.kwargs == {"num_classes": 4, "in_chans": 1}
    saved = torch.load(out, weights_only=True)
    assert saved["metrics"]["top1"] == result["top1"]
    with torch.inference_mode():
        assert teacher.logits(torch.rand(2, 1, 16, 16)).shape == (2, 4)


def test_teacher_train_refuses_bad_settings_before_training(tmp_path):
    from pipelines.teacher_train import TeacherTrainConfig

    for bad, message in [({"smoothing": 1.0}, "--smoothing 1.0: expected 0 <= value < 1"),
                         ({"epochs": 0}, "--epochs 0: expected 1 <= value <= 1000")]:
        with pytest.raises(UsageError, match=message):
            TeacherTrainConfig(dataset=SYNTHETIC, model="test_resnet", out=str(tmp_path / "t.pt"), **bad)
    run = subprocess.run([STILLROOM, "teacher", "train", "--dataset", SYNTHETIC, "--model", "test_resnet",
                          "--smoothing", "-0.1", "--out", str(tmp_path / "t.pt")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "expected 0 <= value < 1" in run.stderr and not (tmp_path / "t.pt").exists()


def test_batchnorm_statistics_are_reestimated_before_the_final_evaluation(tmp_path):
    """A few steps leave BatchNorm's running averages far from the final weights' statistics: the same
    weights score much lower in eval mode than with batch statistics until they are re-estimated."""
    import numpy as np

    from pipelines.datasets import load_dataset
    from pipelines.teacher_train import TeacherTrainConfig, train_teacher

    test = load_dataset(SYNTHETIC, "test")

    def top1(teacher, batch_stats: bool) -> float:
        teacher.model.train(batch_stats)  # True: each batch of 128 normalised with its own statistics
        hits = 0
        with torch.no_grad():
            for start in range(0, len(test), 128):
                ids = np.arange(start, min(start + 128, len(test)))
                logits = teacher.model(teacher.preprocess(test.read(ids).float() / 255.0))
                hits += int((logits.argmax(1) == torch.from_numpy(test.labels[ids])).sum())
        return hits / len(test)

    runs = {}
    for bn_samples in (0, 10_000):  # 0: the running averages training left (the old behaviour)
        out = tmp_path / f"bn{bn_samples}.pt"
        result = train_teacher(TeacherTrainConfig(dataset=SYNTHETIC, model="test_resnet", out=str(out), epochs=1,
                                                  batch_size=32, bn_samples=bn_samples), progress=False)
        teacher = load_teacher(f"test_resnet@{out}", num_classes=4)
        runs[bn_samples] = (result, top1(teacher, batch_stats=False), top1(teacher, batch_stats=True), teacher)
    (before, eval_before, batch_before, t_before), (after, eval_after, batch_after, t_after) = runs[0], runs[10_000]
    assert before["bn_reestimated_on"] == 0 and after["bn_reestimated_on"] == 256  # the 8 batches of 32 seen
    params = dict(t_before.model.named_parameters())
    assert all(torch.equal(p, params[name]) for name, p in t_after.model.named_parameters())  # same weights
    assert batch_after == batch_before
    assert after["top1"] == eval_after  # the printed accuracy is the eval-mode accuracy of the saved teacher
    assert abs(eval_after - batch_after) < abs(eval_before - batch_before)
    assert abs(eval_after - batch_after) <= 0.1 < abs(eval_before - batch_before)
