"""A folder whose images all share one square size (CIFAR-10 written as 32x32 PNGs) needs no size in its recipe:
``teacher train`` and ``label`` make its views at that size (the index knows every image's size), the store's
recipe says it; a folder of many sizes, or of one size that is not square, is still refused, each in words that are
true of it."""

from __future__ import annotations

import json

import pytest
from image_data import write_png_folder

from stillroom.pipelines.store import LabelStore
from stillroom.services.cli import main


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_teacher_train_and_label_on_a_folder_of_one_size(tmp_path, capsys):
    data = f"imagefolder:{write_png_folder(tmp_path / 'cifar', [(32, 32)], train=24)}"
    teacher = tmp_path / "teacher.pt"
    assert main(["teacher", "train", "--dataset", data, "--recipe", "fmnist-randaug", "--model", "test_resnet",
                 "--epochs", "1", "--batch-size", "12", "--out", str(teacher)]) == 0
    import torch

    assert torch.load(teacher, weights_only=True)["preprocess"]["resolution"] == 32  # the images' own size
    capsys.readouterr()
    assert main(["label", "--dataset", data, "--teacher", f"test_resnet@{teacher}", "--recipe", "fmnist-randaug",
                 "--seeds", "0", "--top-k", "3", "--store-root", str(tmp_path / "stores"), "--no-ray"]) == 0
    store = LabelStore(_last_json(capsys.readouterr().out)["store"])
    assert store.provenance["recipe"]["name"] == "fmnist-randaug:size=32"
    assert store.verify() == [] and store.seeds() == [0]
    assert main(["train", "--store", str(store.path), "--dataset", data, "--student", "test_resnet", "--loss", "kd",
                 "--epochs", "1", "--batch-size", "12", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert (tmp_path / "run" / "last.pt").exists()  # the student replays the store's views at 32 px


@pytest.mark.parametrize("sizes, said", [([(32, 32), (40, 40)], "holds images of many sizes"),
                                         ([(32, 48)], "is 32x48, not square")])
def test_a_folder_without_one_square_size_is_refused_truly(tmp_path, capsys, sizes, said):
    data = f"imagefolder:{write_png_folder(tmp_path / 'mixed', sizes, train=8)}"
    assert main(["teacher", "train", "--dataset", data, "--recipe", "fmnist-randaug", "--model", "test_resnet",
                 "--epochs", "1", "--out", str(tmp_path / "t.pt")]) == 2
    err = capsys.readouterr().err
    assert "recipe fmnist-randaug has no output size and" in err and said in err
    assert not (tmp_path / "t.pt").exists()
