"""The noise random erasing fills its boxes with: the same grey levels in any process, on any machine.

timm fills an erased box of the normalised view with ``torch.randn`` (``pixel``: one normal value per pixel and
channel; ``rand``: one per channel). Here boxes are erased in the uint8 view, before it is normalised, with timm's
value in pixel space, ``rint(255 * (mean + std * z))`` clipped to [0, 255]. ``torch.randn`` is no source for that:
its bits depend on the CPU's instruction set (its AVX2 and scalar Box-Muller round differently), and a value near a
half grey level then rounds both ways, so a teacher on one machine and a student on another would see other pixels.

So a grey level is drawn without floating point: each is one 64-bit integer of a Philox stream (numpy's
``Philox``, the counter-based generator that draws the view parameters; its raw output is specified bit for bit),
keyed by the view's stored noise seed, looked up in a table of 255 thresholds per channel. Threshold ``v`` is
``floor(2^64 * Phi((v + 0.5 - 255 mean) / (255 std)))``, the probability that timm's rounded value is at most
``v``, so a grey level's probability is timm's to within 2^-64. The thresholds are computed by mpmath (integer
arithmetic at 40 digits, no platform ``libm``), once a process: the table, and every grey level, are the same
everywhere.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

import numpy as np

NOISE_KEY = int.from_bytes(hashlib.sha256(b"stillroom/random-erasing-noise").digest()[:8], "little")
_DIGITS = 40


@functools.lru_cache(maxsize=64)
def grey_thresholds(mean: float, std: float) -> np.ndarray:
    """``(255,)`` uint64: threshold ``v`` is ``floor(2^64 * P(rint(255 (mean + std z)) <= v))``, z ~ N(0, 1)."""
    import mpmath

    ctx = mpmath.MPContext()
    ctx.dps = _DIGITS
    centre, spread = 255 * ctx.mpf(float(mean)), 255 * ctx.mpf(float(std))
    top = (1 << 64) - 1
    out = [min(top, int(ctx.floor(ctx.ncdf((v + ctx.mpf(0.5) - centre) / spread) * (1 << 64)))) for v in range(255)]
    return np.array(out, dtype=np.uint64)


class ErasingNoise:
    """The grey levels of one view's erased boxes, drawn in order from the Philox stream of its noise ``seed``."""

    def __init__(self, seed: int):
        self._bits = np.random.Philox(key=np.array([int(seed), NOISE_KEY], dtype=np.uint64))

    def grey(self, shape: tuple[int, int, int], mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
        """uint8 ``(C, h, w)``: per channel ``c``, timm's normal noise of that channel's ``mean[c]`` and
        ``std[c]`` (fractions of 255) as grey levels; ``(C, 1, 1)`` is one colour (timm's ``rand``)."""
        raw = self._bits.random_raw(int(np.prod(shape))).reshape(shape)
        out = np.empty(shape, dtype=np.uint8)
        for c in range(shape[0]):
            out[c] = np.searchsorted(grey_thresholds(float(mean[c]), float(std[c])), raw[c], side="right")
        return out
