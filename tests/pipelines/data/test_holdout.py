"""``imagefolder:DIR,val=F`` / ``parquet:...,val=F``: a fraction of each class held out as ``val`` by a hash of
each sample's path; and with nothing to evaluate on, teacher and student train and say so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from image_data import CLASSES, write_image_folder, write_parquet

from stillroom.pipelines.core import UsageError
from stillroom.pipelines.data import ImageFolder, holdout_mask, load_dataset, pack_strings, string_hashes


@pytest.fixture(scope="module")
def classes_only(tmp_path_factory) -> Path:
    """``DIR/<class>/*.JPEG``: the commonest small layout, no split folders (120 images, 4 classes)."""
    made = write_image_folder(tmp_path_factory.mktemp("made"), train=120, val=0)
    root = tmp_path_factory.mktemp("classes") / "data"
    shutil.copytree(made / "train", root)
    return root


def _paths(ds) -> list[str]:
    return [str(ds.path(i).relative_to(ds.base)) for i in range(len(ds))]


def test_holdout_at_imagenet_shape():
    """1,281,167 class-sorted paths in 1,000 classes (no image needed): each class holds out its share within
    sampling error, the side of a path does not depend on its place in the listing, and adding files moves none."""
    per_class = np.full(1000, 1281)
    per_class[:167] += 1  # 1,281,167 in all
    names = [f"n{c:08d}/n{c:08d}_{i}.JPEG" for c in range(1000) for i in range(per_class[c])]
    labels = np.repeat(np.arange(1000), per_class)
    assert len(names) == 1_281_167
    keys = string_hashes(*pack_strings(names))
    assert len(np.unique(keys)) == len(keys)  # no two paths share a hash
    val = holdout_mask(keys, labels, 0.05)
    held = np.bincount(labels[val], minlength=1000)
    expected = per_class * 0.05
    sd = np.sqrt(per_class * 0.05 * 0.95)
    assert abs(val.mean() - 0.05) < 5 * np.sqrt(0.05 * 0.95 / len(val))
    assert np.all(np.abs(held - expected) < 5.5 * sd)  # every class: binomial within 5.5 sigma
    # the spread over classes is the binomial's, not more (no class, and no run of ids, is favoured)
    assert 0.8 < np.std(held - expected) / sd.mean() < 1.2
    first, second = val[labels < 500].mean(), val[labels >= 500].mean()
    assert abs(first - second) < 0.003
    # the side of each path is its own: shuffled, or among added files, it stays
    order = np.random.default_rng(0).permutation(len(names))[:200_000]
    assert np.array_equal(string_hashes(*pack_strings([names[i] for i in order])), keys[order])
    more = names[:5000] + [f"n00000000/added_{i}.JPEG" for i in range(3000)]
    more_val = holdout_mask(string_hashes(*pack_strings(more)), np.zeros(len(more), dtype=np.int64), 0.05)
    assert np.array_equal(more_val[:1281], val[:1281])


def test_val_split_of_a_folder_of_class_folders(classes_only, tmp_path):
    spec = f"imagefolder:{classes_only},val=0.25"
    whole = load_dataset(f"imagefolder:{classes_only}")
    train, val, test = (load_dataset(spec, s) for s in ("train", "val", "test"))
    train_paths, val_paths = _paths(train), _paths(val)
    assert not set(train_paths) & set(val_paths)
    assert sorted(train_paths + val_paths) == sorted(_paths(whole))
    assert _paths(test) == val_paths and test.fingerprint == val.fingerprint  # test reads val: there is no test/
    held = np.bincount(val.labels, minlength=4) / np.bincount(whole.labels, minlength=4)
    assert np.all((held > 0.05) & (held < 0.5)), held  # 30 a class: a quarter within sampling error
    assert train.class_names == val.class_names == tuple(CLASSES)
    # the fingerprint covers the split: neither side is the whole split, nor another fraction's side
    prints = {whole.fingerprint, train.fingerprint, val.fingerprint,
              load_dataset(f"imagefolder:{classes_only},val=0.3", "val").fingerprint}
    assert len(prints) == 4
    # another process (another Python hash seed) holds out the same files
    code = ("import json, sys; from stillroom.pipelines.data import load_dataset; "
            "ds = load_dataset(sys.argv[1], 'val'); "
            "print(json.dumps([str(ds.path(i).relative_to(ds.base)) for i in range(len(ds))]))")
    env = {**os.environ, "PYTHONHASHSEED": "123", "STILLROOM_CACHE": str(tmp_path / "cache")}
    other = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, env=env, timeout=120)
    assert other.returncode == 0, other.stderr
    assert json.loads(other.stdout) == val_paths
    # adding files to a class moves no other file
    grown = tmp_path / "grown"
    shutil.copytree(classes_only, grown, ignore=shutil.ignore_patterns(".stillroom-index"))
    for i in range(10):
        shutil.copy(grown / "ant" / sorted(os.listdir(grown / "ant"))[i], grown / "ant" / f"zz_added_{i}.JPEG")
    grown_val = set(_paths(load_dataset(f"imagefolder:{grown},val=0.25", "val")))
    assert {p for p in grown_val if "zz_added" not in p} == set(val_paths)


def test_val_split_beside_split_folders(tmp_path):
    root = write_image_folder(tmp_path / "d", train=40, val=8)
    with pytest.raises(UsageError, match="has a val/ folder: val=F holds out part of the train split"):
        ImageFolder(root, "train", holdout=0.2)
    (root / "val").rename(root / "test")  # train/ and test/: val is held out of train/, test reads test/
    val, test = ImageFolder(root, "val", holdout=0.2), ImageFolder(root, "test", holdout=0.2)
    assert len(test) == 8 and all(p.startswith(("ant", "bee", "cat", "dog")) for p in _paths(test))
    assert set(_paths(val)) <= set(_paths(ImageFolder(root, "train")))
    assert len(val) + len(ImageFolder(root, "train", holdout=0.2)) == 40


@pytest.mark.parametrize(("option", "message"), [
    ("val=0", "expected a fraction between 0 and 1"), ("val=1.5", "expected a fraction between 0 and 1"),
    ("val=x", "expected a fraction between 0 and 1"), ("size=3", "option size= in .* is unknown"),
])
def test_bad_val_options(classes_only, option, message):
    with pytest.raises(UsageError, match=message):
        load_dataset(f"imagefolder:{classes_only},{option}")


def test_val_split_of_parquet_shards(tmp_path):
    made = write_image_folder(tmp_path / "img", train=60, val=4)
    shards = write_parquet(tmp_path / "pq", made, rows_per_group=10)
    glob = f"parquet:{shards}/train/*.parquet"
    whole = load_dataset(glob)
    train, val = load_dataset(f"{glob},val=0.3,bad=skip"), load_dataset(f"{glob},bad=skip,val=0.3", "val")
    assert len(train) + len(val) == len(whole) == 60 and len(val) > 5
    assert train.fingerprint != whole.fingerprint != val.fingerprint
    assert sorted(train.labels.tolist() + val.labels.tolist()) == sorted(whole.labels.tolist())
    with pytest.raises(UsageError, match="has a val/ folder"):
        load_dataset(f"parquet:{shards},val=0.3", "val")
    # a shard added beside the others moves no row of theirs (the key is the shard's path and the row in it)
    shutil.rmtree(shards / "val")
    before = load_dataset(f"parquet:{shards},val=0.3", "val")
    shutil.copy(next((shards / "train").glob("*00000*")), shards / "train" / "train-added.parquet")
    after = load_dataset(f"parquet:{shards},val=0.3", "test")  # test reads the held-out split: no test/

    def rows(ds) -> set[tuple[str, int, int]]:  # (shard file, row group, row): shard indices shift
        return {(Path(ds.files[s]).name, g, r) for s, g, r in ds._loc.tolist()}

    added = {row for row in rows(after) if row[0] == "train-added.parquet"}
    assert added and rows(after) - added == rows(before)


@pytest.mark.slow
def test_training_with_nothing_to_evaluate_on(classes_only, tmp_path, capsys):
    """Teacher and student train on a folder of class folders, say there is nothing to evaluate on and how to
    hold some out, and write metrics without accuracy."""
    from conftest import make_teacher

    from stillroom.pipelines.labeling import LabelConfig, run_labeling
    from stillroom.pipelines.teachers import TeacherTrainConfig, train_teacher
    from stillroom.student.config import TrainConfig
    from stillroom.student.run import train

    data = f"imagefolder:{classes_only}"
    result = train_teacher(TeacherTrainConfig(dataset=data, model="test_resnet", recipe="imagenet-rrc:size=16",
                                              epochs=1, batch_size=60, bn_samples=0, out=str(tmp_path / "t.pt")),
                           progress=False)
    note = capsys.readouterr().err
    assert "nothing to evaluate on" in note and f"{data},val=0.1" in note and note.count("\n") == 1
    assert "top1" not in result and "top1" not in json.loads((tmp_path / "t.json").read_text())
    teacher = make_teacher(tmp_path / "r.pt", num_classes=4, in_chans=3, resolution=16)
    store = run_labeling(LabelConfig(dataset=data, teachers=(teacher,), recipe="imagenet-rrc:size=16", seeds=(0,),
                                     top_k=2, store_root=str(tmp_path / "stores")), backend="local",
                         progress=False)["store"]
    capsys.readouterr()
    got = train(TrainConfig(store=store, dataset=data, student="test_resnet", loss="kd", epochs=1, batch_size=60,
                            out=str(tmp_path / "run"), progress=False))
    note = capsys.readouterr().err
    assert "nothing to evaluate on" in note and ",val=0.1" in note
    assert got["top1"] is None
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and "top1" not in lines[0] and lines[0]["losses"]
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0


def test_service_keeps_the_options_and_confines_the_path(tmp_path):
    from stillroom.services.specs import PathOutsideRoots, confine_dataset

    roots = (tmp_path,)
    assert confine_dataset("imagefolder:data,val=0.1,bad=skip", roots, tmp_path) == \
        f"imagefolder:{tmp_path}/data,val=0.1,bad=skip"
    assert confine_dataset("parquet:shards/*.parquet,val=0.2", roots, tmp_path) == \
        f"parquet:{tmp_path}/shards/*.parquet,val=0.2"
    with pytest.raises(PathOutsideRoots):
        confine_dataset("imagefolder:/etc,val=0.1", roots, tmp_path)
