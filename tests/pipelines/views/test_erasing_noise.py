"""The erased pixels' noise: grey levels drawn from integers alone (``ErasingNoise``) keep the distribution of timm's
``RandomErasing`` noise (``torch.randn`` in normalised space) once it is put in pixel space and rounded, per pixel
and channel, independent between pixels and channels; and the grey levels are pinned, since every erased view
of every store holds them."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from stillroom.pipelines.views import ErasingNoise, RandomErasingPolicy, grey_thresholds

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's: deit's noise
SIDE = 224


def _timm_grey_levels(values: int) -> np.ndarray:
    """``(3, n)``: the pixels timm's ``RandomErasing(mode="pixel")`` writes in a normalised view, in pixel space
    and rounded as a uint8 view holds them: ``rint(255 * (mean + std * z))`` clipped."""
    from timm.data.random_erasing import RandomErasing

    torch.manual_seed(0)
    erase = RandomErasing(probability=1.0, mode="pixel", device="cpu")
    parts, n = [], 0
    while n < values:
        x = erase(torch.full((3, SIDE, SIDE), float("nan")))
        inside = ~torch.isnan(x[0])
        parts.append(x[:, inside].double().numpy())
        n += int(inside.sum())
    z = np.concatenate(parts, axis=1)
    mean, std = np.array(MEAN)[:, None], np.array(STD)[:, None]
    return np.clip(np.rint(255 * (mean + std * z)), 0, 255)


def _ours(values: int, side: int = 128) -> np.ndarray:
    """``(3, n)`` grey levels of whole boxes of ``side x side``, from consecutive noise seeds."""
    boxes = -(-values // (side * side))
    return np.concatenate([ErasingNoise(s).grey((3, side, side), MEAN, STD).reshape(3, -1) for s in range(boxes)],
                          axis=1).astype(np.float64)


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic scaled by sqrt(nm / (n + m)): under 1.95 for one distribution
    with probability 0.999 (ties, as on grey levels, make it smaller)."""
    values = np.union1d(a, b)
    fa = np.searchsorted(np.sort(a), values, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), values, side="right") / len(b)
    return float(np.abs(fa - fb).max() * math.sqrt(len(a) * len(b) / (len(a) + len(b))))


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


@pytest.mark.slow
def test_grey_levels_have_the_distribution_of_timms_noise():
    """Per channel, 250,000 of our grey levels against 250,000 of timm's: the same distribution (KS), the same mean
    and spread (within 5 standard errors), and each grey level as often as the normal law says (chi-square)."""
    n = 250_000
    ours, theirs = _ours(n)[:, :n], _timm_grey_levels(n)[:, :n]
    for c in range(3):
        assert _ks(ours[c], theirs[c]) < 1.95, c
        se = theirs[c].std() / math.sqrt(n)
        assert abs(ours[c].mean() - theirs[c].mean()) < 5 * math.sqrt(2) * se, c
        assert abs(ours[c].std() - theirs[c].std()) < 5 * math.sqrt(2) * se, c  # the sd's error is ~sd/sqrt(2n)
        centre, spread = 255 * MEAN[c], 255 * STD[c]
        cdf = np.array([_phi((v + 0.5 - centre) / spread) for v in range(255)] + [1.0])
        expected = np.diff(cdf, prepend=0.0) * n
        counts = np.bincount(ours[c].astype(np.int64), minlength=256)
        keep = expected >= 20
        chi2 = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
        dof = int(keep.sum()) - 1
        assert chi2 < dof + 5 * math.sqrt(2 * dof), (c, chi2, dof)  # about 5 sigma of the chi-square law


def test_grey_levels_are_independent_between_pixels_and_channels():
    grey = ErasingNoise(3).grey((3, 200, 200), MEAN, STD).astype(np.float64)
    n = grey[0].size
    pairs = {"right": (grey[:, :, :-1], grey[:, :, 1:]), "below": (grey[:, :-1], grey[:, 1:]),
             "channel": (grey[0:1], grey[1:2])}
    for name, (a, b) in pairs.items():
        r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        assert abs(r) < 5 / math.sqrt(n), name
    assert not np.array_equal(ErasingNoise(3).grey((3, 4, 4), MEAN, STD), ErasingNoise(4).grey((3, 4, 4), MEAN, STD))


def test_thresholds_are_the_normal_laws():
    """mpmath's thresholds agree with the normal law from ``math.erfc`` (a platform's libm: close, not exact)."""
    for mean, std in zip(MEAN + (0.286,), STD + (0.353,), strict=True):
        table = grey_thresholds(mean, std)
        assert table.dtype == np.uint64 and np.all(np.diff(table.astype(np.float64)) >= 0)
        approx = np.array([_phi((v + 0.5 - 255 * mean) / (255 * std)) for v in range(255)])
        assert np.allclose(table.astype(np.float64) / 2.0**64, approx, rtol=1e-9, atol=1e-15)


def test_the_grey_levels_are_pinned():
    """The grey levels of a few seeds and the thresholds, as sha256: every erased view of a store holds them, so a
    change here (numpy's Philox, the table, the order of draws) must come with a new version of the recipes that
    erase with noise (``deit``, ``fmnist-randaug``)."""
    digest = hashlib.sha256()
    for seed in (0, 1, 65535):
        digest.update(ErasingNoise(seed).grey((3, 17, 23), MEAN, STD).tobytes())
    noise = ErasingNoise(9)
    digest.update(noise.grey((3, 5, 5), MEAN, STD).tobytes() + noise.grey((3, 1, 1), MEAN, STD).tobytes())
    digest.update(grey_thresholds(0.286, 0.353).tobytes())
    assert digest.hexdigest()[:16] == PINNED


PINNED = "b1e94bc67dc4414a"


def test_a_policy_erases_with_the_noise_of_its_seed():
    policy = RandomErasingPolicy(probability=1.0, mode="pixel")
    row = policy.draw(np.random.default_rng(11).random((1, policy.draws)), 64, 64)[0]
    out = policy.apply_uint8(np.zeros((64, 64, 3), dtype=np.uint8), row, MEAN, STD)
    top, left, h, w = row[1:5].astype(int)
    box = out[top : top + h, left : left + w].transpose(2, 0, 1)
    assert np.array_equal(box, ErasingNoise(int(row[0])).grey((3, h, w), MEAN, STD))


def test_recipes_that_erase_with_noise_took_a_new_version():
    """Their version 1 stores hold torch.randn's grey levels: another digest (the cache key and the view streams
    hold it), so a reader refuses them (``check_store``: "the recipe changed: relabel"); ml-dr erases with 0 and
    keeps its digest."""
    from stillroom.pipelines.views import get_recipe

    version_1 = {"deit": "83ee9632c37e7e53", "fmnist-randaug": "8ab879ed21f51673"}
    for name, digest in version_1.items():
        recipe = get_recipe(name)
        assert recipe.version == 2 and recipe.digest != digest and "philox" in str(recipe.pixel_ops)
    assert get_recipe("ml-dr").digest == "2c95dbe2b56ebc98" and get_recipe("ml-dr").re_mode == "black"
