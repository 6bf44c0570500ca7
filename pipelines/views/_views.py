"""View recipes: the augmented views that the teacher labels and the student replays.

A view is ``(recipe, seed, sample_id)``. Its parameters are drawn by a counter-based generator
(numpy's Philox, keyed by a hash of the recipe and the seed, with the sample id in the counter), never
by global RNG state: any worker, in any order, draws the same parameters for the same view.

The parameters of one view are one row of ``P = 17`` float32 values (``VIEW_COLUMNS``): the sample's
own crop box as fractions of height/width and its flip; the mix mode, the partner's id, lambda; the
partner's own crop box and flip (so a row rebuilds its view alone); the cutmix box. Fractions and
lambda lie on a grid of 1/2048 (pixel-exact for images up to 2048 px), so they are exact in float32
and compress well in the store.

A recipe with photometric ops (``auto_augment``, ``color_jitter``, ``re_prob``) has more columns
(``view_columns(recipe)``), drawn from the view's own stream (keyed by recipe digest, seed and id, stream
``photo``): after the 17, the view's own ops, then (a recipe that mixes) its partner's, ``p_``-prefixed, the
partner's being the partner's own unmixed view's (drawn from the partner's id), so a row rebuilds its view alone:

- RandAugment, per layer ``ra{i}_op`` (index in the policy's op set, -1: skipped), ``ra{i}_mag`` (0-10, a multiple
  of 1/128; torchvision's: the bin), ``ra{i}_sign`` (+1/-1), ``ra{i}_filter`` (0 bilinear, 1 bicubic);
- colour jitter (a recipe without RandAugment, as timm), ``cj_order`` (a code of the permutation of brightness,
  contrast, saturation, hue), ``cj_brightness``, ``cj_contrast``, ``cj_saturation``, ``cj_hue``;
- random erasing, ``re_seed`` (the seed of the erased pixels' noise, below 2**16; 0 where nothing is erased), then
  per box ``re{j}_top``, ``re{j}_left``, ``re{j}_h``, ``re{j}_w`` in pixels of the output size (``h`` 0: no box).

A recipe without them keeps the 17 columns and its digest. The ops run in timm's order on the uint8 view in the
worker that renders it: crop and resize (the recipe's ``interpolation``) and flip, then RandAugment or colour
jitter on the PIL image (``pipelines._photometric``: PIL's ``ImageOps``/``ImageEnhance``/``transform`` as timm
calls them; torchvision's functional ops for colour jitter and torchvision's RandAugment), then random erasing on
the uint8 view, then (on the device) mixing. timm erases the normalised tensor per sample, before its batch is
mixed; here the erased pixels are ``mean + std * N(0, 1)`` in [0, 1] (timm's noise in the recipe's mean/std,
ImageNet's), rounded to uint8 and clipped, from a CPU generator seeded by ``re_seed``, before the views mix: the
pixels cross processes as uint8 like every view and the same in any process. The libraries that run the ops are
named in the recipe's ``pixel_ops`` (in its digest).

Two ways to build views, chosen by the data set:

- in-memory data sets (every image the same size): ``apply_views`` turns uint8 images and parameter rows
  into float views in [0, 1] with one ``grid_sample`` over the batch (per-sample affine grids),
  deterministic on CPU and GPU.
- data sets on disk (images of any size): ``render_views`` decodes each image and takes its crop box
  (fractions of *that* image's height and width) with PIL's antialiased bilinear resize straight to the
  recipe's output size, then flips: uint8 ``(B, 3, S, S)``, which is what crosses process boundaries.
  With ``recipe.draft`` a JPEG is decoded at 1/2, 1/4 or 1/8 size by DCT scaling (PIL's ``draft``) when
  the crop still spans at least ``S`` pixels at that scale: the largest such scale, a function of the
  stored box, the image's size and ``S`` alone, so the teacher and the student decode the same pixels in
  any process and any batch. ``mix_views`` then mixes the uint8 views (as floats) on the device.

Mixing partners: the next sample in a random cyclic order of the whole split (``partners_of``), fixed by the
recipe and the seed, computed per id by a keyed permutation (no table), never from the batch. On a split sorted
by class a partner is then of any class: two views of one class mix about as often as the class's share.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

from stillroom.pipelines.core import DataError, UsageError
from stillroom.pipelines.views.photometric import (
    ColorJitterPolicy,
    RandAugmentPolicy,
    RandomErasingPolicy,
    TorchvisionRandAugmentPolicy,
    ViewPhotometric,
)

VIEW_COLUMNS = (
    "y0", "x0", "h", "w", "flip",
    "mix_mode", "partner", "lam",
    "p_y0", "p_x0", "p_h", "p_w", "p_flip",
    "cut_y0", "cut_x0", "cut_h", "cut_w",
)
NUM_VIEW_PARAMS = len(VIEW_COLUMNS)
COL = {name: i for i, name in enumerate(VIEW_COLUMNS)}
MIX_NONE, MIX_MIXUP, MIX_CUTMIX = 0, 1, 2
GRID = 2048.0  # fractions are multiples of 1/GRID
DRAFT_SCALES = (8, 4, 2, 1)


@dataclass(frozen=True)
class Recipe:
    """A named, versioned augmentation. Bump ``version`` whenever the drawing code changes its output (the
    version is in the digest, so a store of the old views gets another cache key)."""

    name: str
    version: int = 1
    out_size: int | None = None  # None: the dataset's native size
    crop: bool = True
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    mixup_p: float = 0.0
    cutmix_p: float = 0.0
    mix_alpha: float = 1.0
    # added later; left out of the digest while at their defaults, so older recipes keep their digests
    center: float | None = None  # eval: the centred square of this fraction of the shorter side, no randomness
    draft: bool = False  # JPEG DCT-scaled decoding where the crop allows it (see the module docstring)
    interpolation: str = "bilinear"  # the crop's resize filter (PIL's, antialiased): bilinear or bicubic
    cutmix_alpha: float | None = None  # cutmix's Beta alpha where it is not mix_alpha (DeiT: mixup 0.8, cutmix 1.0)
    auto_augment: str | None = None  # a timm RandAugment policy (rand-m9-mstd0.5-inc1) or torchvision's (tv-n2-m9)
    color_jitter: tuple[float, ...] | None = None  # torchvision's ColorJitter factors; used without auto_augment
    re_prob: float = 0.0  # timm's random erasing: probability, mode, boxes, area and aspect ranges
    re_mode: str = "pixel"
    re_count: int = 1
    re_area: tuple[float, float] = (0.02, 1 / 3)
    re_aspect: tuple[float, float] = (0.3, 1 / 0.3)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # RandAugment's fill and the erasing noise (timm's)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    pixel_ops: str | None = None  # the libraries the photometric ops run on (PIXEL_OPS), required with them

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise UsageError(f"recipe {self.name}: interpolation {self.interpolation!r}, expected one of "
                             f"{', '.join(INTERPOLATIONS)}")
        if self.photometric and self.pixel_ops is None:
            raise UsageError(f"recipe {self.name} has photometric ops: name the libraries that run them (pixel_ops)")

    @property
    def photometric(self) -> bool:
        """Whether the recipe has RandAugment, colour jitter or random erasing (more view columns)."""
        return self.auto_augment is not None or self.color_jitter is not None or self.re_prob > 0

    @property
    def mixes(self) -> bool:
        """Whether some views mix two samples (mixup or cutmix): their rows name a partner."""
        return self.mixup_p + self.cutmix_p > 0

    @property
    def digest(self) -> str:
        """Hash of every field: the recipe's identity in cache keys and generator keys."""
        d = asdict(self)
        for f in fields(self):
            if f.name in _LATER_FIELDS and d[f.name] == f.default:
                del d[f.name]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {**asdict(self), "digest": self.digest}


_LATER_FIELDS = ("center", "draft", "interpolation", "cutmix_alpha", "auto_augment", "color_jitter", "re_prob",
                 "re_mode", "re_count", "re_area", "re_aspect", "mean", "std", "pixel_ops")
INTERPOLATIONS = ("bilinear", "bicubic")
# what runs the photometric ops: PIL (timm's RandAugment ops), torchvision's functional ops on PIL images (colour
# jitter, torchvision's RandAugment), torch's CPU normal generator (the erased pixels)
PIXEL_OPS = "pil+torchvision.functional+torch.randn-cpu"
RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    RECIPES[recipe.name] = recipe
    return recipe


register_recipe(Recipe("identity", crop=False, flip_p=0.0))
register_recipe(Recipe("fmnist-rrc"))
# flip only: the default for training a Fashion-MNIST teacher. Its objects fill the frame, and on a short
# budget crops cost more than they give: resnet10t, 6 epochs on the train split, reached 92.64 % test top-1
# with this, 90.94 % with crops of scale 0.7-1 and 89.28 % with fmnist-rrc (scale 0.35-1).
register_recipe(Recipe("fmnist-flip", crop=False))
# version 2: mixing partners from the whole split (version 1 took them from blocks of 65,536 consecutive ids)
register_recipe(Recipe("fmnist-rrc-mix", version=2, mixup_p=0.25, cutmix_p=0.25, mix_alpha=1.0))
# fmnist-rrc-mix plus DeiT's photometric parts: timm's RandAugment rand-m9-mstd0.5-inc1 and random erasing 0.25
# (pixel), filled with Fashion-MNIST's mean and std: the augmentation-heavy row of bench/accuracy.py
register_recipe(Recipe("fmnist-randaug", mixup_p=0.25, cutmix_p=0.25, mix_alpha=1.0,
                       auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel",
                       mean=(0.2860, 0.2860, 0.2860), std=(0.3530, 0.3530, 0.3530), pixel_ops=PIXEL_OPS))
# ImageNet: RandomResizedCrop (scale 0.08-1, aspect 3/4-4/3) and flip at 224 px; take :size=N for another size
register_recipe(Recipe("imagenet-rrc", out_size=224, scale=(0.08, 1.0), draft=True))
# FKD (Shen & Xing 2022, szq0214/FKD): the crops its soft labels describe, RandomResizedCrop 0.08-1 and flip
register_recipe(Recipe("fkd", out_size=224, scale=(0.08, 1.0), draft=True))
# DeiT (Touvron et al. 2021, facebookresearch/deit main.py and timm's create_transform): RandomResizedCrop 0.08-1
# bicubic, flip, RandAugment rand-m9-mstd0.5-inc1 (bicubic, fill the ImageNet mean), random erasing 0.25 (pixel, one
# box); its Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5) mixes every batch, by cutmix half
# the time: here every pair mixes, cutmix with probability 0.5 (lambda ~ Beta(1, 1)), else mixup (Beta(0.8, 0.8))
register_recipe(Recipe("deit", out_size=224, scale=(0.08, 1.0), draft=True, interpolation="bicubic",
                       mixup_p=0.5, cutmix_p=0.5, mix_alpha=0.8, cutmix_alpha=1.0,
                       auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel", pixel_ops=PIXEL_OPS))
# apple/ml-dr's configs/imagenet/reinforce/randaug.yaml: RandomResizedCrop 224 (torchvision's: 0.08-1, bilinear),
# flip, torchvision's RandAugment (2 ops, magnitude 9 of 31 bins, nearest, fill 0) behind ml-dr's p = 1.0,
# torchvision's RandomErasing p = 0.25 (area 0.02-0.33, aspect 0.3-3.3, value 0 before Normalize); no mixing
register_recipe(Recipe("ml-dr", out_size=224, scale=(0.08, 1.0), draft=True, auto_augment="tv-n2-m9-b31-p1",
                       re_prob=0.25, re_mode="black", re_area=(0.02, 0.33), re_aspect=(0.3, 3.3),
                       pixel_ops=PIXEL_OPS))
# evaluation: shorter side to 256/224 of the size, centre crop (crop first, then one resize: the same box)
register_recipe(Recipe("imagenet-eval", out_size=224, crop=False, flip_p=0.0, center=224 / 256, draft=True))


SIZE_RE = r"0*(?:[89]|[1-9][0-9]{1,2}|1[0-9]{3}|20[0-3][0-9]|204[0-8])"  # 8 <= N <= 2048, as get_recipe takes it


def get_recipe(name: str) -> Recipe:
    """A registered recipe by name; ``NAME:size=N`` is that recipe at output size ``N`` (8 to 2048)."""
    base, colon, option = name.partition(":")
    if base not in RECIPES:
        raise UsageError(f"unknown view recipe {base!r}: expected one of {', '.join(sorted(RECIPES))}")
    if not colon:
        return RECIPES[base]
    key, _, value = option.partition("=")
    if key != "size" or not re.fullmatch(SIZE_RE, value):
        raise UsageError(f"bad recipe option {option!r} in {name!r}: expected size=N with 8 <= N <= 2048")
    return replace(RECIPES[base], name=f"{base}:size={int(value)}", out_size=int(value))


def recipe_pattern() -> str:
    """A regular expression of exactly the names ``get_recipe`` takes (the registered recipes, each with an
    optional ``:size=N``): what a REST spec's ``recipe`` field accepts."""
    names = "|".join(re.escape(n) for n in sorted(RECIPES))
    return rf"^(?:{names})(?::size={SIZE_RE})?$"


def output_size(recipe: Recipe, dataset) -> int | None:
    """The views' side in pixels (None: the in-memory data set's own size); a clear error when the data set's
    images differ in size and the recipe names no output size."""
    if recipe.out_size is None and not dataset.in_memory:
        raise UsageError(f"recipe {recipe.name} has no output size and {dataset.spec} holds images of many sizes: "
                         f"use {recipe.name}:size=N (e.g. {recipe.name}:size=224) or imagenet-rrc")
    return recipe.out_size


@functools.lru_cache(maxsize=64)
def photometric_of(recipe: Recipe, size: int | None = None) -> ViewPhotometric | None:
    """The recipe's photometric ops for views of side ``size`` (default: the recipe's output size; RandAugment's
    absolute translations are 0.45 of the side, as timm's ``create_transform`` sets them), None without any."""
    if not recipe.photometric:
        return None
    side = size or recipe.out_size or 224
    randaugment: RandAugmentPolicy | TorchvisionRandAugmentPolicy | None = None
    if recipe.auto_augment is not None:
        if recipe.auto_augment.startswith("tv-"):
            randaugment = TorchvisionRandAugmentPolicy.parse(recipe.auto_augment)
        else:
            from PIL import Image

            fill = tuple(min(255, round(255 * m)) for m in recipe.mean)
            filt = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[recipe.interpolation]
            randaugment = RandAugmentPolicy.parse(recipe.auto_augment, translate_const=int(side * 0.45), fill=fill,
                                                  interpolation=int(filt))
    jitter = ColorJitterPolicy.of(recipe.color_jitter) if recipe.color_jitter and randaugment is None else None
    erasing = None
    if recipe.re_prob > 0:
        erasing = RandomErasingPolicy(recipe.re_prob, recipe.re_mode, 1, recipe.re_count, recipe.re_area[0],
                                      recipe.re_area[1], recipe.re_aspect[0], recipe.re_aspect[1], seed_bits=16)
    return ViewPhotometric(randaugment, jitter, erasing, tuple(recipe.mean), tuple(recipe.std))


def view_columns(recipe: Recipe) -> tuple[str, ...]:
    """The names of a view's stored parameters under ``recipe``: ``VIEW_COLUMNS``, then (a recipe with photometric
    ops) the view's own ops' and, where it mixes, the partner's (``p_``): see the module docstring."""
    photo = photometric_of(recipe)
    if photo is None:
        return VIEW_COLUMNS
    own = photo.columns()
    return VIEW_COLUMNS + own + (tuple(f"p_{c}" for c in own) if _mixing(recipe) else ())


def num_view_params(recipe: Recipe) -> int:
    """P, the width of the store's ``view`` array under ``recipe``."""
    return len(view_columns(recipe))


def _mixing(recipe: Recipe) -> bool:
    return recipe.mixes


def own_rows(params: np.ndarray, recipe: Recipe | None) -> np.ndarray:
    """Each row's own view in one-view layout: its crop box and flip, then its photometric columns."""
    photo = photometric_of(recipe) if recipe is not None else None
    if photo is None:
        return params[:, 0:5]
    q = len(photo.columns())
    return np.concatenate([params[:, 0:5], params[:, NUM_VIEW_PARAMS : NUM_VIEW_PARAMS + q]], axis=1)


def partner_rows(params: np.ndarray, recipe: Recipe | None) -> np.ndarray:
    """Each row's partner's view in one-view layout (its box and flip, then its photometric columns)."""
    photo = photometric_of(recipe) if recipe is not None else None
    if photo is None:
        return params[:, 8:13]
    q = len(photo.columns())
    return np.concatenate([params[:, 8:13], params[:, NUM_VIEW_PARAMS + q : NUM_VIEW_PARAMS + 2 * q]], axis=1)


def _check_width(params: np.ndarray | torch.Tensor, recipe: Recipe | None) -> None:
    width = num_view_params(recipe) if recipe is not None else NUM_VIEW_PARAMS
    if params.ndim != 2 or params.shape[1] != width:
        name = recipe.name if recipe is not None else "without photometric ops"
        raise UsageError(f"view params of shape {tuple(params.shape)}: expected {width} columns (recipe {name})")


def stream_key(recipe: Recipe, seed: int, stream: str) -> list[int]:
    digest = hashlib.sha256(f"{recipe.digest}/{int(seed)}/{stream}".encode()).digest()
    return [int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:16], "little")]


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


def _crop_flip(images: torch.Tensor, boxes: torch.Tensor, out_hw: tuple[int, int], mode: str = "bilinear"
               ) -> torch.Tensor:
    """Crop ``(y0, x0, h, w)`` fractions and flip (5th column), resized to ``out_hw``, bilinear (or ``mode``)."""
    y0, x0, h, w, flip = boxes.unbind(1)
    sign = 1 - 2 * flip
    theta = torch.zeros(len(images), 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = 2 * x0 + w - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * y0 + h - 1
    grid = F.affine_grid(theta, [len(images), images.shape[1], *out_hw], align_corners=False)
    out = F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)
    return out if mode == "bilinear" else out.clamp_(0, 1)


def _cut_mask(boxes: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) mask, 1 where a pixel centre lies inside the cutmix box."""
    oh, ow = out_hw
    ys = (torch.arange(oh, device=boxes.device, dtype=boxes.dtype) + 0.5) / oh
    xs = (torch.arange(ow, device=boxes.device, dtype=boxes.dtype) + 0.5) / ow
    y0, x0, h, w = (c[:, None] for c in boxes.unbind(1))
    in_y = (ys[None] >= y0) & (ys[None] < y0 + h)
    in_x = (xs[None] >= x0) & (xs[None] < x0 + w)
    return (in_y[:, :, None] & in_x[:, None, :]).unsqueeze(1).to(boxes.dtype)


def apply_views(images: torch.Tensor, params: torch.Tensor | np.ndarray, out_size: int | None = None,
                partner_images: torch.Tensor | None = None, recipe: Recipe | None = None) -> torch.Tensor:
    """Build the views: uint8 ``(B, C, H, W)`` images and ``(B, P)`` params -> float32 views in [0, 1].

    ``partner_images`` are the images of each row's partner (any image where the row does not mix);
    they are needed only when some row mixes. Mixup blends the two views by lambda; cutmix pastes the
    partner's view inside the cutmix box. A ``recipe`` with photometric ops (its rows have their columns):
    the cropped views are rounded to uint8 and the ops applied to each on the CPU (``_photometric_views``)
    before they mix; ``recipe.interpolation`` bicubic samples the crop bicubically.
    """
    params = torch.as_tensor(params, dtype=torch.float32, device=images.device)
    _check_width(params, recipe)
    if len(params) != len(images):
        raise UsageError(f"view params of shape {tuple(params.shape)} for {len(images)} images")
    out_hw = (out_size, out_size) if out_size else (int(images.shape[2]), int(images.shape[3]))
    mode = recipe.interpolation if recipe is not None else "bilinear"
    photo = photometric_of(recipe, out_hw[0]) if recipe is not None else None
    x = _crop_flip(images.float() / 255.0, params[:, 0:5], out_hw, mode)
    if photo is not None:
        x = _photometric_views(x, own_rows(params.cpu().numpy(), recipe)[:, 5:], photo, recipe, out_hw[0])
    if _mixes(params):
        if partner_images is None:
            raise UsageError("these views mix two images: pass partner_images")
        p = _crop_flip(partner_images.float() / 255.0, params[:, 8:13], out_hw, mode)
        if photo is not None:
            p = _photometric_views(p, partner_rows(params.cpu().numpy(), recipe)[:, 5:], photo, recipe, out_hw[0])
        x = _mix(x, p, params, out_hw)
    return x


def _photometric_views(x: torch.Tensor, rows: np.ndarray, photo: ViewPhotometric, recipe: Recipe | None, side: int
                       ) -> torch.Tensor:
    """Float views in [0, 1] -> the same views rounded to uint8, each through the photometric ops (PIL, on the
    CPU) from its row, back as floats in [0, 1] on ``x``'s device."""
    from PIL import Image

    u8 = (x * 255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    scale = side / float(getattr(recipe, "out_size", None) or side)
    out = np.empty_like(u8)
    for i, view in enumerate(u8):
        img = Image.fromarray(view[:, :, 0] if view.shape[2] == 1 else view)
        out[i] = photo.apply(img, rows[i], scale)
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(x.device).float() / 255.0


def _mixes(params: torch.Tensor) -> bool:
    return bool((params[:, COL["mix_mode"]] != MIX_NONE).any())


def _mix(x: torch.Tensor, p: torch.Tensor, params: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Mixup blends view and partner view by lambda; cutmix pastes the partner's view inside the box."""
    mode = params[:, COL["mix_mode"]]
    lam = params[:, COL["lam"]][:, None, None, None]
    mixup = (mode == MIX_MIXUP)[:, None, None, None]
    cut = (mode == MIX_CUTMIX)[:, None, None, None] * _cut_mask(params[:, 13:17], out_hw)
    x = torch.where(mixup, lam * x + (1 - lam) * p, x)
    return x * (1 - cut) + p * cut


def mix_views(own: torch.Tensor, partner: torch.Tensor | None, params: torch.Tensor | np.ndarray,
              partner_index: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
    """uint8 views from ``render_views`` (and their partners' views, where some row mixes) -> float views in
    [0, 1], mixed; runs on whatever device ``own`` is on. With ``partner_index`` (``render_batch_pool``),
    ``partner`` holds only the partner views the batch lacks and each row's is gathered here."""
    params = torch.as_tensor(params, dtype=torch.float32, device=own.device)
    x = own.float() / 255.0
    if _mixes(params):
        if partner is None:
            raise UsageError("these views mix two images: pass the partners' views")
        p = partner.to(own.device).float() / 255.0
        if partner_index is not None:
            p = _partner_views(x, p, partner_index)
        x = _mix(x, p, params, (int(own.shape[2]), int(own.shape[3])))
    return x


def draft_scale(box_hw: tuple[float, float], image_hw: tuple[int, int], out_size: int) -> int:
    """The largest DCT scale (8, 4, 2 or 1) at which a crop of ``box_hw`` (fractions) of an ``image_hw`` image
    still spans ``out_size`` pixels each way: decoding smaller then never upsamples what a full decode would
    have shrunk."""
    h = box_hw[0] * image_hw[0]
    w = box_hw[1] * image_hw[1]
    for s in DRAFT_SCALES:
        if h >= out_size * s and w >= out_size * s:
            return s
    return 1


def decode_view(data: bytes, where: str, box: np.ndarray, out_size: int, draft: bool, recipe: Recipe | None = None
                ) -> np.ndarray:
    """One view from encoded bytes: ``box`` = (y0, x0, h, w, flip) -> uint8 ``(out_size, out_size, 3)``.

    Decoded to RGB (CMYK, grayscale, palette and PNG-named-JPEG files included), at a DCT scale when
    ``draft`` and the crop allows it (``draft_scale``); the crop box is resized with PIL's antialiased
    bilinear filter (``recipe.interpolation``: bicubic where the recipe says so) straight from the decoded image.
    With a ``recipe`` that has photometric ops, ``box`` goes on with the view's photometric columns (``own_rows``),
    applied after the flip. Raises ``DataError`` naming ``where``."""
    return decode_views(data, where, [(box, out_size)], draft, recipe)[0]


def decode_views(data: bytes, where: str, requests: list[tuple[np.ndarray, int]], draft: bool,
                 recipe: Recipe | None = None) -> list[np.ndarray]:
    """Several views of one encoded image, each ``(box, size)`` a uint8 ``(size, size, 3)`` view bit-identical to
    ``decode_view`` of that box at that size alone: the views a batch needs of one sample (FKD's multi-crop,
    ``--views-per-image``; its views under several seeds) at each size they are needed at (a teacher of another
    input size). The image is decoded once for each distinct DCT scale the requests take (once in all without
    ``draft``, or when every request allows the same scale), then each request cropped and resized from it."""
    from PIL import Image

    out: list[np.ndarray] = [np.empty(0)] * len(requests)
    try:
        encoded = Image.open(io.BytesIO(data))
        jpeg = draft and encoded.format in ("JPEG", "MPO")
        full = (encoded.height, encoded.width)
        scales = [draft_scale((float(box[2]), float(box[3])), full, size) if jpeg else 1 for box, size in requests]
        for n, s in enumerate(sorted(set(scales), reverse=True)):
            if n:  # a decoded image cannot be decoded again at another scale: open it anew
                encoded = Image.open(io.BytesIO(data))
            if s > 1:
                encoded.draft("RGB", (encoded.width // s, encoded.height // s))
            img = encoded.convert("RGB") if encoded.mode != "RGB" else encoded
            img.load()
            for i in (i for i, scale in enumerate(scales) if scale == s):
                out[i] = _crop_resize(img, *requests[i], recipe)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{where}: cannot decode ({str(e).splitlines()[0][:120]})") from None
    return out


def _crop_resize(img, box: np.ndarray, out_size: int, recipe: Recipe | None = None) -> np.ndarray:
    from PIL import Image

    y0, x0, h, w, flip = (float(v) for v in box[:5])
    H, W = img.height, img.width
    region = (x0 * W, y0 * H, (x0 + w) * W, (y0 + h) * H)
    bicubic = recipe is not None and recipe.interpolation == "bicubic"
    view = img.resize((out_size, out_size), Image.Resampling.BICUBIC if bicubic else Image.Resampling.BILINEAR,
                      box=region)
    if flip:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    photo = photometric_of(recipe, out_size) if recipe is not None else None
    if photo is None:
        return np.asarray(view)
    return photo.apply(view, np.asarray(box[5:]), out_size / float(recipe.out_size or out_size))  # type: ignore[union-attr]


def render_views(dataset, ids: np.ndarray, boxes: np.ndarray, out_size: int, draft: bool, recipe: Recipe | None = None
                 ) -> torch.Tensor:
    """uint8 ``(B, 3, S, S)`` views of a data set on disk (channels-last in memory): sample ``ids[i]`` cropped by
    ``boxes[i]`` (y0, x0, h, w, flip). Reads only these samples' bytes, and each image once: the views of a
    sample that appears several times (``--views-per-image``, several seeds) are cropped from one decode per DCT
    scale (``render_views_at``, ``decode_views``). With a ``recipe`` that has photometric ops, each row of ``boxes``
    goes on with the view's photometric columns (``own_rows``). A pure function of its arguments: runs the same in
    any process."""
    return render_views_at(dataset, ids, boxes, (out_size,), draft, recipe)[out_size]


def render_views_at(dataset, ids: np.ndarray, boxes: np.ndarray, sizes: tuple[int, ...], draft: bool,
                    recipe: Recipe | None = None) -> dict[int, torch.Tensor]:
    """``render_views`` at each of ``sizes`` from the same boxes (a teacher of another input size sees the same
    crop at its own size): each image read once and decoded once per DCT scale, also where its id is on several
    rows (its K views under ``--views-per-image``, its views under several seeds); each size's views are those
    ``render_views`` gives at that size, each bit-identical to its view rendered alone."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    batches = {size: _uint8_batch((len(ids), size, size, 3)) for size in sizes}
    arrays = {size: b.numpy() for size, b in batches.items()}
    unique, inverse = np.unique(ids, return_inverse=True)  # an id on several rows: read once
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(unique) + 1))
    for u, (data, where) in enumerate(dataset.encoded(unique)):
        rows = order[bounds[u] : bounds[u + 1]]
        views = iter(decode_views(data, where, [(boxes[r], size) for r in rows for size in sizes], draft, recipe))
        for r in rows:
            for size in sizes:
                arrays[size][r] = next(views)
    return {size: b.permute(0, 3, 1, 2) for size, b in batches.items()}  # (B, 3, S, S), channels-last: no copy


def _uint8_batch(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty uint8 tensor; in a DataLoader worker, in shared memory (as torch's own collate allocates it), so
    handing the batch to the main process copies nothing."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def render_batch(dataset, ids: np.ndarray, params: np.ndarray, out_size: int, draft: bool,
                 recipe: Recipe | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch's uint8 views and, where some row mixes, its partners' uint8 views (rows that do not mix get
    a copy of their own view). What a loader worker process hands over; ``mix_views`` finishes the batch. The
    ``recipe`` (needed where its rows have photometric columns) gives the filter and the photometric ops."""
    own, partner = render_batch_at(dataset, ids, params, (out_size,), draft, recipe)
    return own[out_size], partner[out_size] if partner is not None else None


def render_batch_at(dataset, ids: np.ndarray, params: np.ndarray, sizes: tuple[int, ...], draft: bool,
                    recipe: Recipe | None = None) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor] | None]:
    """``render_batch`` at each of ``sizes`` (``render_views_at``): ``({size: own}, {size: partner} or None)``."""
    own, extra, index = render_batch_pool(dataset, ids, params, sizes, draft, recipe)
    if extra is None or index is None:
        return own, None
    return own, {size: _partner_views(v, extra[size], index) for size, v in own.items()}


def render_batch_pool(dataset, ids: np.ndarray, params: np.ndarray, sizes: tuple[int, ...], draft: bool,
                      recipe: Recipe | None = None
                      ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor] | None, np.ndarray | None]:
    """A batch's uint8 views and only the partner views it does not hold: ``({size: own}, {size: extra},
    partner_index)``, row ``i``'s partner view being row ``partner_index[i]`` of own followed by extra (its own row
    where it does not mix; ``in_batch_partners`` finds the partners already in the batch); ``(own, None, None)``
    where no row mixes. What a loader worker hands over (``mix_views(..., partner_index=)`` gathers on the device),
    so a batch of partners it holds is neither rendered nor copied twice."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    _check_width(params, recipe)
    own = render_views_at(dataset, ids, own_rows(params, recipe), sizes, draft, recipe)
    mixing = params[:, COL["mix_mode"]] != MIX_NONE
    if not mixing.any():
        return own, None, None
    index = np.arange(len(ids), dtype=np.int64)
    rows = np.flatnonzero(mixing)
    source = in_batch_partners(ids, params, rows, recipe)
    here = source >= 0
    index[rows[here]] = source[here]
    rest = rows[~here]
    index[rest] = len(ids) + np.arange(len(rest))
    if rest.size:
        extra = render_views_at(dataset, params[rest, COL["partner"]].astype(np.int64),
                                partner_rows(params[rest], recipe), sizes, draft, recipe)
    else:
        extra = {size: v[:0] for size, v in own.items()}
    return own, extra, index


def _partner_views(own: torch.Tensor, extra: torch.Tensor, index: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Row ``i``: row ``index[i]`` of ``own`` followed by ``extra`` (``render_batch_pool``), on ``own``'s device."""
    index = torch.as_tensor(index, dtype=torch.int64, device=own.device)
    outside = index >= len(own)
    out = own[index.clamp(max=len(own) - 1)]
    if bool(outside.any()):
        out[outside] = extra.to(own.device)[index[outside] - len(own)]
    return out


def in_batch_partners(ids: np.ndarray, params: np.ndarray, rows: np.ndarray, recipe: Recipe | None) -> np.ndarray:
    """For each mixing row in ``rows``, a row of the batch whose own view *is* its partner's view (the partner's id
    and the same one-view row: box, flip, photometric columns), else -1. Rendering is a pure function of the id and
    that row, so the partner's view is then the batch's own view of that row, bit for bit: a batch cut from a run of
    the partner cycle (``StoreStream``, one seed) renders each of its views once and only the last one's partner
    besides."""
    out = np.full(len(rows), -1, dtype=np.int64)
    if not len(rows):
        return out
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    wanted = params[rows, COL["partner"]].astype(np.int64)
    at = np.minimum(np.searchsorted(ids[order], wanted), len(ids) - 1)
    found = ids[order[at]] == wanted
    mine, theirs = own_rows(params, recipe), partner_rows(params[rows], recipe)
    for i in np.flatnonzero(found):  # an id on several rows (K views, several seeds): the first whose row matches
        for r in order[at[i]:]:
            if ids[r] != wanted[i]:
                break
            if np.array_equal(mine[r], theirs[i]):
                out[i] = r
                break
    return out


def partner_ids(params: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The id each view needs as its partner image (its own id where it does not mix)."""
    mixing = params[:, COL["mix_mode"]] != MIX_NONE
    return np.where(mixing, params[:, COL["partner"]].astype(np.int64), np.asarray(ids, dtype=np.int64))


def build_views(dataset, recipe: Recipe, seed: int, ids: np.ndarray | list[int],
                params: np.ndarray | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Read, draw (unless ``params`` are given, e.g. from the store) and apply: ``(views, params)``, the views
    float32 in [0, 1]."""
    ids = np.asarray(ids, dtype=np.int64)
    size = output_size(recipe, dataset)
    if not dataset.in_memory:
        if params is None:
            params = draw_views(recipe, seed, ids, len(dataset), dataset.sizes)
        own, partner = render_batch(dataset, ids, params, int(size or 0), recipe.draft, recipe)  # size: not None
        return mix_views(own, partner, params), params
    _, H, W = dataset.image_shape
    if params is None:
        params = draw_views(recipe, seed, ids, len(dataset), (H, W))
    images = dataset.read(ids)
    partners = partner_ids(params, ids)
    partner_images = images if np.array_equal(partners, ids) else dataset.read(partners)
    return apply_views(images, params, recipe.out_size, partner_images, recipe), params


def eval_views(dataset, ids: np.ndarray, size: int | None) -> torch.Tensor:
    """Un-augmented float views in [0, 1] for evaluation at ``size`` px: in-memory images resized whole
    (bilinear); images on disk through ``imagenet-eval`` at that size (shorter side to 256/224 of it, centre
    crop)."""
    ids = np.asarray(ids, dtype=np.int64)
    if dataset.in_memory:
        x = dataset.read(ids).float() / 255.0
        if size is not None and (x.shape[-1] != size or x.shape[-2] != size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x
    if size is None:
        raise UsageError(f"{dataset.spec} holds images of many sizes: evaluation needs an output size")
    return build_views(dataset, get_recipe(f"imagenet-eval:size={size}"), 0, ids)[0]


def whole_views(dataset, ids: np.ndarray, size: int) -> torch.Tensor:
    """Whole images (no crop, no flip) squeezed to ``size x size``, float in [0, 1]: the originals beside views."""
    ids = np.asarray(ids, dtype=np.int64)
    if dataset.in_memory:
        return eval_views(dataset, ids, size)
    boxes = np.tile(np.array([0.0, 0.0, 1.0, 1.0, 0.0]), (len(ids), 1))
    return render_views(dataset, ids, boxes, size, draft=False).float() / 255.0
