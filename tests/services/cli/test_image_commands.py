"""Every command on an image folder and on Parquet shards: teacher train, label, train, eval, view show,
store inspect; the student's loader reads only each batch's samples; service paths stay confined."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_teacher
from conftest import run_cli as run
from image_data import write_image_folder, write_parquet

from stillroom.pipelines.data import load_dataset
from stillroom.pipelines.labeling import LabelConfig, run_labeling
from stillroom.pipelines.store import LabelStore
from stillroom.pipelines.views import COL, get_recipe


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("imagenet"), train=120, val=16)


@pytest.mark.slow
def test_commands_on_an_image_folder(folder, tmp_path):
    data = f"imagefolder:{folder}"
    teacher = tmp_path / "teacher.pt"
    trained = run("teacher", "train", "--dataset", data, "--recipe", "imagenet-rrc:size=32", "--model", "test_resnet",
                  "--epochs", "1", "--batch-size", "40", "--out", str(teacher))
    assert trained.returncode == 0, trained.stderr
    ckpt = json.loads(trained.stdout.strip().splitlines()[-1])
    assert 0 <= ckpt["top1"] <= 1 and json.loads(teacher.with_suffix(".json").read_text())["train_samples"] == 120
    import torch

    assert torch.load(teacher, weights_only=True)["preprocess"]["resolution"] == 32  # the recipe's size
    labeled = run("label", "--dataset", data, "--teacher", f"test_resnet@{teacher}", "--recipe",
                  "fmnist-rrc-mix:size=32", "--seeds", "0", "--top-k", "3", "--store-root", str(tmp_path / "stores"),
                  "--no-ray")
    assert labeled.returncode == 0, labeled.stderr
    store = json.loads(labeled.stdout.strip().splitlines()[-1])["store"]
    inspected = run("store", "inspect", store)
    assert inspected.returncode == 0 and "fmnist-rrc-mix:size=32" in inspected.stdout
    out = tmp_path / "run"
    trained = run("train", "--store", store, "--dataset", data, "--student", "test_resnet", "--loss", "kd",
                  "--epochs", "1", "--batch-size", "40", "--out", str(out), "--no-progress")
    assert trained.returncode == 0, trained.stderr
    result = json.loads(trained.stdout.strip().splitlines()[-1])
    assert 0 <= result["top1"] <= 1  # evaluated on val/ (test falls back to it) with imagenet-eval at 32 px
    scored = run("eval", "--checkpoint", str(out / "last.pt"), "--dataset", data, "--split", "val")
    assert scored.returncode == 0 and json.loads(scored.stdout)["samples"] == 16
    shown = run("view", "show", "--dataset", data, "--recipe", "imagenet-rrc:size=48", "--ids", "0,50,100",
                "--out", str(tmp_path / "v.png"))
    assert shown.returncode == 0 and (tmp_path / "v.png").stat().st_size > 0
    refused = run("view", "show", "--dataset", data, "--recipe", "fmnist-rrc", "--ids", "0",
                  "--out", str(tmp_path / "w.png"))
    assert refused.returncode == 2 and "has no output size" in refused.stderr and not (tmp_path / "w.png").exists()


def test_loader_reads_only_the_batch_and_replays_the_teacher_views(folder, tmp_path, monkeypatch):
    shards = write_parquet(tmp_path / "parquet", folder)
    data = f"parquet:{shards}"
    teacher = make_teacher(tmp_path / "t.pt", in_chans=3, resolution=24)
    config = LabelConfig(dataset=data, teachers=(teacher,), recipe="fmnist-rrc-mix:size=24", seeds=(0,), top_k=3,
                         store_root=str(tmp_path / "stores"), batch_size=50)
    result = run_labeling(config, backend="local", progress=False)
    from stillroom.student.data import StoreStream, check_store

    store = LabelStore(result["store"])
    ds = load_dataset(data)
    assert store.provenance["dataset"]["fingerprint"] == ds.fingerprint
    recipe = check_store(store, ds)
    stream = StoreStream(store, ds, recipe, batch_size=16)
    asked: list[int] = []
    encoded = type(ds).encoded

    def recording(self, ids):
        asked.extend(int(i) for i in ids)
        return encoded(self, ids)

    monkeypatch.setattr(type(ds), "encoded", recording)
    labels = stream.labels_for(0)
    ids = np.array([5, 77, 3, 119, 60])
    batch = stream.make_batch(labels, ids)
    params = batch.params  # format 3: drawn again for the batch
    mixing = params[:, COL["mix_mode"]] > 0
    assert sorted(asked) == sorted(ids.tolist() + params[mixing, COL["partner"]].astype(int).tolist())
    from stillroom.pipelines.views import build_views

    teacher_views, _ = build_views(ds, get_recipe("fmnist-rrc-mix:size=24"), 0, ids)  # drawn afresh
    assert batch.views.shape == (5, 3, 24, 24) and (batch.views == teacher_views).all()


def test_service_paths_stay_confined(tmp_path):
    from stillroom.services.specs import PathOutsideRoots, confine_dataset

    roots = (tmp_path,)
    assert confine_dataset("parquet:shards/*.parquet,bad=skip", roots, tmp_path) == \
        f"parquet:{tmp_path}/shards/*.parquet,bad=skip"
    assert confine_dataset("imagefolder:data", roots, tmp_path) == f"imagefolder:{tmp_path}/data"
    for spec in ("parquet:/etc/*.parquet", "parquet:x/../../*.parquet", "imagefolder:/etc,bad=skip"):
        with pytest.raises(PathOutsideRoots):
            confine_dataset(spec, roots, tmp_path)


def test_a_cache_key_decodes_no_image(folder, tmp_path, decodes):
    """What the service does inside a request (``prepare_store``: open the data, describe the labels, make the
    store) reads headers only, even with a teacher feature map to size."""
    from stillroom.pipelines.labeling import prepare_store

    teacher = make_teacher(tmp_path / "t.pt", in_chans=3, resolution=24)
    config = LabelConfig(dataset=f"imagefolder:{folder},bad=skip", teachers=(teacher,), recipe="imagenet-rrc:size=24",
                         top_k=3, features="final", store_root=str(tmp_path / "stores"))
    store = prepare_store(config)
    assert decodes[0] == 0 and store.schema.feature_shape is not None
    assert store.provenance["dataset"]["skipped"] == 0 and store.provenance["recipe"]["draft"] is True
