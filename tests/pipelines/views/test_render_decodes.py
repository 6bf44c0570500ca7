"""A batch decodes each image once: also an image that is both a sample of the batch and, under another view, the
mixing partner of another sample (``render_batch_at``)."""

from __future__ import annotations

import numpy as np
from image_data import write_png_folder

from stillroom.pipelines.data import load_dataset
from stillroom.pipelines.views import (
    COL,
    MIX_NONE,
    draw_views,
    get_recipe,
    partner_rows,
    render_batch_at,
    render_views,
)


def test_an_image_that_is_a_sample_and_a_partner_is_decoded_once(tmp_path, decodes):
    ds = load_dataset(f"imagefolder:{write_png_folder(tmp_path, [(40, 48)], train=16)}", "train")
    recipe = get_recipe("fmnist-rrc-mix:size=24")
    ids = np.arange(len(ds))
    seed0 = draw_views(recipe, 0, ids, len(ds), ds.sizes)
    i = int(np.flatnonzero(seed0[:, COL["mix_mode"]] != MIX_NONE)[0])
    p = int(seed0[i, COL["partner"]])
    # sample i (seed 0) mixes with p; p is in the batch too under seed 1, its own view there another than i's
    # partner view: p's image is needed for two views
    seed1 = draw_views(recipe, 1, [p], len(ds), ds.sizes)
    seed1[:, COL["mix_mode"]] = MIX_NONE
    params = np.concatenate([seed0[[i]], seed1])
    assert not np.array_equal(partner_rows(params[:1], recipe), seed1[:, 0:5])
    decodes[0] = 0
    own, partner = render_batch_at(ds, np.array([i, p]), params, (24,), False, recipe)
    assert decodes[0] == 2  # i's image and p's, each once
    assert partner is not None
    np.testing.assert_array_equal(partner[24][0], render_views(ds, np.array([p]), partner_rows(params[:1], recipe),
                                                               24, False, recipe)[0])
    np.testing.assert_array_equal(own[24][1], render_views(ds, np.array([p]), seed1[:, 0:5], 24, False, recipe)[0])
