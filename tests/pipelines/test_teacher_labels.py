"""Teachers as users bring them, through the label job: a hub teacher of a superset of the classes labels through
a class map (in the cache key), each teacher's preprocessing said and stored, the compute dtype keyed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hub_cache import HUB_ID

from pipelines.errors import UsageError
from pipelines.labeling import LabelConfig, run_labeling
from pipelines.store import LabelStore

STILLROOM = str(Path(sys.executable).parent / "stillroom")
RGB = "synthetic:n=64,classes=4,size=16,channels=3"


def _config(tmp_path: Path, **kw) -> LabelConfig:
    base = dict(dataset=RGB, teachers=(HUB_ID,), store_root=str(tmp_path / "stores"), batch_size=64, chunk_rows=64,
                teacher_input_size=32, class_map=str(tmp_path / "map.txt"), top_k=3)
    return LabelConfig(**{**base, **kw})


def test_the_label_command_says_and_stores_each_teachers_preprocessing(offline_hub, tmp_path):
    (tmp_path / "map.txt").write_text("7\n300\n281\n999\n")
    run = subprocess.run([STILLROOM, "label", "--dataset", RGB, "--teacher", HUB_ID, "--class-map",
                          str(tmp_path / "map.txt"), "--teacher-input-size", "32", "--teacher-mean", "0.45",
                          "--store-root", str(tmp_path / "stores"), "--batch-size", "64", "--chunk-rows", "64",
                          "--top-k", "3", "--no-ray"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    said = ("teacher test_resnet.r160_in1k (pretrained): input 32 px, mean 0.45,0.45,0.45, std 0.5,0.5,0.5, "
            "interpolation bilinear, crop_pct 0.95, fp32, classes mapped 4 of 1000; preprocessing from options "
            "(mean, resolution); the rest from timm pretrained_cfg of test_resnet.r160_in1k")
    assert said in run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    expected = {"resolution": 32, "mean": [0.45] * 3, "std": [0.5] * 3, "in_chans": 3, "interpolation": "bilinear",
                "crop_pct": 0.95}
    assert result["teachers"][0]["preprocess"] == expected and result["teachers"][0]["dtype"] == "fp32"
    store = LabelStore(result["store"])
    teacher = store.provenance["teachers"][0]
    assert teacher["preprocess"] == expected
    assert teacher["class_map"] == {"teacher_classes": 1000, "indices": [7, 300, 281, 999]}
    assert store.provenance["labels"]["dtype"] == "fp32"
    assert store.manifest["sources"]["preprocess_from"][0].startswith("options (mean, resolution)")
    hard = store.load(0).arrays["hard"]
    assert hard.min() >= 0 and hard.max() < 4  # the dataset's classes, not the teacher's 1000


def test_the_class_map_and_the_dtype_are_in_the_cache_key(offline_hub, tmp_path):
    with pytest.raises(UsageError, match=r"predicts 1000 classes \(timm's pretrained_cfg num_classes\); the dataset "
                                         r"has 4"):
        run_labeling(_config(tmp_path, class_map=None), backend="local", progress=False)
    assert not (tmp_path / "stores").exists() or not list((tmp_path / "stores").iterdir())
    (tmp_path / "map.txt").write_text("7\n300\n281\n999\n")
    fp32 = run_labeling(_config(tmp_path), backend="local", progress=False)
    (tmp_path / "map.txt").write_text("7\n300\n999\n281\n")
    other_map = run_labeling(_config(tmp_path), backend="local", progress=False)
    (tmp_path / "map.txt").write_text("7\n300\n281\n999\n")
    bf16 = run_labeling(_config(tmp_path, teacher_dtype="bf16"), backend="local", progress=False)
    assert len({fp32["cache_key"], other_map["cache_key"], bf16["cache_key"]}) == 3
    assert not bf16["cache_hit"] and LabelStore(bf16["store"]).provenance["labels"]["dtype"] == "bf16"
    a, b = LabelStore(fp32["store"]).load(0).arrays, LabelStore(bf16["store"]).load(0).arrays
    assert not np.array_equal(a["lse"], b["lse"])  # bf16 autocast ran on the CPU: other (close) numbers
    np.testing.assert_allclose(a["lse"], b["lse"], atol=0.1)
    again = run_labeling(_config(tmp_path), backend="local", progress=False)
    assert again["cache_hit"] and again["cache_key"] == fp32["cache_key"]
