"""Erasing boxes of a recipe without an output size (``fmnist-randaug``) are drawn in pixels of the in-memory images'
own size; views at another size (a teacher of another input size) erase the same fraction of the view."""

from __future__ import annotations

import numpy as np
import torch

from stillroom.pipelines.data import load_dataset
from stillroom.pipelines.views import (
    COL,
    MIX_NONE,
    NUM_VIEW_PARAMS,
    apply_views,
    draw_views,
    get_recipe,
    photometric_of,
)


def _erased_fraction(images: torch.Tensor, params: np.ndarray, size: int | None, recipe) -> float:
    """The fraction of the views' pixels the erasing boxes change: views with their boxes against the same views
    with the boxes left out (every other op the same)."""
    photo = photometric_of(recipe)
    erase_width = 1 + 4 * photo.erasing.max_count
    unerased = params.copy()
    end = NUM_VIEW_PARAMS + len(photo.columns())  # the view's own columns; the erasing ones are their last
    unerased[:, end - erase_width : end] = 0
    erased = apply_views(images, params, size, recipe=recipe)
    plain = apply_views(images, unerased, size, recipe=recipe)
    return float((erased != plain).any(dim=1).float().mean())


def test_erased_fraction_is_the_same_at_a_teachers_size():
    ds = load_dataset("synthetic:n=64,classes=4,size=16", "train")
    recipe = get_recipe("fmnist-randaug")
    assert recipe.out_size is None
    ids = np.arange(len(ds))
    params = draw_views(recipe, 0, ids, len(ds), ds.image_shape[1:])
    params[:, COL["mix_mode"]] = MIX_NONE  # the views alone: mixing would blend the erased pixels away
    images = ds.read(ids)
    own = _erased_fraction(images, params, None, recipe)
    assert own > 0.02  # a quarter of the views erase, each 2-33 % of its pixels
    for size in (32, 64):  # a teacher at 2x and 4x the images' side
        assert abs(_erased_fraction(images, params, size, recipe) - own) < 0.25 * own
