"""The examples of one's own training loop (``examples/``) distil a student from a store they did not make: the
timm-style loop learns (its top-1 on the held-out split well above chance), and the DDP loop under ``torchrun`` on
gloo gives its two ranks disjoint shares that cover the epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import stillroom
from stillroom.pipelines.data import load_dataset
from stillroom.pipelines.labeling import LabelConfig, run_labeling

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DATA = "synthetic:n=128,classes=4,size=16"
CHANCE, MARGIN = 0.25, 0.25  # the student must reach 0.50 top-1 on 4 classes (twice chance)


def _train_teacher(path: Path) -> str:
    """A small timm teacher trained for a few steps on the data (it scores about 1.0 on the test split)."""
    import timm

    from stillroom.pipelines.teachers import Preprocess, save_checkpoint

    torch.manual_seed(0)
    data = load_dataset(DATA, "train")
    x, y = (torch.from_numpy(data.images).float() / 255 - 0.5) / 0.25, torch.from_numpy(data.labels)
    kwargs = {"num_classes": 4, "in_chans": 1}
    model = timm.create_model("test_resnet", **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(3):
        for i in range(0, len(y), 16):
            loss = torch.nn.functional.cross_entropy(model(x[i : i + 16]), y[i : i + 16])
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_checkpoint(path, "test_resnet", model, kwargs, Preprocess(16, (0.5,), (0.25,), 1), extra={})
    return f"test_resnet@{path}"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    teacher = _train_teacher(tmp_path_factory.mktemp("teacher") / "t.pt")
    config = LabelConfig(dataset=DATA, teachers=(teacher,), recipe="fmnist-flip", seeds=(0, 1), top_k=3,
                         store_root=str(tmp_path_factory.mktemp("stores")), batch_size=64)
    return str(run_labeling(config, backend="local", progress=False)["store"])


def _run(argv: list[str], cwd: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _top1(weights: Path) -> float:
    import timm

    model = timm.create_model("test_resnet", num_classes=4, in_chans=1)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    test = load_dataset(DATA, "test")
    with torch.no_grad():
        logits = model(stillroom.input_config(model, 1).normalize(torch.from_numpy(test.images).float() / 255))
    return float((logits.argmax(1).numpy() == test.labels).mean())


TINY = ["--model", "test_resnet", "--epochs", "3", "-b", "16", "--lr", "5e-3", "--warmup-epochs", "0"]


@pytest.mark.slow
def test_the_timm_loop_distils_a_student_that_learns(store, tmp_path):
    records = _run([sys.executable, str(EXAMPLES / "timm_loop.py"), "--store", store, *TINY, "-j", "2",
                    "--out", str(tmp_path / "student.pt")], tmp_path)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert _top1(tmp_path / "student.pt") >= CHANCE + MARGIN


@pytest.mark.slow
def test_the_ddp_loop_gives_two_ranks_disjoint_shares_covering_the_epoch(store, tmp_path):
    records = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(EXAMPLES / "ddp_loop.py"), "--store", store, *TINY[:2], "--epochs", "1", "-b", "16",
                    "-j", "0", "--seen", str(tmp_path / "seen{rank}.json"), "--out", str(tmp_path / "s.pt")],
                   tmp_path)
    assert sorted(r["rank"] for r in records) == [0, 1]
    seen = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 64 and not set(seen[0]) & set(seen[1])
    assert np.array_equal(np.sort(seen[0] + seen[1]), np.arange(128))
    assert (tmp_path / "s.pt").is_file()
