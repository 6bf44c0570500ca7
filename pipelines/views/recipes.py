"""View recipes: the augmented views that the teacher labels and the student replays, the registry of
named recipes (``get_recipe``), and the columns of a view's parameter row.

A view is ``(recipe, seed, sample_id)`` (drawn in ``draw.py``, rendered in ``render.py``).

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
- random erasing, ``re_seed`` (the seed of the erased pixels' noise, below 2**16, keying its Philox stream:
  ``noise.py``; 0 where nothing is erased), then
  per box ``re{j}_top``, ``re{j}_left``, ``re{j}_h``, ``re{j}_w`` in pixels of the output size (``h`` 0: no box).

A recipe without them keeps the 17 columns and its digest.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch

from stillroom.pipelines.core import UsageError
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
# jitter, torchvision's RandAugment), and the erased pixels' grey levels: integers of a Philox stream through a
# table of normal thresholds (``noise.py``), the same bits on any machine
PIXEL_OPS = "pil+torchvision.functional+philox-grey-table"
# before it, the erased pixels came from torch.randn on the CPU, whose bits depend on the instruction set (issue
# 32): recipes that erase with noise took a new version; ml-dr erases with 0 (no noise) and keeps this, and with
# it its digest and stores
PIXEL_OPS_RANDN = "pil+torchvision.functional+torch.randn-cpu"
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
# version 2: the erased pixels' noise from the view's Philox stream (version 1: torch.randn, machine-dependent bits)
register_recipe(Recipe("fmnist-randaug", version=2, mixup_p=0.25, cutmix_p=0.25, mix_alpha=1.0,
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
# version 2: the erased pixels' noise from the view's Philox stream (version 1: torch.randn, machine-dependent bits)
register_recipe(Recipe("deit", version=2, out_size=224, scale=(0.08, 1.0), draft=True, interpolation="bicubic",
                       mixup_p=0.5, cutmix_p=0.5, mix_alpha=0.8, cutmix_alpha=1.0,
                       auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel", pixel_ops=PIXEL_OPS))
# apple/ml-dr's configs/imagenet/reinforce/randaug.yaml: RandomResizedCrop 224 (torchvision's: 0.08-1, bilinear),
# flip, torchvision's RandAugment (2 ops, magnitude 9 of 31 bins, nearest, fill 0) behind ml-dr's p = 1.0,
# torchvision's RandomErasing p = 0.25 (area 0.02-0.33, aspect 0.3-3.3, value 0 before Normalize); no mixing
register_recipe(Recipe("ml-dr", out_size=224, scale=(0.08, 1.0), draft=True, auto_augment="tv-n2-m9-b31-p1",
                       re_prob=0.25, re_mode="black", re_area=(0.02, 0.33), re_aspect=(0.3, 3.3),
                       pixel_ops=PIXEL_OPS_RANDN))
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
    """The views' side in pixels (None: the in-memory data set's own size); a clear error when the recipe names no
    output size for images on disk (``recipe_for`` gives it their size where they share one square size)."""
    if recipe.out_size is None and not dataset.in_memory:
        raise UsageError(f"recipe {recipe.name} has no output size and {no_view_size(dataset)}: use "
                         f"{recipe.name}:size=N (e.g. {recipe.name}:size=224) or imagenet-rrc")
    return recipe.out_size


def no_view_size(dataset) -> str:
    """Why a data set on disk gives its views no size of its own, as the end of a sentence: what is true of it."""
    shared = dataset.one_size()  # a data set on disk (FileDataset)
    if shared is None:
        return f"{dataset.spec} holds images of many sizes"
    h, w = shared
    if h != w:
        return f"every image of {dataset.spec} is {h}x{w}, not square"
    return f"every image of {dataset.spec} is {h}x{w}, outside the sizes a recipe takes (8 to 2048)"


def recipe_for(recipe: Recipe | str, dataset) -> Recipe:
    """The recipe ``dataset``'s views are made with: ``recipe`` itself, or, where it names no output size and the
    images on disk all share one square size S (CIFAR-10 written as 32x32 PNGs), ``recipe:size=S``: views at the
    images' own size, as in-memory data's, under a name that says it (the name is in the store's key)."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if recipe.out_size is not None or dataset.in_memory:
        return recipe
    shared = dataset.one_size()  # a data set on disk (FileDataset)
    if shared is None or shared[0] != shared[1] or not re.fullmatch(SIZE_RE, str(shared[0])):
        return recipe  # output_size says why, in one line, where the views need a size
    return get_recipe(f"{recipe.name}:size={shared[0]}")


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
