"""Drawing each view's parameters, and its mixing partner, from a counter-based generator.

A view is ``(recipe, seed, sample_id)``. Its parameters are drawn by a counter-based generator
(numpy's Philox, keyed by a hash of the recipe and the seed, with the sample id in the counter), never
by global RNG state: any worker, in any order, draws the same parameters for the same view.

Mixing partners: the next sample in a random cyclic order of the whole split (``partners_of``), fixed by the
recipe and the seed, computed per id by a keyed permutation (no table), never from the batch. On a split sorted
by class a partner is then of any class: two views of one class mix about as often as the class's share.
"""

from __future__ import annotations

import numpy as np

from stillroom.pipelines.core import UsageError
from stillroom.pipelines.views.photometric import ViewPhotometric
from stillroom.pipelines.views.recipes import (
    COL,
    MIX_CUTMIX,
    MIX_MIXUP,
    MIX_NONE,
    NUM_VIEW_PARAMS,
    Recipe,
    _mixing,
    num_view_params,
    photometric_of,
    stream_key,
)

GRID = 2048.0  # fractions are multiples of 1/GRID
# the version of the drawing itself (Philox streams, their keys, the partner permutation, the float32 columns):
# bump it when draw_views draws other parameters for the same recipe; format-3 stores, which keep a digest of the
# parameters instead of the parameters, have it in their cache key and a reader refuses a store of another one
VIEW_GENERATOR = 1


def _q(x):
    return np.floor(np.asarray(x, dtype=np.float64) * GRID) / GRID


def uniforms(key: list[int], ids: np.ndarray, n: int) -> np.ndarray:
    """``(len(ids), n)`` uniforms in [0, 1): the first n draws of each sample's own stream."""
    out = np.empty((len(ids), n))
    for row, rng in enumerate(_streams(key, ids)):
        out[row] = rng.random(n)
    return out


def _streams(key: list[int], ids: np.ndarray):
    """One Philox stream per sample id (the id is the counter's third word), reusing one bit generator:
    setting its state costs a few microseconds, a new generator about twenty."""
    bits = np.random.Philox(key=key)
    rng = np.random.Generator(bits)
    state = bits.state
    counter = np.zeros(4, dtype=np.uint64)
    for sid in ids:
        counter[2] = sid
        bits.state = {**state, "state": {"counter": counter, "key": state["state"]["key"]}, "buffer_pos": 4,
                      "has_uint32": 0}
        yield rng


_ATTEMPTS = 10


def _own(recipe: Recipe, key: list[int], ids: np.ndarray, H: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``(len(ids), 5)``: RandomResizedCrop as fractions of each image's own ``H x W`` (area in ``scale``, aspect
    log-uniform in ``ratio``, the first of 10 tries that fits, else the centred fallback torchvision uses) and
    the flip; with ``recipe.center`` the centred square of that fraction of the shorter side instead."""
    out = np.zeros((len(ids), 5))
    out[:, 2:4] = 1.0
    if recipe.center is not None:
        side = recipe.center * np.minimum(H, W)
        h, w = _q(side / H), _q(side / W)
        out[:, 0], out[:, 1], out[:, 2], out[:, 3] = _q((1 - h) / 2), _q((1 - w) / 2), h, w
        return out
    u = uniforms(key, ids, 4 * _ATTEMPTS + 1)
    out[:, 4] = u[:, -1] < recipe.flip_p
    if not recipe.crop:
        return out
    tries = u[:, :-1].reshape(len(ids), _ATTEMPTS, 4)
    lo, hi = np.log(recipe.ratio[0]), np.log(recipe.ratio[1])
    area = recipe.scale[0] + tries[..., 0] * (recipe.scale[1] - recipe.scale[0])
    aspect = np.exp(lo + tries[..., 1] * (hi - lo))  # width / height in pixels
    Hc, Wc = H[:, None], W[:, None]
    h = np.maximum(_q(np.sqrt(area * Hc * Wc / aspect) / Hc), 1 / GRID)
    w = np.maximum(_q(np.sqrt(area * Hc * Wc * aspect) / Wc), 1 / GRID)
    fits = (h <= 1) & (w <= 1)
    first = fits.argmax(axis=1)
    rows = np.arange(len(ids))
    h, w = h[rows, first], w[rows, first]
    y0 = _q(tries[rows, first, 2] * (1 - h))
    x0 = _q(tries[rows, first, 3] * (1 - w))
    fb_aspect = np.minimum(np.maximum(W / H, recipe.ratio[0]), recipe.ratio[1])
    narrower = fb_aspect < W / H
    fb_h = np.where(narrower, 1.0, _q(W / fb_aspect / H))
    fb_w = np.where(narrower, _q(H * fb_aspect / W), 1.0)
    none_fit = ~fits.any(axis=1)
    h, w = np.where(none_fit, fb_h, h), np.where(none_fit, fb_w, w)
    y0 = np.where(none_fit, _q((1 - fb_h) / 2), y0)
    x0 = np.where(none_fit, _q((1 - fb_w) / 2), x0)
    out[:, 0], out[:, 1], out[:, 2], out[:, 3] = y0, x0, h, w
    return out


MAX_MIX_SAMPLES = 2**24  # the view parameters are float32: a partner id above it would be rounded


def draw_views(recipe: Recipe, seed: int, ids: np.ndarray | list[int], num_samples: int,
               hw: tuple[int, int] | np.ndarray) -> np.ndarray:
    """The ``(len(ids), P)`` float32 view parameters of ``ids`` under ``(recipe, seed)``.

    ``num_samples`` is the size of the split (the mix partner is any of its samples: ``partners_of``); ``hw``
    the images' native (height, width), which the crop's aspect ratio refers to: one pair for all, or the
    data set's ``(num_samples, 2)`` ``sizes`` (indexed by sample id).
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= num_samples):
        bad = int(ids[(ids < 0) | (ids >= num_samples)][0])
        raise UsageError(f"sample id {bad} is out of range: expected 0 <= id < {num_samples}")
    if _mixing(recipe) and num_samples > MAX_MIX_SAMPLES:  # float32 holds every integer up to 2^24 alone
        raise UsageError(f"{num_samples:,} samples: recipe {recipe.name!r} mixes, and its partner ids are stored as "
                         f"float32, exact up to {MAX_MIX_SAMPLES:,} samples: split the data set or use a recipe "
                         "without mixing")
    sizes = np.asarray(hw)

    def hw_of(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pairs = sizes[rows] if sizes.ndim == 2 else np.broadcast_to(sizes, (len(rows), 2))
        return pairs[:, 0].astype(np.float64), pairs[:, 1].astype(np.float64)

    out = np.zeros((len(ids), num_view_params(recipe)), dtype=np.float32)
    own_key = stream_key(recipe, seed, "own")
    out[:, 0:5] = _own(recipe, own_key, ids, *hw_of(ids))
    photo = photometric_of(recipe)
    if photo is not None:
        q = len(photo.columns())
        out[:, NUM_VIEW_PARAMS : NUM_VIEW_PARAMS + q] = _photometric_params(recipe, photo, seed, ids, sizes)
    if not _mixing(recipe):
        return out
    mix_key = stream_key(recipe, seed, "mix")
    draws = np.empty((len(ids), 4))  # mode, lambda, cutmix centre y, x
    cut_alpha = recipe.mix_alpha if recipe.cutmix_alpha is None else recipe.cutmix_alpha
    for row, rng in enumerate(_streams(mix_key, ids)):
        mode_u = rng.random()
        alpha = cut_alpha if recipe.mixup_p <= mode_u < recipe.mixup_p + recipe.cutmix_p else recipe.mix_alpha
        draws[row] = (mode_u, rng.beta(alpha, alpha), *rng.random(2))
    mode = np.select([draws[:, 0] < recipe.mixup_p, draws[:, 0] < recipe.mixup_p + recipe.cutmix_p],
                     [MIX_MIXUP, MIX_CUTMIX], MIX_NONE)
    mixing = mode != MIX_NONE
    partners = partners_of(recipe, seed, ids, num_samples)
    out[:, COL["mix_mode"]] = mode
    out[mixing, COL["partner"]] = partners[mixing]
    out[mixing, 8:13] = _own(recipe, own_key, partners[mixing], *hw_of(partners[mixing]))
    if photo is not None:
        q = len(photo.columns())
        out[mixing, NUM_VIEW_PARAMS + q :] = _photometric_params(recipe, photo, seed, partners[mixing], sizes)
    lam = draws[:, 1]
    # cutmix: a box of area (1 - lam), centred uniformly and clipped; lambda then from the clipped box
    cut = np.sqrt(1 - lam)
    y0, y1 = _q(np.clip(draws[:, 2] - cut / 2, 0, 1)), _q(np.clip(draws[:, 2] + cut / 2, 0, 1))
    x0, x1 = _q(np.clip(draws[:, 3] - cut / 2, 0, 1)), _q(np.clip(draws[:, 3] + cut / 2, 0, 1))
    is_cut = mode == MIX_CUTMIX
    out[is_cut, 13:17] = np.stack([y0, x0, y1 - y0, x1 - x0], axis=1)[is_cut]
    out[:, COL["lam"]] = np.select([mode == MIX_MIXUP, is_cut], [_q(lam), 1 - (y1 - y0) * (x1 - x0)], 0.0)
    return out


def _photometric_params(recipe: Recipe, photo: ViewPhotometric, seed: int, ids: np.ndarray, sizes: np.ndarray
                        ) -> np.ndarray:
    """The photometric columns of the views of ``ids`` (their own, unmixed), from each id's ``photo`` stream;
    erasing boxes in pixels of the recipe's output size (in-memory data without one: the images' own)."""
    side = (recipe.out_size, recipe.out_size) if recipe.out_size else tuple(int(v) for v in np.asarray(sizes)[-2:])
    if not recipe.out_size and np.asarray(sizes).ndim != 1:
        raise UsageError(f"recipe {recipe.name} erases boxes in pixels of the views: give it an output size (:size=N)")
    return photo.draw(uniforms(stream_key(recipe, seed, "photo"), ids, photo.draws), side)  # type: ignore[arg-type]


def partners_of(recipe: Recipe, seed: int, ids: np.ndarray, num_samples: int) -> np.ndarray:
    """Partner of each sample id: the sample after it in a random cyclic order of the whole split, fixed by
    (recipe, seed). ``order`` is a keyed permutation of ``[0, num_samples)`` and the partner of ``i`` is
    ``order^-1(order(i) + 1 mod N)``: never ``i`` itself (N >= 2), every sample the partner of exactly one, and
    a partner's class independent of the sample's on a split sorted by class. Computed per id (a Feistel
    network, ``_SplitPermutation``): memory and time grow with ``len(ids)``, not the split."""
    ids = np.asarray(ids, dtype=np.int64)
    if num_samples < 2:
        return ids.copy()
    order = _SplitPermutation(stream_key(recipe, seed, "partners"), num_samples)
    return order.inverse((order(ids) + 1) % num_samples)


def partner_cycle(recipe: Recipe, seed: int, num_samples: int) -> np.ndarray:
    """The whole split in the cyclic order ``partners_of`` follows under (recipe, seed): the partner of
    ``cycle[p]`` is ``cycle[(p + 1) % N]`` (N >= 2). A table of N ids (10 MB at ImageNet's 1.28 M), for a reader
    that orders a whole epoch by it (``student.data.partner_run_order``)."""
    positions = np.arange(num_samples, dtype=np.int64)
    if num_samples < 2:
        return positions
    return _SplitPermutation(stream_key(recipe, seed, "partners"), num_samples).inverse(positions)


class _SplitPermutation:
    """A keyed pseudo-random permutation of ``[0, n)``, evaluated per element in both directions: a balanced
    Feistel network over ``2^(2h) >= n`` values (8 rounds, each a splitmix64 hash of the half and a round key)
    with cycle walking (re-apply until the value falls below ``n``; the domain is under ``4 n``, so a few
    steps on average). Our own because numpy's permutations are tables of ``n`` entries (10 MB at ImageNet's
    1.28 M, per process and seed) and nothing in numpy, torch or timm permutes by element."""

    ROUNDS = 8

    def __init__(self, key: list[int], n: int):
        self.n = int(n)
        self.half = max(1, ((self.n - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)
        rounds = np.arange(1, self.ROUNDS + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            self.keys = _splitmix64(np.uint64(key[0]) + rounds * np.uint64(key[1] | 1))

    def _round(self, r: int, x: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return _splitmix64(x ^ self.keys[r]) & self.mask

    def _forward(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self.half), x & self.mask
        for r in range(self.ROUNDS):
            left, right = right, left ^ self._round(r, right)
        return (left << np.uint64(self.half)) | right

    def _backward(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self.half), x & self.mask
        for r in reversed(range(self.ROUNDS)):
            left, right = right ^ self._round(r, left), left
        return (left << np.uint64(self.half)) | right

    def _walk(self, step, ids: np.ndarray) -> np.ndarray:
        x = step(np.asarray(ids, dtype=np.uint64))
        out = x.copy()
        outside = np.flatnonzero(x >= self.n)
        while outside.size:
            x = step(out[outside])
            out[outside] = x
            outside = outside[x >= self.n]
        return out.astype(np.int64)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """The position of each id in the order."""
        return self._walk(self._forward, ids)

    def inverse(self, positions: np.ndarray) -> np.ndarray:
        """The id at each position of the order."""
        return self._walk(self._backward, positions)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele et al. 2014), on uint64 arrays (wrapping)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def partner_ids(params: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The id each view needs as its partner image (its own id where it does not mix)."""
    mixing = params[:, COL["mix_mode"]] != MIX_NONE
    return np.where(mixing, params[:, COL["partner"]].astype(np.int64), np.asarray(ids, dtype=np.int64))
