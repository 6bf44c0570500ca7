"""``--view-order random`` opens each seed once a run (pipelines.store.SeedReader), not once a (chunk, seed): on a
real S3 server an epoch sends the chunks it reads and, beyond them, a few metadata requests in the first epoch
and none after; what it gathers is each sample's row of the seed drawn for it."""

from __future__ import annotations

import re

import numpy as np
import pytest

from stillroom.pipelines.data import load_dataset
from stillroom.pipelines.store import LabelStore, SeedReader, StoreError, StoreSchema
from stillroom.pipelines.views import NUM_VIEW_PARAMS, get_recipe
from stillroom.student.data import StoreStream, label_names

N, CLASSES, CHUNK, SEEDS = 128, 4, 32, 4


def _store(root: str) -> LabelStore:
    """Identity views; seed s's rows hold logit ``1 + s``: each row tells which seed it came from."""
    schema = StoreSchema(num_samples=N, num_classes=CLASSES, top_k=1, chunk_rows=CHUNK)
    store = LabelStore.create(root, {"recipe": get_recipe("identity").to_dict(), "test": "reads"}, schema)
    labels = np.arange(N) % CLASSES
    view = np.zeros((N, NUM_VIEW_PARAMS), dtype=np.float32)
    view[:, 2:4] = 1.0
    for seed in range(SEEDS):
        arrays = {"view": view, "topk_idx": labels[:, None], "topk_logit": np.full((N, 1), 1.0 + seed),
                  "lse": np.full(N, 1.0 + seed), "tail_lse": np.full(N, -np.inf), "hard": labels}
        store.begin_seed(seed)
        for i, (start, stop) in enumerate(schema.pieces()):
            store.write_piece(seed, i, start, {k: v[start:stop] for k, v in arrays.items()})
        store.commit_seed(seed)
    return store


def _stream(store: LabelStore) -> StoreStream:
    ds = load_dataset(f"synthetic:n={N},classes={CLASSES},size=4")
    return StoreStream(store, ds, get_recipe("identity"), 32, loader_workers=0, view_order="random")


def _is_chunk(line: str) -> bool:  # a chunk object of a zarr v3 array: <array>/c/<i>[/<j>]
    return re.search(r"/c/\d+(/\d+)*(\?| |$)", line) is not None


def test_random_view_order_on_s3_sends_the_chunks_and_almost_nothing_else(s3):
    store = LabelStore(_store(s3.url("stores")).path)
    stream = _stream(store)
    per_epoch = []
    for epoch in range(3):
        before = len(s3.requests())
        labels = stream.labels_for_epoch(epoch)
        sent = s3.requests()[before:]
        per_epoch.append((sum(map(_is_chunk, sent)), [line for line in sent if not _is_chunk(line)]))
        np.testing.assert_array_equal(labels.arrays["topk_logit"][:, 0], 1.0 + stream.seed_index(epoch))
    arrays = len(store.stored_names(label_names(store)))  # format 3 at top-1: topk_idx, lse, tail_lp
    chunks = (N // CHUNK) * SEEDS * arrays  # every chunk of every array of every seed (8 rows a chunk: all read)
    assert per_epoch[0][0] >= chunks and [c for c, _ in per_epoch] == [per_epoch[0][0]] * 3
    first, *later = [other for _, other in per_epoch]
    # the first epoch: the seed list and each COMPLETE marker once, one seed's group and its arrays' metadata, and
    # each COMPLETE read again (HEAD, GET) for its view digests (21 here; 201 at 64 seeds); before, each of the 4 x 4
    # (chunk, seed) reads did all of that again (~300)
    assert len(first) <= 1 + 3 * SEEDS + 2 * (arrays + 1), first
    assert later == [[], []]


def test_the_reader_reads_each_seed_as_load_does_and_refuses_what_the_store_lacks(tmp_path):
    store = _store(str(tmp_path))
    reader = SeedReader(store, range(SEEDS), ["topk_logit", "hard", "lse"])
    for seed in (0, 2, 3):
        whole = store.load(seed, ["topk_logit", "hard", "lse"]).arrays
        for start in range(0, N, CHUNK):
            rows = reader.rows(seed, start, start + CHUNK)
            for name, a in rows.items():
                np.testing.assert_array_equal(a, whole[name][start : start + CHUNK])
    with pytest.raises(StoreError, match=r"seeds \[9\] are not in"):
        SeedReader(store, [0, 9], ["hard"])
    with pytest.raises(StoreError, match="has no arrays"):
        SeedReader(store, [0], ["features"])
    with pytest.raises(StoreError, match="not one of this reader's"):
        SeedReader(store, [0], ["hard"]).rows(3, 0, 8)


def test_repeating_views_are_said_once_by_the_caller_not_logged_as_well(tmp_path, capsys):
    stream = _stream(_store(str(tmp_path)))
    cycle = StoreStream(stream.store, stream.dataset, stream.recipe, 32, loader_workers=0)
    for s in (stream, cycle):
        note = s.warn_if_repeating(10)
        assert note and ("views repeat" in note or "distinct views" in note)
    assert capsys.readouterr().err == ""  # before: each also went to stderr through logging's last resort
