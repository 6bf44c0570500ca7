"""RandAugment drawn from given uniforms and applied from stored parameters matches timm's own ``RandAugment``:
the same op frequencies, layers applied and magnitude histogram over 100,000 draws (within sampling error),
and each op's image within 1 grey level of timm's op at the same magnitude, sign and filter."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from pipelines._photometric import (
    DRAWS_PER_LAYER,
    RAND_3A,
    RAND_INCREASING_TRANSFORMS,
    RAND_TRANSFORMS,
    RandAugmentPolicy,
    apply_op,
    level_args,
)
from pipelines.errors import UsageError

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
