"""Partner ids at the float32 limit: a mixing recipe's views name their partners exactly up to 2^24 samples, and above
it (where float32 would round an odd id to another sample's) every path that draws partners refuses the split in one
line before any work: ``draw_views``, ``partner_cycle`` (an epoch's order) and the label job (``check_mix_size``).
No images: the partners are a function of the ids alone."""

from __future__ import annotations

import time

import numpy as np
import pytest

from stillroom.pipelines.core import UsageError
from stillroom.pipelines.views import (
    COL,
    MIX_NONE,
    check_mix_size,
    draw_views,
    get_recipe,
    partner_cycle,
    partners_of,
)

LIMIT = 2**24
SAID = "16,777,217 samples: recipe 'deit' mixes, and its partner ids are stored as float32, exact up to 16,777,216"


def test_views_name_their_partners_exactly_up_to_the_limit():
    deit = get_recipe("deit")
    ids = np.concatenate([np.arange(LIMIT - 64, LIMIT), np.random.default_rng(0).integers(0, LIMIT, 64)])
    params = draw_views(deit, 0, ids, LIMIT, (32, 32))
    mixing = params[:, COL["mix_mode"]] != MIX_NONE
    assert mixing.all()  # deit mixes every pair
    partners = partners_of(deit, 0, ids, LIMIT)
    assert partners.max() > LIMIT - 2**20  # large ids among them, where float32 has no bit to spare
    np.testing.assert_array_equal(params[:, COL["partner"]].astype(np.int64), partners)


def test_above_the_limit_partners_float32_cannot_hold_are_refused_before_any_work():
    deit, n = get_recipe("deit"), LIMIT + 1
    beyond = partners_of(deit, 0, np.arange(2**25 - 4096, 2**25), 2**25)  # partners exist and are exact in int64...
    assert (beyond.astype(np.float32).astype(np.int64) != beyond).any()  # ...but float32 would round some away
    t0 = time.perf_counter()
    with pytest.raises(UsageError, match=SAID):
        check_mix_size(deit, n)
    with pytest.raises(UsageError, match=SAID):
        draw_views(deit, 0, np.arange(4), n, (32, 32))
    with pytest.raises(UsageError, match=SAID):
        partner_cycle(deit, 0, n)  # refused before its 16.7 M-entry table is built (about 20 s)
    assert time.perf_counter() - t0 < 2
    rrc = get_recipe("imagenet-rrc")  # no mixing, no partners: any size
    check_mix_size(rrc, n)
    assert draw_views(rrc, 0, np.arange(4), n, (32, 32)).shape[0] == 4
