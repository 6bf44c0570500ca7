"""RandAugment with timm's semantics, drawn from given uniforms and applied from stored parameters.

timm's ``rand_augment_transform("rand-m9-mstd0.5-inc1")`` draws its ops, magnitudes and signs from Python's and
numpy's global RNGs as it transforms an image, so the same view cannot be rebuilt elsewhere. Here the same
policy is split in two:

- ``RandAugmentPolicy.draw(u)``: every layer's op, whether it applies, its magnitude, its sign and its
  resampling filter, from a ``(views, layers * DRAWS_PER_LAYER)`` array of uniforms (the view's counter-based
  stream), as ``(views, layers, 4)`` float32 parameters that a store can keep with the view;
- ``RandAugmentPolicy.apply(img, params)``: the layers on a PIL image, in order, each with the PIL call timm's
  op makes (``ImageOps``, ``ImageEnhance``, ``Image.transform``), so the pixels are the ones timm's op gives at
  that magnitude and sign.

The policy strings are timm's (``rand``, ``m``, ``n``, ``p``, ``mstd``, ``mmax``, ``inc``, ``t``), with its op
sets and magnitude ranges (``timm.data.auto_augment``, timm 1.0); ``tests/pipelines/views/test_photometric.py`` checks
the op frequencies and magnitude histograms against timm's own ``RandAugment`` over 100,000 draws and each op's
image against timm's op.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stillroom.pipelines.core import UsageError
from stillroom.pipelines.views.noise import ErasingNoise

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude M is the fraction M / 10 of each op's range
FILL = (128, 128, 128)  # timm's _FILL: what affine ops fill with when the policy names no image mean
DRAWS_PER_LAYER = 6  # uniforms a layer takes: op, apply, two for the magnitude's normal draw, sign, filter
PARAMS_PER_LAYER = 4  # stored per layer: op index (-1: not applied), magnitude, sign (+1/-1), filter (0/1)

RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                   "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                              "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                              "TranslateYRel")
RAND_3A = ("SolarizeIncreasing", "Desaturate", "GaussianBlur")
RAND_WEIGHTED_3A = {"SolarizeIncreasing": 6, "Desaturate": 6, "GaussianBlur": 6, "Rotate": 3, "ShearX": 2,
                    "ShearY": 2, "PosterizeIncreasing": 1, "AutoContrast": 1, "ColorIncreasing": 1,
                    "SharpnessIncreasing": 1, "ContrastIncreasing": 1, "BrightnessIncreasing": 1, "Equalize": 1,
                    "Invert": 1}
RAND_WEIGHTED_0 = {"Rotate": 3, "ShearX": 2, "ShearY": 2, "TranslateXRel": 1, "TranslateYRel": 1,
                   "ColorIncreasing": .25, "SharpnessIncreasing": 0.25, "AutoContrast": 0.25,
                   "SolarizeIncreasing": .05, "SolarizeAdd": .05, "ContrastIncreasing": .05,
                   "BrightnessIncreasing": .05, "Equalize": .05, "PosterizeIncreasing": 0.05, "Invert": 0.05}
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel",
          "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}
AFFINE = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"}


def level_args(name: str, magnitude: float, sign: float, hparams: dict[str, Any]) -> tuple[Any, ...]:
    """The op's arguments at ``magnitude`` (0-10 scale) with ``sign`` where timm negates at random: timm's
    ``LEVEL_TO_ARG`` with the coin made explicit."""
    f = magnitude / LEVEL_DENOM
    if name in ("AutoContrast", "Equalize", "Invert"):
        return ()
    if name == "Rotate":
        return (sign * f * 30.0,)
    if name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        bits = int(f * 4)
        return ({"Posterize": bits, "PosterizeIncreasing": 4 - bits, "PosterizeOriginal": bits + 4}[name],)
    if name in ("Solarize", "SolarizeIncreasing"):
        thresh = min(256, int(f * 256))
        return (thresh if name == "Solarize" else 256 - thresh,)
    if name == "SolarizeAdd":
        return (min(128, int(f * 110)),)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return (f * 1.8 + 0.1,)
    if name.endswith("Increasing"):  # Color/Contrast/Brightness/SharpnessIncreasing
        return (max(0.1, 1.0 + sign * f * 0.9),)
    if name in ("ShearX", "ShearY"):
        return (sign * f * 0.3,)
    if name in ("TranslateX", "TranslateY"):
        return (sign * f * float(hparams["translate_const"]),)
    if name in ("TranslateXRel", "TranslateYRel"):
        return (sign * f * hparams.get("translate_pct", 0.45),)
    if name == "Desaturate":
        return (max(0.5, min(1.0, 0.5 + 0.5 * f)),)
    if name == "GaussianBlur":
        return (max(0.1, min(2.0, 0.1 + 1.9 * f)),)
    raise UsageError(f"RandAugment op {name!r} is not supported")


def apply_op(img: Any, name: str, args: tuple[Any, ...], fill: tuple[int, ...], resample: int) -> Any:
    """One op on a PIL image, with the PIL call timm's op makes (``timm.data.auto_augment``)."""
    from PIL import Image, ImageEnhance, ImageFilter, ImageOps

    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name.startswith("Posterize"):
        if args[0] <= 0:  # 0 bits kept: black, as ImageOps.posterize gave before Pillow refused 0 (timm's op raises)
            return Image.new(img.mode, img.size)
        return img if args[0] >= 8 else ImageOps.posterize(img, args[0])
    if name in ("Solarize", "SolarizeIncreasing"):
        return ImageOps.solarize(img, args[0])
    if name == "SolarizeAdd":
        lut = [min(255, i + args[0]) if i < 128 else i for i in range(256)]
        if img.mode not in ("L", "RGB"):
            return img
        return img.point(lut * 3 if img.mode == "RGB" else lut)
    enhance = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
               "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}
    base = name.removesuffix("Increasing")
    if base in enhance:
        return enhance[base](img).enhance(args[0])
    if name == "Desaturate":
        return ImageEnhance.Color(img).enhance(min(1.0, max(0.0, 1.0 - args[0])))
    if name == "GaussianBlur":
        return img.filter(ImageFilter.GaussianBlur(radius=args[0]))
    kwargs = {"fillcolor": fill, "resample": resample}
    if name == "Rotate":
        return img.rotate(args[0], **kwargs)
    w, h = img.size
    matrix = {"ShearX": (1, args[0], 0, 0, 1, 0), "ShearY": (1, 0, 0, args[0], 1, 0),
              "TranslateX": (1, 0, args[0], 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, args[0]),
              "TranslateXRel": (1, 0, args[0] * w, 0, 1, 0), "TranslateYRel": (1, 0, 0, 0, 1, args[0] * h)}[name]
    return img.transform(img.size, Image.Transform.AFFINE, matrix, **kwargs)


@dataclass(frozen=True)
class RandAugmentPolicy:
    """A timm RandAugment policy string, parsed as ``timm.data.auto_augment.rand_augment_transform`` parses it.

    ``translate_const`` and ``fill`` are timm's ``hparams`` (``create_transform`` sets them from the image size,
    0.45 of it, and the data set's mean); ``interpolation`` None draws bilinear or bicubic per op, as timm does
    when none is given."""

    config: str
    magnitude: float = LEVEL_DENOM
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    magnitude_max: float | None = None
    ops: tuple[str, ...] = RAND_TRANSFORMS
    weights: tuple[float, ...] | None = None  # a weighted set: chosen without replacement, as timm does
    translate_const: int = 250
    fill: tuple[int, ...] = FILL
    interpolation: int | None = None
    hparams: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def parse(cls, config: str, translate_const: int = 250, fill: tuple[int, ...] = FILL,
              interpolation: int | None = None) -> RandAugmentPolicy:
        """``rand-m9-n2-mstd0.5-inc1`` and the like (timm's sections: m, n, p, mstd, mmax, inc, t)."""
        import re

        parts = config.split("-")
        if parts[0] != "rand":
            raise UsageError(f"RandAugment policy {config!r} must start with 'rand' (e.g. rand-m9-mstd0.5-inc1)")
        values: dict[str, Any] = {}
        transforms, increasing = None, False
        for part in parts[1:]:
            if part.startswith("t"):
                transforms = transforms or part[1:]
                continue
            split = re.split(r"(\d.*)", part)
            if len(split) < 2:
                continue  # timm skips a section without a number
            key, value = split[:2]
            try:
                if key == "mstd":
                    std = float(value)
                    values["magnitude_std"] = math.inf if std > 100 else std
                elif key == "mmax":
                    values["magnitude_max"] = int(value)
                elif key == "inc":
                    increasing = bool(int(value))
                elif key == "m":
                    values["magnitude"] = int(value)
                elif key == "n":
                    values["num_layers"] = int(value)
                elif key == "p":
                    values["prob"] = float(value)
                else:
                    raise UsageError(f"unknown section {part!r} in RandAugment policy {config!r}: expected m, n, "
                                     "p, mstd, mmax, inc or t")
            except ValueError:
                raise UsageError(f"bad number in section {part!r} of RandAugment policy {config!r}") from None
        choices: Sequence[str] | Mapping[str, float]
        if transforms == "weights":
            choices = RAND_WEIGHTED_0
        elif transforms == "3aw":
            choices = RAND_WEIGHTED_3A
        elif transforms == "3a":
            choices = RAND_3A
        else:
            choices = RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS
        weights = None
        if isinstance(choices, Mapping):
            total = sum(choices.values())
            weights = tuple(w / total for w in choices.values())
        ops = tuple(choices)
        if weights is not None and values.get("num_layers", 2) > len(ops):
            raise UsageError(f"RandAugment policy {config!r}: n is more than the {len(ops)} ops of its set")
        return cls(config, ops=ops, weights=weights, translate_const=translate_const, fill=tuple(fill),
                   interpolation=interpolation, **values)

    def draw(self, u: np.ndarray) -> np.ndarray:
        """``(V, num_layers, 4)`` float32 parameters of V views from their ``(V, num_layers * DRAWS_PER_LAYER)``
        uniforms in [0, 1): per layer the op's index in ``ops`` (-1 when the layer's coin skips it, as timm's
        ``random() > prob``), the magnitude (timm's normal draw around M, or uniform on [0, M] for an infinite
        std, clamped to [0, mmax or 10]), the sign of the ops timm negates at random, and the filter (0 bilinear,
        1 bicubic)."""
        views, layers = len(u), self.num_layers
        u = np.asarray(u, dtype=np.float64).reshape(views, layers, DRAWS_PER_LAYER)
        out = np.zeros((views, layers, PARAMS_PER_LAYER), dtype=np.float32)
        if self.weights is None:  # with replacement, uniform
            op = np.minimum((u[..., 0] * len(self.ops)).astype(np.int64), len(self.ops) - 1)
        else:  # without replacement, by weight: each layer from the ops left, renormalised (numpy's choice)
            op = np.zeros((views, layers), dtype=np.int64)
            left = np.broadcast_to(np.asarray(self.weights), (views, len(self.ops))).copy()
            for layer in range(layers):
                cdf = np.cumsum(left / left.sum(axis=1, keepdims=True), axis=1)
                pick = np.minimum((cdf <= u[:, layer, 0:1]).sum(axis=1), len(self.ops) - 1)
                op[:, layer] = pick
                left[np.arange(views), pick] = 0.0
        applied = u[..., 1] <= self.prob
        magnitude = np.full((views, layers), float(self.magnitude))
        if self.magnitude_std == math.inf:
            magnitude = u[..., 2] * self.magnitude
        elif self.magnitude_std > 0:  # Box-Muller from two uniforms (1 - u keeps the log finite)
            normal = np.sqrt(-2.0 * np.log1p(-u[..., 2])) * np.cos(2.0 * np.pi * u[..., 3])
            magnitude = self.magnitude + self.magnitude_std * normal
        magnitude = np.clip(magnitude, 0.0, self.magnitude_max or LEVEL_DENOM)
        out[..., 0] = np.where(applied, op, -1)
        out[..., 1] = magnitude
        out[..., 2] = np.where(u[..., 4] > 0.5, -1.0, 1.0)  # timm negates when random() > 0.5
        out[..., 3] = (u[..., 5] >= 0.5) if self.interpolation is None else 0.0
        return out

    def apply(self, img: Any, params: np.ndarray) -> Any:
        """The layers of one view (``params``: ``(num_layers, 4)``, from ``draw``) on a PIL image, in order."""
        from PIL import Image

        filters = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)
        hparams = {"translate_const": self.translate_const, **self.hparams}
        fill = self.fill[:1] if img.mode == "L" else self.fill
        for op, magnitude, sign, resample in np.asarray(params, dtype=np.float64).reshape(-1, PARAMS_PER_LAYER):
            if op < 0:
                continue
            name = self.ops[int(op)]
            filt = self.interpolation if self.interpolation is not None else filters[int(resample)]
            img = apply_op(img, name, level_args(name, float(magnitude), float(sign), hparams), fill, filt)
        return img


ERASE_DRAWS_PER_ATTEMPT = 4  # area, log aspect, top, left
ERASE_ATTEMPTS = 10  # timm's tries per box before it gives that box up
ERASE_MODES = ("const", "rand", "pixel", "black")  # black: torchvision's value=0 before normalisation (ml-dr)


@dataclass(frozen=True)
class RandomErasingPolicy:
    """timm's ``RandomErasing`` (``re_prob``, ``re_mode``, ``re_count``; area 0.02-1/3, aspect 0.3-1/0.3), drawn
    from given uniforms: each view's boxes (pixels of the output size) and the seed of its noise are
    parameters a store keeps; ``apply_uint8`` erases the uint8 view from them, the same in any process."""

    probability: float = 0.25
    mode: str = "pixel"
    min_count: int = 1
    max_count: int = 1
    min_area: float = 0.02
    max_area: float = 1 / 3
    min_aspect: float = 0.3
    max_aspect: float | None = None  # None: 1 / min_aspect, as timm
    seed_bits: int = 24  # the noise seed is below 2**seed_bits (at most 24: exact in float32)

    def __post_init__(self) -> None:
        if self.mode not in ERASE_MODES:
            raise UsageError(f"random erasing mode {self.mode!r}: expected one of {', '.join(ERASE_MODES)}")
        if not 0 <= self.probability <= 1 or not 1 <= self.min_count <= self.max_count:
            raise UsageError("random erasing: expected 0 <= probability <= 1 and 1 <= min_count <= max_count")

    @property
    def draws(self) -> int:
        """Uniforms a view takes: erase or not, the count, the noise seed, then every attempt of every box."""
        return 3 + self.max_count * ERASE_ATTEMPTS * ERASE_DRAWS_PER_ATTEMPT

    def draw(self, u: np.ndarray, height: int, width: int) -> np.ndarray:
        """``(V, 1 + 4 * max_count)`` float32: the noise seed (an integer below 2**seed_bits), then
        per box ``top, left, h, w`` in pixels (``h = 0``: no box), as timm's ``_erase`` draws them: the box's
        area scaled by the count, its first attempt that fits inside the image kept."""
        u = np.asarray(u, dtype=np.float64)
        views = len(u)
        out = np.zeros((views, 1 + 4 * self.max_count), dtype=np.float32)
        out[:, 0] = np.floor(u[:, 2] * (1 << min(self.seed_bits, 24)))
        erase = u[:, 0] <= self.probability  # timm skips when random() > probability
        count = self.min_count + np.minimum((u[:, 1] * (self.max_count - self.min_count + 1)).astype(np.int64),
                                            self.max_count - self.min_count)
        log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect or 1 / self.min_aspect))
        tries = u[:, 3:].reshape(views, self.max_count, ERASE_ATTEMPTS, ERASE_DRAWS_PER_ATTEMPT)
        area = (self.min_area + (self.max_area - self.min_area) * tries[..., 0]) * height * width / count[:, None, None]
        aspect = np.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * tries[..., 1])
        # Python's round() is half-to-even, as numpy's rint
        h = np.rint(np.sqrt(area * aspect)).astype(np.int64)
        w = np.rint(np.sqrt(area / aspect)).astype(np.int64)
        fits = (w < width) & (h < height)
        first = np.argmax(fits, axis=2)  # the first attempt that fits (timm breaks there)
        any_fit = fits.any(axis=2) & erase[:, None] & (np.arange(self.max_count)[None] < count[:, None])
        pick = np.take_along_axis
        hh = pick(h, first[..., None], 2)[..., 0]
        ww = pick(w, first[..., None], 2)[..., 0]
        ut = pick(tries[..., 2], first[..., None], 2)[..., 0]
        ul = pick(tries[..., 3], first[..., None], 2)[..., 0]
        top = np.floor(ut * (height - hh + 1))  # random.randint(0, H - h), both ends included
        left = np.floor(ul * (width - ww + 1))
        boxes = np.stack([top, left, hh, ww], axis=-1) * any_fit[..., None]
        out[:, 1:] = boxes.reshape(views, -1)
        return out

    def apply_uint8(self, view: np.ndarray, params: np.ndarray, mean: Sequence[float], std: Sequence[float],
                    scale: float = 1.0) -> np.ndarray:
        """Erase one uint8 ``(H, W, C)`` view (before normalisation) from its ``draw`` row: the pixels timm's
        ``RandomErasing`` writes in normalised space, in pixel space: ``rint(255 * (mean + std * z))`` clipped to
        [0, 255], ``z`` normal per pixel and channel (``pixel``) or per channel (``rand``), drawn as grey levels by
        ``ErasingNoise`` from the row's noise seed (integers only: the same bits in any process on any machine);
        ``const``: the mean colour; ``black``: 0, torchvision's ``RandomErasing(value=0)`` before ``Normalize``.
        Boxes drawn at another size are scaled by ``scale`` (this view's side over the drawn side)."""
        row = np.asarray(params, dtype=np.float64)
        boxes = row[1:].reshape(-1, 4)
        if not (boxes[:, 2] > 0).any():
            return view
        out = np.array(view, copy=True)
        noise = ErasingNoise(int(row[0]))
        chans = out.shape[2]
        for box in boxes:
            if box[2] <= 0:
                continue
            top, left, h, w = (int(np.rint(v * scale)) for v in box)
            h, w = max(1, min(h, out.shape[0] - top)), max(1, min(w, out.shape[1] - left))
            if self.mode == "black":
                out[top : top + h, left : left + w] = 0
                continue
            if self.mode == "const":
                mu = np.asarray(mean, dtype=np.float32)[:chans] * 255.0
                out[top : top + h, left : left + w] = np.clip(np.rint(mu), 0, 255).astype(np.uint8)
                continue
            shape = (chans, h, w) if self.mode == "pixel" else (chans, 1, 1)
            out[top : top + h, left : left + w] = noise.grey(shape, mean[:chans], std[:chans]).transpose(1, 2, 0)
        return out


TV_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
          "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")  # torchvision's RandAugment, in its order


@dataclass(frozen=True)
class TorchvisionRandAugmentPolicy:
    """torchvision's ``RandAugment(num_ops, magnitude, num_magnitude_bins)`` (what apple/ml-dr's ``randaug``
    configuration runs, behind its own coin ``p``), drawn from given uniforms like ``RandAugmentPolicy``: per layer
    an op of ``TV_OPS`` uniformly, its sign by a coin for the signed ops, the magnitude fixed at bin ``magnitude``;
    applied with torchvision's own ``_apply_op`` (nearest filter, fill 0, as ml-dr). Policy strings
    ``tv-n2-m9-b31-p1``."""

    config: str
    num_layers: int = 2
    magnitude: int = 9
    bins: int = 31
    prob: float = 1.0  # ml-dr's coin for the whole policy (torchvision's RandAugment has none)
    ops: tuple[str, ...] = TV_OPS

    @classmethod
    def parse(cls, config: str) -> TorchvisionRandAugmentPolicy:
        parts = config.split("-")
        if parts[0] != "tv":
            raise UsageError(f"torchvision RandAugment policy {config!r} must start with 'tv' (e.g. tv-n2-m9-b31-p1)")
        values: dict[str, Any] = {}
        names = {"n": "num_layers", "m": "magnitude", "b": "bins", "p": "prob"}
        for part in parts[1:]:
            key, value = part[:1], part[1:]
            if key not in names:
                raise UsageError(f"unknown section {part!r} in policy {config!r}: expected n, m, b or p")
            try:
                values[names[key]] = float(value) if key == "p" else int(value)
            except ValueError:
                raise UsageError(f"bad number in section {part!r} of policy {config!r}") from None
        policy = cls(config, **values)
        if not 0 <= policy.magnitude < policy.bins:
            raise UsageError(f"policy {config!r}: expected 0 <= m < b")
        return policy

    def draw(self, u: np.ndarray) -> np.ndarray:
        """``(V, num_layers, 4)``: op index (-1 where the policy's coin skips the view), the magnitude bin, the
        sign, 0 (the filter: nearest, fixed). Uniforms as ``RandAugmentPolicy.draw`` takes them (the first
        layer's ``apply`` draw is the policy's coin)."""
        views, layers = len(u), self.num_layers
        u = np.asarray(u, dtype=np.float64).reshape(views, layers, DRAWS_PER_LAYER)
        out = np.zeros((views, layers, PARAMS_PER_LAYER), dtype=np.float32)
        op = np.minimum((u[..., 0] * len(self.ops)).astype(np.int64), len(self.ops) - 1)
        applied = np.broadcast_to((u[:, 0, 1] <= self.prob)[:, None], (views, layers))
        out[..., 0] = np.where(applied, op, -1)
        out[..., 1] = self.magnitude
        out[..., 2] = np.where(u[..., 4] < 0.5, 1.0, -1.0)
        return out

    def apply(self, img: Any, params: np.ndarray) -> Any:
        from torchvision.transforms import InterpolationMode, RandAugment
        from torchvision.transforms.autoaugment import _apply_op

        space = RandAugment._augmentation_space(None, self.bins, (img.height, img.width))  # type: ignore[arg-type]
        for op, _magnitude, sign, _ in np.asarray(params, dtype=np.float64).reshape(-1, PARAMS_PER_LAYER):
            if op < 0:
                continue
            name = self.ops[int(op)]
            magnitudes, signed = space[name]
            m = float(magnitudes[self.magnitude].item()) if magnitudes.ndim > 0 else 0.0
            img = _apply_op(img, name, m * (sign if signed else 1.0), interpolation=InterpolationMode.NEAREST,
                            fill=None)
        return img


JITTER_DRAWS = 8  # four for the order (a random permutation: the argsort of four uniforms), one per factor
JITTER_PARAMS = 5  # stored: the order (a code, order[0] + 4 order[1] + 16 order[2] + 64 order[3]) and the factors


@dataclass(frozen=True)
class ColorJitterPolicy:
    """torchvision's ``ColorJitter(brightness, contrast, saturation, hue)`` as timm's ``color_jitter`` makes it (a
    float: the first three alike; 3 or 4 values), drawn from given uniforms: the factors (brightness, contrast,
    saturation uniform on ``[max(0, 1 - v), 1 + v]``, hue on ``[-v, v]``) and the order of the four, applied in
    that order with torchvision's functional ops on the PIL image."""

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0

    @classmethod
    def of(cls, jitter: float | Sequence[float]) -> ColorJitterPolicy:
        values = (float(jitter),) * 3 if isinstance(jitter, int | float) else tuple(float(v) for v in jitter)
        if len(values) not in (3, 4) or min(values) < 0 or (len(values) == 4 and values[3] > 0.5):
            raise UsageError(f"color jitter {jitter!r}: expected a float or 3 or 4 values >= 0 (hue <= 0.5)")
        return cls(*values)

    def draw(self, u: np.ndarray) -> np.ndarray:
        """``(V, 5)`` float32: the order code, then brightness, contrast, saturation and hue factors (1, 1, 1, 0
        for those not jittered), on a grid of 1/2048."""
        u = np.asarray(u, dtype=np.float64)
        out = np.zeros((len(u), JITTER_PARAMS), dtype=np.float32)
        order = np.argsort(u[:, :4], axis=1)
        out[:, 0] = order @ np.array([1, 4, 16, 64])
        ranges = [(max(0.0, 1 - v), 1 + v) for v in (self.brightness, self.contrast, self.saturation)]
        for i, (lo, hi) in enumerate([*ranges, (-self.hue, self.hue)]):
            lo_q, hi_q = round(lo * 2048), round(hi * 2048)  # the range's ends on the grid
            out[:, 1 + i] = (lo_q + np.floor((hi_q - lo_q) * u[:, 4 + i])) / 2048
        return out

    def apply(self, img: Any, params: np.ndarray) -> Any:
        import torchvision.transforms.functional as TF

        code, *factors = (float(v) for v in params)
        order = [(int(code) >> (2 * i)) & 3 for i in range(4)]
        given = (self.brightness, self.contrast, self.saturation, self.hue)
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for i in order:
            if given[i] > 0:
                img = ops[i](img, factors[i])
        return img


MAGNITUDE_GRID = 128.0  # stored RandAugment magnitudes are multiples of 1/128 (exact in float32, compressible)


@dataclass(frozen=True)
class ViewPhotometric:
    """The photometric ops of one view recipe, in timm's order: RandAugment or else colour jitter on the uint8 view,
    then random erasing. ``columns()`` names a view's stored parameters, ``draw`` makes them from the view's
    uniforms, ``apply`` rebuilds the view's pixels from them."""

    randaugment: RandAugmentPolicy | TorchvisionRandAugmentPolicy | None
    jitter: ColorJitterPolicy | None
    erasing: RandomErasingPolicy | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def columns(self) -> tuple[str, ...]:
        out: list[str] = []
        if self.randaugment is not None:
            out += [f"ra{i}_{c}" for i in range(self.randaugment.num_layers) for c in ("op", "mag", "sign", "filter")]
        if self.jitter is not None:
            out += ["cj_order", "cj_brightness", "cj_contrast", "cj_saturation", "cj_hue"]
        if self.erasing is not None:
            out += ["re_seed"] + [f"re{j}_{c}" for j in range(self.erasing.max_count)
                                  for c in ("top", "left", "h", "w")]
        return tuple(out)

    @property
    def draws(self) -> int:
        n = self.randaugment.num_layers * DRAWS_PER_LAYER if self.randaugment is not None else 0
        n += JITTER_DRAWS if self.jitter is not None else 0
        return n + (self.erasing.draws if self.erasing is not None else 0)

    def draw(self, u: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """``(V, len(columns()))`` float32 from ``(V, draws)`` uniforms; erasing boxes in pixels of ``size``
        (the recipe's output height, width). An erasing seed is kept only where a box is erased (0 elsewhere)."""
        u = np.asarray(u, dtype=np.float64)
        parts, at = [], 0
        if self.randaugment is not None:
            n = self.randaugment.num_layers * DRAWS_PER_LAYER
            ra = self.randaugment.draw(u[:, at : at + n])
            ra[..., 1] = np.round(ra[..., 1] * MAGNITUDE_GRID) / MAGNITUDE_GRID
            ra[..., 1:3] *= (ra[..., 0:1] >= 0)  # a skipped layer keeps only its -1 (what compresses)
            parts.append(ra.reshape(len(u), -1))
            at += n
        if self.jitter is not None:
            parts.append(self.jitter.draw(u[:, at : at + JITTER_DRAWS]))
            at += JITTER_DRAWS
        if self.erasing is not None:
            er = self.erasing.draw(u[:, at : at + self.erasing.draws], *size)
            er[:, 0] *= (er[:, 3::4] > 0).any(axis=1)
            parts.append(er)
        return np.concatenate(parts, axis=1) if parts else np.zeros((len(u), 0), dtype=np.float32)

    def apply(self, img: Any, row: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """A PIL view (the crop, resized and flipped) and its stored columns -> uint8 ``(H, W, C)``; ``scale`` is
        this view's side over the side its erasing boxes were drawn at."""
        at = 0
        if self.randaugment is not None:
            n = self.randaugment.num_layers * PARAMS_PER_LAYER
            img = self.randaugment.apply(img, row[at : at + n])
            at += n
        if self.jitter is not None:
            img = self.jitter.apply(img, row[at : at + JITTER_PARAMS])
            at += JITTER_PARAMS
        view = np.asarray(img)
        if view.ndim == 2:
            view = view[:, :, None]
        if self.erasing is not None:
            view = self.erasing.apply_uint8(view, row[at:], self.mean, self.std, scale)
        return view
