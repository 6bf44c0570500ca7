"""The student's loader: worker processes give the same batches as the training process alone (in-memory data and
a JPEG folder), feature maps read by the batch's rows equal a whole load and leave the epoch a full shuffle, and a
bad worker count is refused."""

from __future__ import annotations

import json
import logging
import os
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from class_sorted import class_sorted_labels, distinct_per_batch
from conftest import make_teacher, run_cli
from image_data import write_image_folder

import stillroom.pipelines.views.render as views_module
from stillroom.pipelines.core import UsageError
from stillroom.pipelines.data import load_dataset
from stillroom.pipelines.labeling import LabelConfig, run_labeling
from stillroom.pipelines.store import LabelStore, StoreError, StoreSchema, check_views
from stillroom.pipelines.views import (
    COL,
    MIX_NONE,
    NUM_VIEW_PARAMS,
    draw_views,
    get_recipe,
    mix_views,
    own_rows,
    partner_rows,
    partners_of,
    render_batch,
    render_batch_pool,
    render_views,
)
from stillroom.student._loader import FeatureRows, default_loader_workers, set_training_threads, view_hw
from stillroom.student.config import TrainConfig
from stillroom.student.data import Batch, StoreStream, check_store, partner_run_order
from stillroom.student.run import train

DATA = "synthetic:n=72,classes=4,size=16"


def _store(root: Path, dataset: str, teacher: str, recipe: str, **kw) -> LabelStore:
    config = LabelConfig(dataset=dataset, teachers=(teacher,), recipe=recipe, seeds=(0, 1), top_k=3,
                         store_root=str(root), batch_size=40, **kw)
    return LabelStore(run_labeling(config, backend="local", progress=False)["store"])


@pytest.fixture(scope="module")
def memory_store(tmp_path_factory) -> LabelStore:
    """In-memory data, mixing views (partners), 8-row chunks and a 2x2 feature map: several chunks to read."""
    teacher = make_teacher(tmp_path_factory.mktemp("teacher") / "t.pt")
    return _store(tmp_path_factory.mktemp("stores"), DATA, teacher, "fmnist-rrc-mix", chunk_rows=8,
                  features="final", feature_grid=2)


@pytest.fixture(scope="module")
def jpeg_store(tmp_path_factory) -> tuple[LabelStore, str]:
    """A folder of variable-size JPEGs (grayscale, CMYK, PNG-named-JPEG and a large one among them), mixing views,
    kept in the store (``--store-views``; the in-memory store keeps a digest of them: they are drawn again)."""
    folder = write_image_folder(tmp_path_factory.mktemp("imagenet"), train=60, val=8)
    teacher = make_teacher(tmp_path_factory.mktemp("teacher") / "t.pt", in_chans=3, resolution=24)
    data = f"imagefolder:{folder}"
    return _store(tmp_path_factory.mktemp("stores"), data, teacher, "fmnist-rrc-mix:size=24", store_views=True), data


@pytest.fixture(scope="module")
def folder_deit(tmp_path_factory):
    """A JPEG folder and ``deit:size=32`` (every pair mixes; RandAugment and erasing columns)."""
    folder = write_image_folder(tmp_path_factory.mktemp("deit"), train=48, val=4)
    return load_dataset(f"imagefolder:{folder}"), get_recipe("deit:size=32")


def _epochs(store: LabelStore, data: str, workers: int, batch_size: int = 16, **kw) -> list[Batch]:
    ds = load_dataset(data)
    stream = StoreStream(store, ds, check_store(store, ds), batch_size, loader_workers=workers, shuffle_seed=5,
                         **kw)
    assert stream.loader_workers == workers
    return [b for epoch in (0, 1) for b in stream.epoch(epoch)]


def _assert_same(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b) > 1
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.ids, y.ids)
        assert x.views.dtype == torch.float32 and torch.equal(x.views, y.views)  # bit-identical
        assert torch.equal(x.labels, y.labels) and torch.equal(x.targets, y.targets)
        np.testing.assert_array_equal(x.params, y.params)
        assert x.teacher.keys() == y.teacher.keys()
        for k in x.teacher:
            assert torch.equal(x.teacher[k], y.teacher[k]), k
        assert (x.seed, x.epoch) == (y.seed, y.epoch)


def test_two_workers_give_the_same_batches_as_none_in_memory(memory_store):
    alone, workers = _epochs(memory_store, DATA, 0), _epochs(memory_store, DATA, 2)
    _assert_same(alone, workers)
    assert {b.seed for b in alone} == {0, 1}
    assert "features" in alone[0].teacher and alone[0].teacher["features"].shape[2:] == (2, 2)
    assert any(b.mixed for b in alone)  # partners were read too
    ids = np.concatenate([b.ids for b in alone[: len(alone) // 2]])
    assert sorted(ids.tolist()) == list(range(72))  # one epoch: every sample once


def test_two_workers_give_the_same_batches_as_none_on_a_jpeg_folder(jpeg_store):
    store, data = jpeg_store
    alone, workers = _epochs(store, data, 0, batch_size=12), _epochs(store, data, 2, batch_size=12)
    _assert_same(alone, workers)
    assert alone[0].views.shape == (12, 3, 24, 24)
    mixed = [b for b in alone if b.mixed]
    assert mixed and any(np.isin(b.params[:, COL["mix_mode"]], (1, 2)).any() for b in mixed)


def test_each_rank_of_two_workers_gets_its_own_ids(memory_store):
    shards = [_epochs(memory_store, DATA, 2, batch_size=8, rank=r, world_size=2, drop_last=True) for r in (0, 1)]
    first = [np.concatenate([b.ids for b in s[: len(s) // 2]]) for s in shards]
    assert len(first[0]) == len(first[1]) == 32 and not set(first[0]) & set(first[1])


def test_rebuilt_batch_equals_the_teacher_labels(memory_store):
    """A finished batch carries exactly the stored rows of its ids (gathered in a worker)."""
    batch = _epochs(memory_store, DATA, 2)[0]
    whole = memory_store.load(0).arrays
    torch.testing.assert_close(batch.teacher["topk_logit"], torch.from_numpy(whole["topk_logit"][batch.ids]).float(),
                               rtol=0, atol=0)
    assert "view" not in whole  # format 3: a digest of them, the parameters drawn again for each batch
    ds = load_dataset(DATA)
    recipe = check_store(memory_store, ds)
    np.testing.assert_array_equal(batch.params, draw_views(recipe, 0, batch.ids, len(ds), view_hw(ds)))
    for seed in (0, 1):  # and every row of every chunk is what the labeler drew
        assert check_views(memory_store.view_record(seed), "store", recipe, seed, len(ds), 8, view_hw(ds),
                           full=True) == len(ds)
    plain = batch.params[:, COL["mix_mode"]] == MIX_NONE
    assert torch.equal(batch.targets[plain].argmax(1), batch.labels[plain])


def test_features_read_by_rows_equal_a_whole_load(memory_store):
    whole = memory_store.load(1).arrays["features"]
    assert memory_store.schema.chunk_rows == 8 and len(whole) == 72  # nine shards
    rows = FeatureRows(memory_store.seed_dir(1))
    rng = np.random.default_rng(0)
    for _ in range(5):  # random batches, rows repeated and in any order
        ids = rng.choice(72, size=20)
        got = rows.take(ids)
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, whole[ids])
    assert rows._sharded == (8, 8)  # the labeled store's layout, read by our reader


def _sorted_store(root: Path, labels: np.ndarray, chunk_rows: int, feature_shape=(2, 1, 1), seeds: int = 1
                  ) -> LabelStore:
    """A store written through the store's own API: identity views, the truth as labels, random features (or none);
    a seed's rows differ from another's by their logit, ``1 + seed``."""
    n = len(labels)
    schema = StoreSchema(num_samples=n, num_classes=int(labels.max()) + 1, top_k=1, feature_shape=feature_shape,
                         chunk_rows=chunk_rows)
    store = LabelStore.create(root, {"recipe": get_recipe("identity").to_dict(), "test": "sorted"}, schema)
    rng = np.random.default_rng(0)
    view = np.zeros((n, NUM_VIEW_PARAMS), dtype=np.float32)
    view[:, 2:4] = 1.0
    arrays = {"view": view, "topk_idx": labels[:, None], "topk_logit": np.ones((n, 1)), "lse": np.ones(n),
              "tail_lse": np.full(n, -np.inf), "hard": labels,
              "features": rng.normal(0, 2, (n, *(feature_shape or (1,)))).astype(np.float16)}
    arrays["features"][:40] = 0  # zarr leaves out inner chunks of fill values: read back as zeros
    if feature_shape is None:
        del arrays["features"]
    for seed in range(seeds):
        arrays["topk_logit"] = np.full((n, 1), 1.0 + seed)
        arrays["lse"] = np.full(n, 1.0 + seed)  # top-1 of all: the log-sum-exp is its logit
        store.begin_seed(seed)
        for i, (start, stop) in enumerate(schema.pieces()):
            store.write_piece(seed, i, start, {k: v[start:stop] for k, v in arrays.items()})
        store.commit_seed(seed)
    return store


def test_feature_rows_read_shards_of_many_inner_chunks_and_refuse_a_corrupt_index(tmp_path, caplog):
    labels = np.repeat(np.arange(10), 100)
    store = _sorted_store(tmp_path, labels, chunk_rows=64, feature_shape=(3, 2, 2))
    whole = store.load(0).arrays["features"]
    rows = FeatureRows(store.seed_dir(0))
    ids = np.random.default_rng(1).permutation(1000)
    np.testing.assert_array_equal(np.concatenate([rows.take(ids[s : s + 100]) for s in range(0, 1000, 100)]),
                                  whole[ids])
    assert rows._sharded == (64, 16) and not whole[:40].any()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for start in range(0, 1000, 100):
        rows.take(ids[start : start + 100])
    kept = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert kept < 16 * 1024, kept  # nothing kept between batches: memory does not grow with the split
    again = pickle.loads(pickle.dumps(rows))  # as a loader worker gets it: opens its own, reads the same
    assert again._array is None
    np.testing.assert_array_equal(again.take(ids[:50]), whole[ids[:50]])
    shard = store.seed_dir(0) / "features" / "c" / "3" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # flip bits in the index
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="does not match its checksum"):
        FeatureRows(store.seed_dir(0)).take(np.array([3 * 64 + 5]))
    # a store made before features were sharded: read through zarr, the same rows, and a warning
    group = zarr.open_group(store=str(store.seed_dir(0)), mode="r+", zarr_format=3)
    del group["features"]
    group.create_array("features", shape=whole.shape, dtype="float16", chunks=(256, 3, 2, 2), fill_value=0)[:] = whole
    with caplog.at_level(logging.WARNING, logger="stillroom.student"):
        old = FeatureRows(store.seed_dir(0))
        np.testing.assert_array_equal(old.take(ids[:100]), whole[ids[:100]])
    assert old._sharded is None and "relabel for fast reads" in caplog.text


def test_features_on_a_class_sorted_split_leave_batches_as_mixed_as_a_full_shuffle(tmp_path):
    """With feature maps the epoch is still a shuffle of the whole split: on ids sorted into 256 classes, batches
    of 128 hold as many classes as a full shuffle's (a shuffle within windows of 2 chunks gave about 16)."""
    n = 32768
    ds = load_dataset(f"synthetic:n={n},classes=256,size=4")
    order = np.argsort(ds.labels, kind="stable")
    ds.images, ds.labels = ds.images[order], ds.labels[order]
    store = _sorted_store(tmp_path, ds.labels, chunk_rows=1024)
    whole = store.load(0).arrays["features"]
    stream = StoreStream(store, ds, get_recipe("identity"), 128, loader_workers=0, shuffle_seed=3)
    assert stream.features
    batches = list(stream.epoch(0))
    ids = np.concatenate([b.ids for b in batches])
    assert np.array_equal(np.sort(ids), np.arange(n))
    for b in batches[:20]:  # the rows delivered are the stored rows of the batch's ids
        np.testing.assert_array_equal(b.teacher["features"].numpy(), whole[b.ids].astype(np.float32))
        assert torch.equal(b.labels, torch.from_numpy(ds.labels[b.ids]))
    shuffled = distinct_per_batch(ds.labels, np.random.default_rng(7).permutation(n), 128)
    got = distinct_per_batch(ds.labels, ids, 128)
    assert abs(got - shuffled) / shuffled < 0.05, (got, shuffled)
    assert shuffled > 90  # 128 draws from 256 classes: about 100 distinct


def test_partner_runs_on_imagenets_class_sorted_ids_are_as_class_balanced_as_a_shuffle():
    """A mixing recipe in seed order: the epoch is the seed's partner cycle cut into runs of the batch size. At
    ImageNet's 1,281,167 class-sorted ids (no images), batches of 256 hold as many classes as a shuffle's, each
    sample's partner is the next of its batch (but the last's), two ranks split the epoch evenly and disjointly,
    and another epoch cuts and orders the runs anew."""
    labels = class_sorted_labels()
    n, batch, recipe = len(labels), 256, get_recipe("deit")
    ranks = [partner_run_order(recipe, 3, n, batch, 7, 0, rank, 2) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == n // 2
    both = np.concatenate(ranks)
    assert len(np.unique(both)) == n - n % 2  # every sample once but the N % world_size left out
    shuffled = distinct_per_batch(labels, np.random.default_rng(1).permutation(n), batch)
    for order in ranks:
        got = distinct_per_batch(labels, order, batch)
        assert abs(got - shuffled) / shuffled < 0.01, (got, shuffled)  # about 225 distinct of 256
    runs = ranks[0][: len(ranks[0]) // batch * batch].reshape(-1, batch)[:64]
    np.testing.assert_array_equal(partners_of(recipe, 3, runs[:, :-1].ravel(), n), runs[:, 1:].ravel())
    assert (partners_of(recipe, 3, runs[:, -1], n)[:, None] != runs).all()  # the last's partner: not in its run
    other = partner_run_order(recipe, 3, n, batch, 7, 1, 0, 2)
    assert not np.isin(runs[0], other[:batch]).all() and len(other) == n // 2


def test_partner_runs_render_each_deit_view_once_and_equal_each_view_rendered_alone(folder_deit, monkeypatch):
    """``render_batch`` on a run of the partner cycle renders the batch's views and the last one's partner, no more,
    and every view (own and partner, RandAugment and erasing included) is bit-identical to rendering it alone."""
    ds, recipe = folder_deit
    params = draw_views(recipe, 1, np.arange(len(ds)), len(ds), ds.sizes)
    order = partner_run_order(recipe, 1, len(ds), 8, 0, 0)
    rendered = []
    real = views_module.decode_views
    monkeypatch.setattr(views_module, "decode_views", lambda d, w, req, *a: rendered.append(len(req)) or
                        real(d, w, req, *a))
    for start in (0, 8, 16):
        ids = order[start : start + 8]
        rendered.clear()
        own, partner = render_batch(ds, ids, params[ids], 32, recipe.draft, recipe)
        assert sum(rendered) == 8 + 1 and partner is not None  # deit mixes every pair: 9 views, not 16
        mates = params[ids, COL["partner"]].astype(np.int64)
        np.testing.assert_array_equal(mates[:-1], ids[1:])
        monkeypatch.setattr(views_module, "decode_views", real)
        assert torch.equal(own, render_views(ds, ids, own_rows(params[ids], recipe), 32, recipe.draft, recipe))
        alone = torch.stack([render_views(ds, mates[i : i + 1], partner_rows(params[ids[i : i + 1]], recipe), 32,
                                          recipe.draft, recipe)[0] for i in range(8)])
        assert torch.equal(partner, alone)
        _, extra, index = render_batch_pool(ds, ids, params[ids], (32,), recipe.draft, recipe)
        assert extra is not None and len(extra[32]) == 1  # what a worker hands over: the last one's partner alone
        np.testing.assert_array_equal(index, np.arange(1, 9))
        assert torch.equal(mix_views(own, extra[32], params[ids], index), mix_views(own, alone, params[ids]))
        monkeypatch.setattr(views_module, "decode_views", lambda d, w, req, *a: rendered.append(len(req)) or
                            real(d, w, req, *a))
    shuffled = np.random.default_rng(0).permutation(len(ds))[:8]  # the shuffle's batch: each partner rendered
    rendered.clear()
    render_batch(ds, shuffled, params[shuffled], 32, recipe.draft, recipe)
    assert sum(rendered) > 8 + 1


def test_streams_use_partner_runs_only_where_one_seed_mixes_views_on_disk(jpeg_store, memory_store):
    """A mixing store on JPEGs in seed order: batches are partner runs, the same with workers; its mixed views equal
    the views and partners rendered alone and mixed. ``--view-order random``, ``--views-per-image 2`` and in-memory
    data keep the shuffle."""
    store, data = jpeg_store
    ds = load_dataset(data)
    recipe = check_store(store, ds)
    stream = StoreStream(store, ds, recipe, 12, loader_workers=0, shuffle_seed=5)
    assert stream.partner_runs and len(stream) == 5
    batches = _epochs(store, data, 0, batch_size=12)
    for b in batches:
        mixing = b.params[:-1, COL["mix_mode"]] != MIX_NONE
        np.testing.assert_array_equal(b.params[:-1, COL["partner"]][mixing], b.ids[1:][mixing])
        own = render_views(ds, b.ids, own_rows(b.params, recipe), 24, recipe.draft, recipe)
        theirs = render_views(ds, np.where(b.params[:, COL["mix_mode"]] != MIX_NONE, b.params[:, COL["partner"]],
                                           b.ids).astype(np.int64), partner_rows(b.params, recipe), 24, recipe.draft,
                              recipe)
        assert torch.equal(b.views, mix_views(own, theirs, b.params))
    seed0 = store.load(0).arrays["view"]
    np.testing.assert_array_equal(batches[0].params, seed0[batches[0].ids])
    assert sorted(np.concatenate([b.ids for b in batches[:5]]).tolist()) == list(range(60))
    assert not StoreStream(store, ds, recipe, 12, view_order="random").partner_runs
    assert not StoreStream(store, ds, recipe, 12, views_per_image=2).partner_runs
    memory = load_dataset(DATA)
    assert not StoreStream(memory_store, memory, check_store(memory_store, memory), 8).partner_runs


def test_stream_without_features_delivers_none(memory_store):
    ds = load_dataset(DATA)
    recipe = check_store(memory_store, ds)
    with_features = StoreStream(memory_store, ds, recipe, 8, loader_workers=0)
    without = StoreStream(memory_store, ds, recipe, 8, loader_workers=0, features=False)
    assert with_features.features and not without.features
    np.testing.assert_array_equal(with_features.order(0), without.order(0))  # the same shuffle either way
    assert "features" not in next(without.epoch(0)).teacher


def test_random_view_order_replays_each_sample_from_a_seed_drawn_per_epoch(memory_store):
    """ml-dr's order: each epoch, each sample's view (its parameters, labels and feature maps) comes from one of the
    seeds drawn from the run's seed, the epoch and the id; worker processes give the same batches."""
    alone = _epochs(memory_store, DATA, 0, view_order="random")
    _assert_same(alone, _epochs(memory_store, DATA, 2, view_order="random"))
    seeds = {s: memory_store.load(s).arrays for s in (0, 1)}
    ds = load_dataset(DATA)
    recipe = check_store(memory_store, ds)
    for s, arrays in seeds.items():  # format 3: the parameters are drawn again (their digests: the batch test)
        arrays["view"] = draw_views(recipe, s, np.arange(len(ds)), len(ds), view_hw(ds))
    for b in alone:
        assert b.seed == -1 and b.row_seeds is not None and set(b.row_seeds.tolist()) <= {0, 1}
        for s, arrays in seeds.items():
            rows = b.row_seeds == s
            np.testing.assert_array_equal(b.params[rows], arrays["view"][b.ids[rows]])
            np.testing.assert_array_equal(b.teacher["topk_logit"][rows].numpy(),
                                          arrays["topk_logit"][b.ids[rows]].astype(np.float32))
            np.testing.assert_array_equal(b.teacher["features"][rows].numpy(),
                                          arrays["features"][b.ids[rows]].astype(np.float32))
    both = np.concatenate([b.row_seeds for b in alone])
    assert 0.3 < both.mean() < 0.7  # both seeds in use
    ds = load_dataset(DATA)
    recipe = check_store(memory_store, ds)
    stream = StoreStream(memory_store, ds, recipe, 8, loader_workers=0, view_order="random")
    other_rank = StoreStream(memory_store, ds, recipe, 8, loader_workers=0, view_order="random", rank=1,
                             world_size=2)
    np.testing.assert_array_equal(stream.seed_index(3), other_rank.seed_index(3))  # every rank draws the same
    assert not np.array_equal(stream.seed_index(0), stream.seed_index(1))  # another epoch, other choices
    assert stream.seed_for_epoch(0) is None
    with pytest.raises(UsageError, match="view order 'shuffled'"):
        StoreStream(memory_store, ds, recipe, 8, view_order="shuffled")


@pytest.mark.slow  # 64 seeds written and read: about 35 s on 2 shared cores
def test_random_view_order_holds_two_seeds_at_most_and_says_how_many_views_a_run_sees(tmp_path):
    n, seeds = 2048, 64
    labels = np.repeat(np.arange(8), n // 8)
    store = _sorted_store(tmp_path, labels, chunk_rows=512, feature_shape=None, seeds=seeds)
    ds = load_dataset(f"synthetic:n={n},classes=8,size=4")
    stream = StoreStream(store, ds, get_recipe("identity"), 256, loader_workers=0, view_order="random")
    one_seed = sum(a.nbytes for a in store.load(0).arrays.values())
    tracemalloc.start()
    stream.labels_for_epoch(0)
    kept = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    epoch = stream.labels_for_epoch(1)
    peak = tracemalloc.get_traced_memory()[1] - kept
    tracemalloc.stop()
    # what the first epoch keeps: each seed's open arrays (handles of a few KB, not their rows), for the run
    assert kept <= seeds * 16_384, kept / seeds
    # a later epoch: its rows and the block of one seed being read (the whole seed here: 2,048 rows), of which the
    # rows taken are decoded, and zarr's buffers; not 64 seeds
    assert peak <= 6 * one_seed, peak / one_seed
    picked = stream.seed_index(1)
    np.testing.assert_array_equal(epoch.arrays["topk_logit"][:, 0], 1.0 + picked)  # each row from its seed
    assert np.bincount(picked, minlength=seeds).min() > 10  # every seed in use: about 32 rows each
    # the distinct views a run sees: 64 epochs at random, about 40.6 of 64 (in seed order: all 64)
    choices = np.stack([stream.seed_index(e) for e in range(64)])
    seen = np.mean([len(np.unique(choices[:, i])) for i in range(n)])
    assert abs(seen - stream.distinct_views(64)) < 0.5 and abs(stream.distinct_views(64) - 40.64) < 0.01
    assert "about 40.6 distinct views of each sample" in (stream.warn_if_repeating(64) or "")
    cycle = StoreStream(store, ds, get_recipe("identity"), 256, loader_workers=0)
    assert cycle.distinct_views(64) == 64 and cycle.warn_if_repeating(64) is None


def test_views_per_image_puts_k_views_of_a_sample_in_a_batch_each_as_rendered_alone(jpeg_store):
    """FKD's multi-crop: with K = 2 a batch of 12 views holds 6 images, view j of each from seed j (epoch 0), each
    image decoded once for both crops; every view is bit-identical to the same view rendered in a batch alone."""
    store, data = jpeg_store
    ds = load_dataset(data)
    recipe = check_store(store, ds)
    multi = _epochs(store, data, 0, batch_size=12, views_per_image=2)
    _assert_same(multi, _epochs(store, data, 2, batch_size=12, views_per_image=2))
    one = StoreStream(store, ds, recipe, 12, loader_workers=0)
    for b in multi[:3]:
        assert len(b.ids) == 12 and len(np.unique(b.ids)) == 6 and np.array_equal(b.ids[0::2], b.ids[1::2])
        assert b.row_seeds is not None and b.row_seeds.tolist() == [0, 1] * 6
        for seed in (0, 1):
            rows = b.row_seeds == seed
            alone = one.make_batch(one.labels_for(seed), b.ids[rows])
            assert torch.equal(b.views[rows], alone.views)  # bit-identical
            np.testing.assert_array_equal(b.params[rows], alone.params)
            assert torch.equal(b.teacher["topk_logit"][rows], alone.teacher["topk_logit"])
    stream = StoreStream(store, ds, recipe, 12, loader_workers=0, views_per_image=2)
    assert len(stream) == -(-len(ds) // 6) and stream.distinct_views(3) == 2.0
    with pytest.raises(UsageError, match="a divisor of the batch size 12"):
        StoreStream(store, ds, recipe, 12, views_per_image=5)
    with pytest.raises(UsageError, match="has 2 seed"):
        StoreStream(store, ds, recipe, 12, views_per_image=3)


def test_bad_loader_workers_are_refused_and_the_default_is_sensible(memory_store):
    ds = load_dataset(DATA)
    with pytest.raises(UsageError, match="--loader-workers -1: expected >= 0"):
        StoreStream(memory_store, ds, check_store(memory_store, ds), 8, loader_workers=-1)
    assert default_loader_workers(in_memory=True) == 0
    assert 1 <= default_loader_workers(in_memory=False) <= 4


@pytest.fixture
def torch_threads(monkeypatch):
    """A plain process (no OMP_NUM_THREADS, as a shell gives ``stillroom train``) on 4 cores; torch's threads are
    put back after."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    yield
    torch.set_num_threads(before)


def test_training_with_two_loader_workers_equals_training_without(jpeg_store, tmp_path, torch_threads):
    """... and the training process takes the cores its loader workers leave (torch's default, every core, beside
    them oversubscribed the cores: 1.8 times as slow an epoch on a loaded 2-core machine)."""
    store, data = jpeg_store
    runs = {}
    for workers, threads in ((0, 2), (2, None)):  # 2 threads both (given; picked beside 2 workers): equal sums
        out = tmp_path / f"run{workers}"
        torch.set_num_threads(4)
        train(TrainConfig(store=str(store.path), dataset=data, student="test_resnet", loss="kd", out=str(out),
                          batch_size=12, max_steps=3, epochs=1, eval_split="val", progress=False,
                          loader_workers=workers, threads=threads))
        assert torch.get_num_threads() == 2
        runs[workers] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert json.loads((out / "config.json").read_text())["loader_workers"] == workers
    assert runs[0]["steps"] == runs[2]["steps"] == 3
    assert runs[0]["first_step"] == runs[2]["first_step"]  # the same first batch, bit for bit
    assert runs[0]["step_losses"] == runs[2]["step_losses"]


def test_training_threads_are_the_ones_asked_for_else_omps_else_the_cores_beside_the_loader(torch_threads,
                                                                                              monkeypatch):
    assert set_training_threads(None, 1) == 3 and set_training_threads(None, 8) == 1
    assert set_training_threads(2, 1) == 2  # --threads
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a Ray worker or job (Ray sizes it), or the user's own choice
    torch.set_num_threads(3)
    assert set_training_threads(None, 1) == 3


def test_cli_refuses_a_negative_loader_worker_count(memory_store, tmp_path):
    done = run_cli("train", "--store", str(memory_store.path), "--dataset", DATA, "--student", "test_resnet", "--loss",
                   "kd", "--out", str(tmp_path / "run"), "--loader-workers", "-1")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("stillroom: error: --loader-workers -1: expected 0 <= value")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_ray_train_ranks_stream_a_jpeg_folder_through_loader_workers(jpeg_store, tmp_path, ray_cluster):
    """Two ranks on one machine, each sizing its loader from the cores it shares with the other (1 worker on 2)."""
    store, data = jpeg_store
    out = tmp_path / "ddp"
    result = train(TrainConfig(store=str(store.path), dataset=data, student="test_resnet", loss="kd", out=str(out),
                               batch_size=10, epochs=1, eval_split="val", progress=False, workers=2))
    assert result["workers"] == 2
    assert json.loads((out / "config.json").read_text())["loader_workers"] == default_loader_workers(False, 2)
    epoch = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert epoch["samples"] == 60 and epoch["steps"] == 3  # two shards of 30 ids, batches of 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_finished_on_cuda_equal_the_cpu_ones(jpeg_store):
    store, data = jpeg_store
    cpu = _epochs(store, data, 2, batch_size=12)
    gpu = _epochs(store, data, 2, batch_size=12, device="cuda")
    for x, y in zip(cpu, gpu, strict=True):
        assert y.views.is_cuda and y.labels.is_cuda
        np.testing.assert_array_equal(x.ids, y.ids)
        torch.testing.assert_close(x.views, y.views.cpu(), rtol=0, atol=1e-6)
        assert torch.equal(x.targets, y.targets.cpu())
