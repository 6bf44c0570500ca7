"""Datasets: the three kinds, fingerprints, and errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_fmnist

from stillroom.pipelines.core import UsageError
from stillroom.pipelines.data import ImageFolder, load_dataset


@needs_fmnist
def test_fashion_mnist_test_split():
    ds = load_dataset("fashion-mnist", "test")
    assert len(ds) == 10000 and ds.num_classes == 10 and ds.image_shape == (1, 28, 28)
    batch = ds.read([0, 9999])
    assert batch.shape == (2, 1, 28, 28) and str(batch.dtype) == "torch.uint8"
    assert np.bincount(ds.labels).tolist() == [1000] * 10
    assert len(ds.fingerprint) == 32
    head = load_dataset("fashion-mnist:n=100", "test")
    assert len(head) == 100 and np.array_equal(head.read([99]), ds.read([99]))
    assert head.fingerprint != ds.fingerprint


def test_synthetic_is_deterministic_and_fingerprinted():
    a = load_dataset("synthetic:n=50,classes=3,size=8")
    from stillroom.pipelines.data import Synthetic

    b = Synthetic("train", n=50, classes=3, size=8)
    assert np.array_equal(a.images, b.images) and a.fingerprint == b.fingerprint
    assert Synthetic("test", n=50, classes=3, size=8).fingerprint != a.fingerprint
    assert load_dataset("synthetic:n=50,classes=3,size=8,channels=3").image_shape == (3, 8, 8)


def test_image_folder_without_splits_is_a_train_split(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            size = (12, 10) if i else (10, 10)  # sizes may differ: each keeps its own
            pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
    ds = ImageFolder(tmp_path)
    assert len(ds) == 6 and ds.num_classes == 2 and ds.channels == 3 and not ds.in_memory
    assert ds.sizes.tolist() == [[10, 10], [10, 12], [10, 12]] * 2
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1] and ds.class_names == ("cat", "dog")
    assert load_dataset(f"imagefolder:{tmp_path}").fingerprint == ds.fingerprint
    with pytest.raises(UsageError, match="no split folders .* so it has no test split"):
        load_dataset(f"imagefolder:{tmp_path}", "test")


@pytest.mark.parametrize(("spec", "message"), [
    ("mnist", "unknown dataset 'mnist'"),
    ("synthetic:n=x", "bad option 'n=x'"),
    ("fashion-mnist:classes=3", "bad option 'classes=3'"),
    ("imagefolder:/does/not/exist", "does not exist"),
    ("parquet:/does/not/exist", "does not exist"),
    ("parquet:/does/not/*.parquet", "no Parquet files match"),
    ("imagefolder:/tmp,bad=maybe", "expected bad=stop or bad=skip"),
])
def test_bad_specs(spec, message):
    with pytest.raises(UsageError, match=message):
        load_dataset(spec)


def test_missing_data_dir_and_bad_ids(tmp_path):
    with pytest.raises(UsageError, match="not found in"):
        load_dataset("fashion-mnist", "train", tmp_path)
    with pytest.raises(UsageError, match="unknown split"):
        load_dataset("synthetic", "val")
    with pytest.raises(UsageError, match="sample id 512 is out of range"):
        load_dataset("synthetic").read([0, 512])
