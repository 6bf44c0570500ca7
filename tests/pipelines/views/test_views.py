"""Views: deterministic, batch-independent, and geometrically right on hand-made images."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch
from class_sorted import class_sorted_labels

from stillroom.pipelines.core import UsageError
from stillroom.pipelines.data import load_dataset
from stillroom.pipelines.views import (
    COL,
    MIX_CUTMIX,
    MIX_MIXUP,
    NUM_VIEW_PARAMS,
    apply_views,
    build_views,
    draw_views,
    get_recipe,
    partners_of,
)

DATA = "synthetic:n=300,classes=4,size=16"


def test_same_view_across_batch_orders_and_sizes():
    ds = load_dataset(DATA)
    recipe = get_recipe("fmnist-rrc-mix")
    ids = np.arange(64)
    whole, params = build_views(ds, recipe, 3, ids)
    reversed_views, _ = build_views(ds, recipe, 3, ids[::-1].copy())
    assert torch.equal(whole, reversed_views.flip(0))
    for size in (1, 7, 32):
        parts = [build_views(ds, recipe, 3, ids[i : i + size])[0] for i in range(0, len(ids), size)]
        assert torch.equal(torch.cat(parts), whole)
    # a mix partner is fixed by (recipe, seed, id), whatever else is in the batch
    mixing = params[:, COL["mix_mode"]] > 0
    assert mixing.any()
    alone = draw_views(recipe, 3, ids[mixing][:5], len(ds), (16, 16))
    np.testing.assert_array_equal(alone[:, COL["partner"]], params[mixing][:5, COL["partner"]])


def test_same_view_in_another_process():
    code = (
        "import json, numpy as np; from stillroom.pipelines.data import load_dataset; "
        "from stillroom.pipelines.views import build_views, get_recipe; "
        f"v, p = build_views(load_dataset({DATA!r}), get_recipe('fmnist-rrc-mix'), 5, np.array([9, 2, 250]));"
        "print(json.dumps({'v': v.flatten().tolist(), 'p': p.flatten().tolist()}))"
    )
    out = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    here, params = build_views(load_dataset(DATA), get_recipe("fmnist-rrc-mix"), 5, np.array([9, 2, 250]))
    assert out["v"] == here.flatten().tolist()
    assert out["p"] == params.flatten().tolist()


def test_seeds_and_recipes_give_other_views():
    ds = load_dataset(DATA)
    ids = np.arange(32)
    a = draw_views(get_recipe("fmnist-rrc"), 0, ids, len(ds), (16, 16))
    b = draw_views(get_recipe("fmnist-rrc"), 1, ids, len(ds), (16, 16))
    c = draw_views(get_recipe("fmnist-rrc-mix"), 0, ids, len(ds), (16, 16))
    assert not np.array_equal(a, b)
    assert not np.array_equal(a[:, :4], c[:, :4])
    # crop boxes lie inside the image and respect the scale range (area fraction 0.35..1)
    assert (a[:, 0] >= 0).all() and (a[:, 0] + a[:, 2] <= 1).all() and (a[:, 1] + a[:, 3] <= 1).all()
    area = a[:, 2] * a[:, 3]
    assert area.min() > 0.3 and area.max() <= 1.0


def test_flip_recipe_keeps_the_whole_image():
    ds = load_dataset(DATA)
    ids = np.arange(64)
    views, params = build_views(ds, get_recipe("fmnist-flip"), 0, ids)
    np.testing.assert_array_equal(params[:, :4], np.tile([0, 0, 1, 1], (64, 1)))  # the full box, always
    flipped = params[:, COL["flip"]] == 1
    assert 10 < flipped.sum() < 54  # about half, p = 0.5
    images = ds.read(ids).float() / 255
    expected = torch.where(torch.from_numpy(flipped)[:, None, None, None], images.flip(-1), images)
    torch.testing.assert_close(views, expected)


def _params(rows: list[dict]) -> torch.Tensor:
    p = torch.zeros(len(rows), NUM_VIEW_PARAMS)
    for i, row in enumerate(rows):
        p[i, 2] = p[i, 3] = 1.0  # full box unless the row says otherwise
        for name, value in row.items():
            p[i, COL[name]] = value
    return p


def test_crop_and_flip_on_a_hand_made_image():
    img = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4) * 10
    full = apply_views(img, _params([{}]))
    torch.testing.assert_close(full, img.float() / 255)
    flipped = apply_views(img, _params([{"flip": 1}]))
    torch.testing.assert_close(flipped, img.flip(-1).float() / 255)
    # the top-left quarter, at half size: exactly those four pixels
    quarter = apply_views(img, _params([{"h": 0.5, "w": 0.5}]), out_size=2)
    torch.testing.assert_close(quarter, img[..., :2, :2].float() / 255)
    # the bottom-right quarter, flipped
    br = apply_views(img, _params([{"y0": 0.5, "x0": 0.5, "h": 0.5, "w": 0.5, "flip": 1}]), out_size=2)
    torch.testing.assert_close(br, img[..., 2:, 2:].flip(-1).float() / 255)


def test_mixup_and_cutmix_on_hand_made_images():
    a = torch.full((1, 1, 4, 4), 200, dtype=torch.uint8)
    b = torch.zeros((1, 1, 4, 4), dtype=torch.uint8)
    mix = apply_views(a, _params([{"mix_mode": MIX_MIXUP, "lam": 0.25, "p_h": 1, "p_w": 1}]), partner_images=b)
    torch.testing.assert_close(mix, torch.full((1, 1, 4, 4), 0.25 * 200 / 255))
    cut = apply_views(a, _params([{"mix_mode": MIX_CUTMIX, "lam": 0.5, "p_h": 1, "p_w": 1,
                                   "cut_y0": 0, "cut_x0": 0, "cut_h": 1, "cut_w": 0.5}]), partner_images=b)
    expected = torch.full((1, 1, 4, 4), 200 / 255)
    expected[..., :, :2] = 0
    torch.testing.assert_close(cut, expected)
    with pytest.raises(UsageError, match="partner_images"):
        apply_views(a, _params([{"mix_mode": MIX_MIXUP, "lam": 0.5}]))


def test_mixed_lambda_matches_cutmix_box():
    ds = load_dataset(DATA)
    p = draw_views(get_recipe("fmnist-rrc-mix"), 0, np.arange(len(ds)), len(ds), (16, 16))
    cut = p[:, COL["mix_mode"]] == MIX_CUTMIX
    assert cut.any()
    np.testing.assert_allclose(p[cut, COL["lam"]], 1 - p[cut, COL["cut_h"]] * p[cut, COL["cut_w"]], atol=1e-6)
    # fractions lie on the 1/2048 grid, exact in float32
    np.testing.assert_array_equal(p[:, :4] * 2048, np.round(p[:, :4] * 2048))


def test_bad_input():
    with pytest.raises(UsageError, match="unknown view recipe 'nope'"):
        get_recipe("nope")
    with pytest.raises(UsageError, match="out of range|must lie in"):
        build_views(load_dataset(DATA), get_recipe("fmnist-rrc"), 0, [300])


def test_partners_come_from_the_whole_class_sorted_split():
    """ImageNet's shape (1,281,167 ids sorted into 1,000 classes): a partner is of any class, so two views of
    one class mix about 1/1000 of the time (blocks of 65,536 ids gave about 2 %, with 51 neighbouring classes)."""
    labels = class_sorted_labels()
    n, ids = len(labels), np.arange(len(labels))
    recipe = get_recipe("fmnist-rrc-mix")
    assert recipe.version >= 2  # views changed with the partners: stores of version 1 have another cache key
    partners = partners_of(recipe, 0, ids, n)
    assert (partners != ids).all()
    assert np.array_equal(np.sort(partners), ids)  # each sample the partner of exactly one
    same = (labels[partners] == labels).mean()
    assert abs(same - 1 / 1000) < 0.0005, same
    # the partner's class does not depend on the sample's: class 0's partners lie over all classes evenly
    of_class_0 = labels[partners[labels == 0]]
    deciles = np.bincount(of_class_0 // 100, minlength=10)
    expected = len(of_class_0) / 10
    chi2 = float(((deciles - expected) ** 2 / expected).sum())
    assert chi2 < 30, (chi2, deciles)  # 9 degrees of freedom: p < 0.001 past 27.9
    assert len(np.unique(labels[partners[labels < 100]])) == 1000  # the first 100 classes reach all 1,000
    assert abs(np.corrcoef(labels, labels[partners])[0, 1]) < 0.01


def test_partners_are_drawn_per_id_with_no_table():
    n = 1_281_167
    recipe = get_recipe("fmnist-rrc-mix")
    rng = np.random.default_rng(0)
    some = rng.choice(n, 4096, replace=False)
    whole = partners_of(recipe, 3, np.arange(n), n)
    np.testing.assert_array_equal(partners_of(recipe, 3, some, n), whole[some])  # any ids, any order
    assert (partners_of(recipe, 4, some, n) != whole[some]).mean() > 0.99  # another seed, other partners
    tracemalloc.start()
    partners_of(recipe, 3, some[:256], n)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 256 * 1024, peak  # a batch's worth (a permutation of one 65,536-id block alone took 512 KB)
    for small in (2, 3, 5, 64, 1000):  # every small split: a permutation with no sample its own partner
        p = partners_of(recipe, 1, np.arange(small), small)
        assert np.array_equal(np.sort(p), np.arange(small)) and (p != np.arange(small)).all()
    np.testing.assert_array_equal(partners_of(recipe, 1, np.array([0]), 1), [0])
