"""Mistakes a newcomer makes, through the real entry point: one ``stillroom: error:`` line, the right exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from stillroom.pipelines.store import LabelStore, StoreSchema

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = "synthetic:n=256,classes=4,size=16"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")


def stillroom(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The command in this process (``run_cli``): what it prints and returns is the user's, at no process start."""
    return run_cli(*args, cwd=cwd)


def stillroom_process(*args: str) -> subprocess.CompletedProcess:
    """The command in a process of its own: where it would reach for Ray."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "stillroom.services.cli", *args], capture_output=True, text=True,
                          timeout=180, env=env)


def assert_one_error_line(done: subprocess.CompletedProcess, exit_code: int, *fragments: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("stillroom: error: "), lines[0]
    assert done.returncode == exit_code, (done.returncode, lines[0])
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def make_store(root: Path, seeds: tuple[int, ...] = (0,)) -> LabelStore:
    """A real store for the synthetic data set, its seeds written piece by piece and committed."""
    from stillroom.pipelines.data import load_dataset
    from stillroom.pipelines.views import get_recipe

    ds = load_dataset(SYNTHETIC, "train")
    recipe = get_recipe("fmnist-flip")
    provenance = {"dataset": {"spec": ds.spec, "split": "train", "fingerprint": ds.fingerprint,
                              "num_samples": len(ds), "num_classes": ds.num_classes},
                  "recipe": recipe.to_dict(), "teachers": [{"name": "made-up"}]}
    schema = StoreSchema(num_samples=len(ds), num_classes=ds.num_classes, top_k=2, chunk_rows=64)
    store = LabelStore.create(root, provenance, schema)
    rng = np.random.default_rng(0)
    for seed in seeds:
        store.begin_seed(seed)
        for i, (a, b) in enumerate(schema.pieces()):
            arrays = {name: rng.integers(0, 4, size=(b - a, *shape[1:])).astype(dtype)
                      for name, (shape, dtype) in schema.arrays().items()}
            store.write_piece(seed, i, a, arrays)
        store.commit_seed(seed)
    return store


def test_view_show_into_a_missing_directory():
    done = stillroom("view", "show", "--dataset", SYNTHETIC, "--ids", "0", "--out", "/missing/dir/x.png")
    assert_one_error_line(done, 2, "--out /missing/dir/x.png", "/missing/dir does not exist")


def test_store_export_into_a_missing_directory(tmp_path):
    store = make_store(tmp_path)
    done = stillroom("store", "export", str(store.path), "--seed", "0", "--out", "/missing/dir/s.parquet")
    assert_one_error_line(done, 2, "/missing/dir does not exist")


def test_eval_of_a_file_that_is_not_a_checkpoint(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"student": "resnet18", "loss": "kd"}))
    done = stillroom("eval", "--checkpoint", str(config), "--dataset", SYNTHETIC)
    line = assert_one_error_line(done, 2, f"{config} is not a stillroom student checkpoint", "last.pt")
    assert "weights_only" not in line
    without_dataset = stillroom("eval", "--checkpoint", str(config))  # the data set would come from the checkpoint
    assert assert_one_error_line(without_dataset, 2) == line


@no_cuda
def test_train_on_cuda_without_cuda(tmp_path):
    store = make_store(tmp_path / "stores")
    done = stillroom("train", "--store", str(store.path), "--dataset", SYNTHETIC, "--student", "resnet10t",
                     "--loss", "kd", "--out", str(tmp_path / "run"), "--device", "cuda")
    assert_one_error_line(done, 2, "--device cuda", "no CUDA device")
    assert not (tmp_path / "run").exists()


def test_train_on_an_unknown_device(tmp_path):
    store = make_store(tmp_path / "stores")
    done = stillroom("train", "--store", str(store.path), "--dataset", SYNTHETIC, "--student", "resnet10t",
                     "--loss", "kd", "--out", str(tmp_path / "run"), "--device", "gpu0")
    assert_one_error_line(done, 2, "--device 'gpu0'", "expected auto, cpu, cuda or cuda:N")


@no_cuda
def test_label_asking_for_gpus_without_cuda(tmp_path):
    for run, extra in ((stillroom, ["--no-ray"]), (stillroom_process, [])):
        done = run("label", "--dataset", SYNTHETIC, "--teacher", "resnet10t", "--gpus-per-worker", "1",
                         "--store-root", str(tmp_path), *extra)
        assert_one_error_line(done, 2, "--gpus-per-worker")
    assert not any(tmp_path.iterdir())  # refused before a store was made


def test_the_service_commands_start_without_importing_torch():
    """`stillroom jobs ...` builds only its own part of the parser: the job commands' options import torch."""
    code = ("import sys; from stillroom.services.cli import build_parser; "
            "args = build_parser('jobs').parse_args(['jobs', 'ls']); print(args.func.__name__, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "False", out
    from stillroom.services.cli import build_parser

    whole = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"store", "view", "teacher", "label", "train", "eval", "serve", "jobs", "demo"} <= set(whole.choices)


def test_label_refuses_store_and_names_store_root(tmp_path):
    """``--store`` names one store (``train --store``); ``label`` writes a new one under ``--store-root``: given a
    store as ``--store``, it is refused in one line, and nothing is written (no store nested inside that one)."""
    store = make_store(tmp_path / "stores")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    done = stillroom("label", "--no-ray", "--dataset", SYNTHETIC, "--teacher", "resnet10t", "--store", str(store.path))
    assert_one_error_line(done, 2, f"--store {store.path}", "--store-root")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_version_prints_the_package_version():
    from stillroom import __version__

    done = stillroom("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"stillroom {__version__}" and __version__


def test_json_flags_are_refused_naming_the_flag(tmp_path):
    """``--model-kwargs``, ``--student-kwargs`` and ``--spec`` are read by one parser (``json_object``)."""
    from stillroom.pipelines.core import UsageError, json_object

    not_json = stillroom("teacher", "train", "--out", str(tmp_path / "t"), "--model-kwargs", "{drop_rate: 1")
    assert_one_error_line(not_json, 2, "--model-kwargs '{drop_rate: 1' is not JSON")
    not_object = stillroom("teacher", "train", "--out", str(tmp_path / "t"), "--model-kwargs", "[1]")
    assert_one_error_line(not_object, 2, "--model-kwargs must be a JSON object")
    assert not (tmp_path / "t").exists()  # refused before anything was written
    spec = tmp_path / "spec.json"
    spec.write_text('{"dataset": "fashion-mnist"}')
    assert json_object(str(spec), "--spec", file=True) == {"dataset": "fashion-mnist"}
    assert json_object('{"a": 1}', "--spec", file=True) == {"a": 1}
    with pytest.raises(UsageError, match="neither a JSON object nor a JSON file"):
        json_object(str(tmp_path / "missing.json"), "--spec", file=True)
    with pytest.raises(UsageError, match="is not JSON"):
        json_object(str(spec), "--student-kwargs")  # a file is read only where the flag takes one
