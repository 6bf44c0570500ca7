"""RandAugment drawn from given uniforms and applied from stored parameters matches timm's own ``RandAugment``:
the same op frequencies, layers applied and magnitude histogram over 100,000 draws (within sampling error),
and each op's image within 1 grey level of timm's op at the same magnitude, sign and filter."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from stillroom.pipelines.core import UsageError
from stillroom.pipelines.views import (
    DRAWS_PER_LAYER,
    RAND_3A,
    RAND_INCREASING_TRANSFORMS,
    RAND_TRANSFORMS,
    RandAugmentPolicy,
    apply_op,
    level_args,
)

timm_aa = pytest.importorskip("timm.data.auto_augment")
DRAWS = 100_000
HPARAMS = {"translate_const": 100, "img_mean": (124, 116, 104)}  # create_transform's for 224 px and ImageNet


def _timm_draws(policy: str, n: int) -> tuple[list[list[tuple[str, float]]], list[str]]:
    """Per call of timm's RandAugment, the (op, magnitude) of each layer that applied: its ops record instead
    of transforming (the magnitude is what timm hands its level function)."""
    ra = timm_aa.rand_augment_transform(policy, dict(HPARAMS))
    calls: list[list[tuple[str, float]]] = []
    for op in ra.ops:
        op.level_fn = lambda m, _h, name=op.name: calls[-1].append((name, m)) or ()
        op.aug_fn = lambda img, *a, **k: img
    random.seed(0)
    np.random.seed(0)
    for _ in range(n):
        calls.append([])
        ra(None)
    return calls, [op.name for op in ra.ops]


def _same_distribution(a: np.ndarray, b: np.ndarray) -> bool:
    """Two samples of one distribution by the two-sample Kolmogorov-Smirnov statistic: sqrt(nm / (n + m)) D below
    2.5 (false alarm about 1e-5; ties make it rarer). At 25,000 erased boxes it tells an erased area of at most
    0.345 of the image from timm's 1/3 (statistic 3.9; 1.2 for the same distribution)."""
    values = np.union1d(a, b)
    fa = np.searchsorted(np.sort(a), values, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), values, side="right") / len(b)
    return bool(np.abs(fa - fb).max() * np.sqrt(len(a) * len(b) / (len(a) + len(b))) < 2.5)


def _counts_agree(a: np.ndarray, b: np.ndarray) -> bool:
    """Two count vectors of the same number of draws agree within sampling error (5 sigma, Poisson)."""
    return bool(np.all(np.abs(a - b) <= 5 * np.sqrt(a + b) + 1))


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "rand-m7-n3-mstd1-tweights", "rand-m10-mstd101"])
def test_draws_match_timms_randaugment(policy):
    calls, names = _timm_draws(policy, DRAWS)
    ours = RandAugmentPolicy.parse(policy, translate_const=100, fill=(124, 116, 104))
    assert list(ours.ops) == names
    params = ours.draw(np.random.default_rng(1).random((DRAWS, ours.num_layers * DRAWS_PER_LAYER)))
    applied = params[..., 0] >= 0
    # how many layers apply per view
    assert _counts_agree(np.bincount([len(c) for c in calls], minlength=ours.num_layers + 1),
                         np.bincount(applied.sum(axis=1), minlength=ours.num_layers + 1))
    # how often each op applies
    theirs_ops = np.bincount([names.index(name) for c in calls for name, _ in c], minlength=len(names))
    assert _counts_agree(theirs_ops, np.bincount(params[..., 0][applied].astype(int), minlength=len(names)))
    # the magnitude histogram (0.5 wide bins over [0, 10]) and its point masses at the clamps
    bins = np.linspace(0, 10, 21)
    theirs_m = np.array([m for c in calls for _, m in c])
    ours_m = params[..., 1][applied]
    assert _counts_agree(np.histogram(theirs_m, bins)[0], np.histogram(ours_m, bins)[0])
    assert _same_distribution(theirs_m, ours_m)
    for edge in (0.0, 10.0):
        assert _counts_agree(np.array([(theirs_m == edge).sum()]), np.array([(ours_m == edge).sum()]))
    # no layer of one view twice in a weighted set (numpy's choice without replacement), as timm
    if ours.weights is not None:
        ops = params[..., 0]
        assert not any(len(set(row[row >= 0])) < (row >= 0).sum() for row in ops[:2000])
    # the signs timm draws at random: half each
    signs = params[..., 2][applied]
    assert abs((signs > 0).mean() - 0.5) < 5 * np.sqrt(0.25 / len(signs))


def _picture(h: int = 40, w: int = 56) -> Image.Image:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 4, yy * 5, (xx + yy) * 2], axis=-1) % 256
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))


def _timm_args(name: str, magnitude: float, sign: float) -> tuple:
    """timm's level arguments with its coin fixed: ``random() > 0.5`` negates."""
    fn = timm_aa.LEVEL_TO_ARG[name]
    if fn is None:
        return ()
    state = random.random
    random.random = (lambda: 0.9) if sign < 0 else (lambda: 0.1)
    try:
        return fn(magnitude, dict(HPARAMS))
    finally:
        random.random = state


@pytest.mark.parametrize("name", sorted(set(RAND_TRANSFORMS) | set(RAND_INCREASING_TRANSFORMS) | set(RAND_3A)))
def test_each_op_image_matches_timms_op(name):
    img = _picture()
    for magnitude in (0.0, 3.7, 9.0, 10.0):
        for sign in (1.0, -1.0):
            for resample in (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC):
                theirs_args = _timm_args(name, magnitude, sign)
                ours_args = level_args(name, magnitude, sign, HPARAMS)
                assert np.allclose(ours_args, theirs_args), (name, magnitude, sign)
                try:
                    theirs = timm_aa.NAME_TO_OP[name](img, *theirs_args, fillcolor=HPARAMS["img_mean"],
                                                      resample=resample)
                except ValueError:  # Posterize to 0 bits: this Pillow refuses it; older ones gave black
                    assert name.startswith("Posterize") and theirs_args == (0,)
                    theirs = Image.new("RGB", img.size)
                ours = apply_op(img, name, ours_args, HPARAMS["img_mean"], resample)
                diff = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(theirs, dtype=np.int16))
                assert diff.max() <= 1, (name, magnitude, sign, resample, int(diff.max()))


def test_a_view_is_rebuilt_from_its_parameters():
    """The layers applied from stored parameters are the ops, in order: the same image from any process."""
    policy = RandAugmentPolicy.parse("rand-m9-mstd0.5-inc1", translate_const=25, interpolation=None)
    params = policy.draw(np.random.default_rng(0).random((50, 2 * DRAWS_PER_LAYER)))
    img = _picture()
    hparams = {"translate_const": 25}
    for row in params:
        expected = img
        for op, m, s, f in row:
            if op >= 0:
                name = policy.ops[int(op)]
                filt = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)[int(f)]
                expected = apply_op(expected, name, level_args(name, float(m), float(s), hparams), policy.fill, filt)
        assert np.array_equal(np.asarray(policy.apply(img, row)), np.asarray(expected))
    assert params.dtype == np.float32 and params.shape == (50, 2, 4)


@pytest.mark.parametrize(("config", "message"), [
    ("augmix-m5", "must start with 'rand'"), ("rand-x5", "unknown section 'x5'"),
    ("rand-n20-tweights", "n is more than"),
])
def test_bad_policies(config, message):
    with pytest.raises(UsageError, match=message):
        RandAugmentPolicy.parse(config)


class _Recorder:
    """Stands for timm's image tensor: records each box ``_erase`` writes instead of writing it."""

    def __init__(self) -> None:
        self.boxes: list[tuple[int, int, int, int]] = []

    def __setitem__(self, key, _value) -> None:
        _, ys, xs = key
        self.boxes.append((ys.start, xs.start, ys.stop - ys.start, xs.stop - xs.start))


@pytest.mark.slow
@pytest.mark.parametrize(("count", "mode"), [(1, "pixel"), (3, "rand")])
def test_erasing_draws_match_timms_random_erasing(count, mode, monkeypatch):
    from timm.data import random_erasing

    from stillroom.pipelines.views import RandomErasingPolicy

    monkeypatch.setattr(random_erasing, "_get_pixels", lambda *a, **k: None)
    theirs = random_erasing.RandomErasing(probability=0.25, mode=mode, max_count=count, device="cpu")
    random.seed(0)
    per_view = []
    for _ in range(DRAWS):
        rec = _Recorder()
        theirs._erase(rec, 3, 224, 224, None)
        per_view.append(rec.boxes)
    ours = RandomErasingPolicy(probability=0.25, mode=mode, max_count=count)
    params = ours.draw(np.random.default_rng(2).random((DRAWS, ours.draws)), 224, 224)
    boxes = params[:, 1:].reshape(DRAWS, count, 4)
    real = boxes[..., 2] > 0
    assert _counts_agree(np.bincount([len(b) for b in per_view], minlength=count + 1),
                         np.bincount(real.sum(axis=1), minlength=count + 1))
    theirs_boxes = np.array([box for b in per_view for box in b])
    ours_boxes = boxes[real]
    for column in range(4):  # top, left, h, w: histograms of 16 bins over the image
        bins = np.linspace(0, 224, 17)
        assert _counts_agree(np.histogram(theirs_boxes[:, column], bins)[0],
                             np.histogram(ours_boxes[:, column], bins)[0]), column
    assert _same_distribution(theirs_boxes[:, 2] * theirs_boxes[:, 3], ours_boxes[:, 2] * ours_boxes[:, 3])  # area
    assert _same_distribution(theirs_boxes[:, 2], ours_boxes[:, 2]) and _same_distribution(theirs_boxes[:, 3],
                                                                                          ours_boxes[:, 3])
    assert np.all(ours_boxes[:, 0] + ours_boxes[:, 2] <= 224) and np.all(ours_boxes[:, 1] + ours_boxes[:, 3] <= 224)


def test_erasing_is_rebuilt_from_its_parameters():
    from stillroom.pipelines.views import RandomErasingPolicy

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for mode in ("const", "rand", "pixel", "black"):
        policy = RandomErasingPolicy(probability=1.0, mode=mode, max_count=2, min_count=2)
        row = policy.draw(np.random.default_rng(5).random((1, policy.draws)), 32, 48)[0]
        view = np.full((32, 48, 3), 7, dtype=np.uint8)
        a, b = policy.apply_uint8(view, row, mean, std), policy.apply_uint8(view, row, mean, std)
        assert np.array_equal(a, b)  # the same noise from the stored seed
        inside = np.zeros((32, 48), dtype=bool)
        for top, left, h, w in row[1:].reshape(-1, 4).astype(int):
            assert h > 0
            inside[top : top + h, left : left + w] = True
        assert np.all(a[~inside] == 7) and np.all(view == 7)  # nothing outside the boxes changes, nor the input
        if mode == "const":
            assert np.array_equal(np.unique(a[inside], axis=0), [[124, 116, 104]])  # the mean colour
        elif mode == "black":
            assert np.all(a[inside] == 0)
        else:  # rand: one colour a box (two boxes, maybe overlapping); pixel: a grey level a pixel and channel
            colours = len(np.unique(a[inside], axis=0))
            assert colours <= 2 if mode == "rand" else colours > inside.sum() // 2
    with pytest.raises(UsageError, match="random erasing mode 'blur'"):
        RandomErasingPolicy(mode="blur")
