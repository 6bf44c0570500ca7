"""``stillroom store convert``: a format-2 or format-3 store's copy in format 4, without a teacher, its views
checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from test_store_format3 import _labels

from stillroom.pipelines.data import load_dataset
from stillroom.pipelines.store import COMPLETE, LabelStore, StoreSchema
from stillroom.pipelines.views import draw_views, get_recipe
from stillroom.student.data import StoreStream

DATA = "synthetic:n=100,classes=5,size=8"


def _format2(root: Path, tamper: bool = False, version: int = 2) -> LabelStore:
    """A format-2 store as the old code wrote it: the view parameters stored, float16 logits, ``hard`` (``version``
    3: a format-3 store, its 8-bit codes and the views' digests)."""
    ds = load_dataset(DATA)
    recipe = get_recipe("fmnist-rrc-mix")
    provenance = {"dataset": {"spec": ds.spec, "split": "train", "fingerprint": ds.fingerprint,
                              "num_samples": len(ds), "num_classes": ds.num_classes},
                  "recipe": recipe.to_dict(), "teachers": [{"name": "made-up"}]}
    schema = StoreSchema(num_samples=len(ds), num_classes=5, top_k=3, chunk_rows=32, format_version=version)
    store = LabelStore.create(root, provenance, schema)
    rng = np.random.default_rng(1)
    for seed in (0, 2):
        arrays = {**_labels(len(ds), 5, 3, rng), "view": draw_views(recipe, seed, np.arange(len(ds)), len(ds), (8, 8))}
        if tamper and seed == 2:
            arrays["view"][70, 0] += 1 / 2048  # one crop moved by one grid step
        store.begin_seed(seed)
        for i, (a, b) in enumerate(schema.pieces()):
            store.write_piece(seed, i, a, {k: v[a:b] for k, v in arrays.items()})
        store.commit_seed(seed)
    assert json.loads((store.path / "manifest.json").read_text())["format_version"] == version
    return store


@pytest.mark.parametrize("version", [2, 3])
def test_convert_writes_format_4_that_trains_like_the_source(tmp_path, version):
    old = _format2(tmp_path / "old", version=version)
    done = run_cli("store", "convert", str(old.path), str(tmp_path / "v4"))
    assert done.returncode == 0, done.stderr
    said = json.loads(done.stdout)
    new = LabelStore(said["dst"])
    assert new.schema.format_version == 4 and new.seeds() == [0, 2] and new.verify() == []
    if version == 2:
        assert said["bytes_per_view_after"] < said["bytes_per_view_before"]
    assert new.quality(2) == old.quality(2)
    ds, recipe = load_dataset(DATA), get_recipe("fmnist-rrc-mix")
    for seed in (0, 2):
        a, b = old.load(seed).arrays, new.load(seed).arrays
        for name in ("topk_idx", "hard"):
            np.testing.assert_array_equal(b[name], a[name])
        np.testing.assert_array_equal(b["lse"], a["lse"].astype(np.float16))  # the level: float16 in format 4
        # the codes: each top-k probability within a few thousandths (a logit far below the top-1 may move more)
        np.testing.assert_allclose(np.exp(b["topk_logit"].astype(np.float64) - b["lse"][:, None]),
                                   np.exp(a["topk_logit"].astype(np.float64) - a["lse"][:, None]), rtol=0, atol=5e-3)
        # the student's batches of both: the same ids, views, parameters and top-k
        x = next(StoreStream(old, ds, recipe, 16, seeds=(seed,), loader_workers=0).epoch(0))
        y = next(StoreStream(new, ds, recipe, 16, seeds=(seed,), loader_workers=0).epoch(0))
        np.testing.assert_array_equal(x.params, y.params)
        assert (x.views == y.views).all() and (x.teacher["topk_idx"] == y.teacher["topk_idx"]).all()
    again = run_cli("store", "convert", said["dst"], str(tmp_path / "v5"))
    assert again.returncode != 0 and "format 4 already" in again.stderr


def test_convert_of_format_3_refuses_views_whose_digests_differ(tmp_path):
    old = _format2(tmp_path / "v3", version=3)
    record = json.loads((old.seed_dir(2) / COMPLETE).read_text())
    record["views"]["chunk_sha256"][2] = "0" * 64  # chunk 2 of seed 2 (rows 64-95) labeled from other views
    (old.seed_dir(2) / COMPLETE).write_text(json.dumps(record))
    done = run_cli("store", "convert", str(old.path), str(tmp_path / "v4"))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "seed 2 chunk 2: the view parameters this stillroom draws" in lines[0], done.stderr


@pytest.mark.parametrize("keep", [False, True])
def test_convert_refuses_views_this_stillroom_would_not_draw(tmp_path, keep):
    old = _format2(tmp_path / "v2", tamper=True)
    done = run_cli("store", "convert", str(old.path), str(tmp_path / "v3"),
                   *(["--store-views"] if keep else []))
    if keep:  # kept, nothing is redrawn: converted as it is
        assert done.returncode == 0, done.stderr
        np.testing.assert_array_equal(LabelStore(json.loads(done.stdout)["dst"]).load(2).arrays["view"],
                                      old.load(2).arrays["view"])
        return
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "seed 2 row 70: the stored view parameters differ" in lines[0], done.stderr


def test_convert_writes_each_seed_under_its_lease_and_waits_for_another_writer(tmp_path, capsys, monkeypatch):
    """Two converts into one store, or a convert beside a label job, wrote the same seed at once: each seed is now
    written under its lease (fenced by its generation), and a seed another process holds is waited for."""
    import threading
    from dataclasses import replace

    from stillroom.pipelines.store import convert_store

    old = _format2(tmp_path / "v2")
    dst = LabelStore.create(tmp_path / "v3", old.provenance, replace(old.schema, format_version=4, store_views=False))
    generations: list[tuple[int, int | None]] = []
    write_piece = LabelStore.write_piece

    def recording(self, seed, *args, generation=None, **kw):
        generations.append((seed, generation))
        return write_piece(self, seed, *args, generation=generation, **kw)

    monkeypatch.setattr(LabelStore, "write_piece", recording)
    other = dst.lease(0)
    assert other.acquire()  # another writer of seed 0, alive
    done: list[LabelStore] = []
    convert = threading.Thread(target=lambda: done.append(convert_store(
        old, tmp_path / "v3", get_recipe("fmnist-rrc-mix"), (8, 8), poll_s=0.05)))
    convert.start()
    convert.join(timeout=1.0)
    assert convert.is_alive() and not dst.is_complete(0) and dst.done_pieces(0) == set()  # waiting, nothing written
    other.release()
    convert.join(timeout=60)
    assert not convert.is_alive() and done[0].path == dst.path
    assert dst.seeds() == [0, 2] and dst.verify() == []
    # every piece fenced by its seed's lease: seed 0's taken after the other writer's generation 0
    assert set(generations) == {(0, 1), (2, 0)}
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 1 and said[0].startswith("seed 0 of") and said[0].endswith("waiting for it")  # once
