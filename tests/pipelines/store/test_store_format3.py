"""Store format 3: view parameters kept as a digest and drawn again on read, hard derived, top-k logits in 8 bits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stillroom.pipelines.data import load_dataset
from stillroom.pipelines.store import COMPLETE, LabelStore, StoreError, StoreSchema, check_views
from stillroom.pipelines.store.codec import decode_topk, encode_topk
from stillroom.pipelines.views import draw_views, get_recipe
from stillroom.student.data import StoreStream
from stillroom.student.losses import soft_targets_from_topk

DATA = "synthetic:n=100,classes=5,size=8"
RECIPE = "fmnist-rrc-mix"


def _labels(n: int, classes: int, k: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    logits = torch.from_numpy(rng.normal(0, 3, (n, classes))).float()
    top = logits.topk(k, 1)
    tail = logits.scatter(1, top.indices, float("-inf"))
    return {"topk_idx": top.indices.numpy().astype(np.int16), "topk_logit": top.values.numpy().astype(np.float16),
            "lse": logits.logsumexp(1).numpy(), "tail_lse": tail.logsumexp(1).numpy(),
            "hard": top.indices[:, 0].numpy().astype(np.int16)}


def _store(root, drawn_with: dict[int, int], store_views: bool = False) -> tuple[LabelStore, object]:
    """A format-3 store of ``DATA``: seed s's views drawn under seed ``drawn_with[s]`` (s itself: as a labeler)."""
    ds = load_dataset(DATA)
    recipe = get_recipe(RECIPE)
    schema = StoreSchema(num_samples=len(ds), num_classes=5, top_k=3, chunk_rows=32, store_views=store_views)
    store = LabelStore.create(root, {"recipe": recipe.to_dict(), "test": "format3"}, schema)
    rng = np.random.default_rng(0)
    for seed, drawn in drawn_with.items():
        arrays = {**_labels(len(ds), 5, 3, rng), "view": draw_views(recipe, drawn, np.arange(len(ds)), len(ds), (8, 8))}
        store.begin_seed(seed)
        for i, (a, b) in enumerate(schema.pieces()):
            store.write_piece(seed, i, a, {k: v[a:b] for k, v in arrays.items()})
        store.commit_seed(seed)
    return store, ds


def test_views_are_drawn_again_and_a_store_of_other_views_is_refused_in_one_line(tmp_path):
    store, ds = _store(tmp_path, {0: 0, 1: 7})  # seed 1 holds the digests of seed 7's views
    recipe = get_recipe(RECIPE)
    assert "view" not in store.schema.stored() and "hard" not in store.schema.stored()
    assert not (store.seed_dir(0) / "view").exists()
    stream = StoreStream(store, ds, recipe, 16, seeds=(0, 1), loader_workers=0)
    batch = next(stream.epoch(0))  # seed 0: the digests match; the batch's parameters are the labeler's
    np.testing.assert_array_equal(batch.params, draw_views(recipe, 0, batch.ids, len(ds), (8, 8)))
    assert check_views(store.view_record(0), "s", recipe, 0, len(ds), 32, (8, 8), full=True) == len(ds)
    with pytest.raises(StoreError) as refused:
        next(stream.epoch(1))
    assert "seed 1 chunk 0: the view parameters this stillroom draws" in str(refused.value)
    assert "\n" not in str(refused.value)
    # a store drawn by another generator is refused by its version before any redraw
    record = json.loads((store.seed_dir(0) / COMPLETE).read_text())
    record["views"]["generator"] = 0
    (store.seed_dir(0) / COMPLETE).write_text(json.dumps(record))
    with pytest.raises(StoreError, match="drawn by view generator 0; this stillroom draws with 1"):
        next(StoreStream(store, ds, recipe, 16, seeds=(0,), loader_workers=0).epoch(0))


def test_store_views_keeps_the_parameters_and_the_stream_reads_them(tmp_path):
    store, ds = _store(tmp_path, {0: 0}, store_views=True)
    held = store.load(0).arrays
    np.testing.assert_array_equal(held["view"], draw_views(get_recipe(RECIPE), 0, np.arange(len(ds)), len(ds), (8, 8)))
    np.testing.assert_array_equal(held["hard"], held["topk_idx"][:, 0])


@pytest.mark.parametrize("classes,k,spread", [(10, 5, 2.0), (1000, 10, 3.0), (1000, 10, 8.0), (100, 2, 4.0)])
def test_decoded_targets_stay_within_the_bound_of_float16s(classes, k, spread):
    """The bound the README states, on random teachers from flat to confident (a trained teacher's labels:
    bench/store_tv.py): mean total variation <= 0.002 from float16's rebuild at T = 1 and T = 4."""
    rng = np.random.default_rng(classes + k)
    logits = torch.from_numpy(rng.normal(0, spread, (4000, classes)) + rng.normal(0, 3, (4000, 1))).float()
    top = logits.topk(k, 1)
    tail_lse = logits.scatter(1, top.indices, float("-inf")).logsumexp(1).numpy()
    lse = logits.logsumexp(1).numpy()
    f16 = top.values.numpy().astype(np.float16)
    decoded = decode_topk(encode_topk(f16, lse, tail_lse), k)
    np.testing.assert_allclose(decoded["lse"], lse, rtol=0, atol=0)
    for T in (1.0, 4.0):
        old = soft_targets_from_topk(top.indices, torch.from_numpy(f16), torch.from_numpy(tail_lse), classes, T)
        new = soft_targets_from_topk(top.indices, torch.from_numpy(decoded["topk_logit"]),
                                     torch.from_numpy(decoded["tail_lse"]), classes, T)
        tv = 0.5 * (old - new).abs().sum(1)
        assert float(tv.mean()) <= 0.002 and float(tv.max()) <= 0.01, (T, float(tv.mean()), float(tv.max()))
