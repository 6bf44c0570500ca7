"""Store formats 3 and 4: how a teacher's top-k is held on disk, and the arrays it reads back as.

A reader rebuilds the tempered teacher from the top-k's logits *relative to each other* and from the tail's mass
(``soft_targets_from_topk``); their absolute level never enters a soft target. So both formats keep, per row, the
gaps ``d_i = t_1 - t_i`` of the classes 2 .. k to the top-1, the tail's log-probability and the logits' level:

Format 4 (written today):

- ``lse`` (float16): the log-sum-exp over all classes, the logits' level; as exact as format 2's float16 logits
  were, and no soft target depends on it;
- ``tail_lp`` (float16): ``tail_lse - lse``, the log of the probability outside the top-k (``-inf`` when k = C);
  float16's 11 bits of a log are a relative error of about 1e-3 in the tail's mass;
- ``topk_gap`` (float16): ``d = d_k``, the k-th class's gap (clipped to ``MAX_GAP`` nats: a class ``e^-24``
  below the top-1 is no probability a student sees), to 0.05 %;
- ``topk_q1`` (uint16): the second class's gap as ``round(65535 sqrt(d_2 / d))``;
- ``topk_q`` (uint8, k - 3 columns): the gaps of the classes 3 .. k-1, each as ``round(255 sqrt(d_i / d))``.
  The square root spends the codes where the probability is: a class's error in probability is about
  ``p_i * |error of d_i|``, and in sqrt space ``|error of d_i|`` grows like ``sqrt(d_i)`` while ``p_i`` falls like
  ``e^-d_i``. The second class, the likeliest after the top-1, gets 16 bits: on a trained teacher its 8-bit code
  and format 3's 8-bit scale were what moved the targets most (README, "The label store": at most 0.002 in total
  variation from format 2's at T = 1 and T = 4, measured by ``bench/store_tv.py``).

Format 3 (read, no longer written) held ``lse`` in float32, the k-th gap as ``topk_scale`` (uint8, steps of 1/24
of an octave from ``MAX_GAP`` down) and every class 2 .. k-1 in ``topk_q`` at 8 bits.

The top-1's logit is not stored: the top-k and the tail sum to one, so
``t_1 - lse = log(1 - e^tail_lp) - log(1 + sum_i e^-d_i)``. ``hard`` (the argmax) is ``topk_idx[:, 0]``.
Decoding gives the arrays format 2 stored (``topk_logit`` in float32), so nothing downstream changes.
"""

from __future__ import annotations

import re

import numpy as np

MAX_GAP = 24.0  # nats below the top-1 past which a logit is clipped (e^-24 ~ 4e-11 of the top-1's probability)
LEVELS = 255  # codes of topk_q
LEVELS_Q1 = 65535  # codes of topk_q1 (format 4)
SCALE_STEPS = 24  # format 3: codes of topk_scale an octave
MIN_GAP = MAX_GAP * 2.0 ** (-LEVELS / SCALE_STEPS)  # format 3: about 0.015 nats, the smallest gap topk_scale holds


def _scale_code(gap: np.ndarray) -> np.ndarray:
    return np.rint(SCALE_STEPS * np.log2(MAX_GAP / np.clip(gap, MIN_GAP, MAX_GAP))).astype(np.uint8)


def _scale(code: np.ndarray) -> np.ndarray:
    return MAX_GAP * 2.0 ** (-np.asarray(code, dtype=np.float64) / SCALE_STEPS)


def _codes(gaps: np.ndarray, scale: np.ndarray, levels: int, dtype: type) -> np.ndarray:
    """``round(levels sqrt(gaps / scale))``: ``scale`` is what the decoder reads (0 when the top-k are equal)."""
    ratio = np.divide(gaps, scale[:, None], out=np.zeros_like(gaps), where=scale[:, None] > 0)
    return np.rint(levels * np.sqrt(np.clip(ratio, 0.0, 1.0))).astype(dtype)


def _gaps(codes: np.ndarray, levels: int, scale: np.ndarray) -> np.ndarray:
    """The gaps ``_codes`` coded: ``(codes / levels)^2 scale``."""
    return (np.asarray(codes, dtype=np.float64) / levels) ** 2 * scale


def encode_topk(topk_logit: np.ndarray, lse: np.ndarray, tail_lse: np.ndarray, prefix: str = "", version: int = 4
                ) -> dict[str, np.ndarray]:
    """The stored arrays of a block of rows in format ``version`` (``prefix``: an ensemble member's, e.g.
    ``teacher0_``)."""
    logit = np.asarray(topk_logit, dtype=np.float64)
    lse64 = np.asarray(lse, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # -inf - x for k = C
        tail_lp = np.asarray(tail_lse, dtype=np.float64) - lse64
    out: dict[str, np.ndarray] = {f"{prefix}lse": lse64.astype(np.float16 if version >= 4 else np.float32),
                                  f"{prefix}tail_lp": tail_lp.astype(np.float16)}
    k = logit.shape[1]
    if k < 2:
        return out
    gaps = np.clip(logit[:, :1] - logit[:, 1:], 0.0, MAX_GAP)
    if version >= 4:
        out[f"{prefix}topk_gap"] = gaps[:, -1].astype(np.float16)
        scale = out[f"{prefix}topk_gap"].astype(np.float64)  # relative to the gap the decoder reads
        if k >= 3:
            out[f"{prefix}topk_q1"] = _codes(gaps[:, :1], scale, LEVELS_Q1, np.uint16)[:, 0]
        if k >= 4:
            out[f"{prefix}topk_q"] = _codes(gaps[:, 1:-1], scale, LEVELS, np.uint8)
    else:
        out[f"{prefix}topk_scale"] = _scale_code(gaps[:, -1])
        if k >= 3:
            out[f"{prefix}topk_q"] = _codes(gaps[:, :-1], _scale(out[f"{prefix}topk_scale"]), LEVELS, np.uint8)
    return out


def decode_topk(stored: dict[str, np.ndarray], k: int, prefix: str = "", version: int = 4) -> dict[str, np.ndarray]:
    """``topk_logit`` (float32), ``lse`` and ``tail_lse`` (float32) of ``encode_topk``'s arrays."""
    lse = np.asarray(stored[f"{prefix}lse"], dtype=np.float64)
    tail_lp = np.asarray(stored[f"{prefix}tail_lp"], dtype=np.float64)
    gaps = np.zeros((len(lse), k))
    if k >= 2:
        if version >= 4:
            scale = np.asarray(stored[f"{prefix}topk_gap"], dtype=np.float64)
            if k >= 3:
                gaps[:, 1] = _gaps(stored[f"{prefix}topk_q1"], LEVELS_Q1, scale)
            if k >= 4:
                gaps[:, 2:-1] = _gaps(stored[f"{prefix}topk_q"], LEVELS, scale[:, None])
        else:
            scale = _scale(stored[f"{prefix}topk_scale"])
            if k >= 3:
                gaps[:, 1:-1] = _gaps(stored[f"{prefix}topk_q"], LEVELS, scale[:, None])
        gaps[:, -1] = scale
    with np.errstate(divide="ignore"):  # a tail of mass 1 in float16 leaves the top-k none: logits -inf
        top_lp = np.log1p(-np.exp(tail_lp)) - np.log(np.exp(-gaps).sum(1))
    logit = (lse + top_lp)[:, None] - gaps
    return {f"{prefix}topk_logit": logit.astype(np.float32), f"{prefix}lse": lse.astype(np.float32),
            f"{prefix}tail_lse": (lse + tail_lp).astype(np.float32)}


def topk_columns(k: int, prefix: str = "", version: int = 4) -> dict[str, tuple[tuple[int, ...], str]]:
    """The stored arrays of ``encode_topk`` at top-k ``k`` in format ``version``: name -> (shape of a row, dtype)."""
    out: dict[str, tuple[tuple[int, ...], str]] = {f"{prefix}lse": ((), "float16" if version >= 4 else "float32"),
                                                   f"{prefix}tail_lp": ((), "float16")}
    if version >= 4:
        if k >= 2:
            out[f"{prefix}topk_gap"] = ((), "float16")
        if k >= 3:
            out[f"{prefix}topk_q1"] = ((), "uint16")
        if k >= 4:
            out[f"{prefix}topk_q"] = ((k - 3,), "uint8")
        return out
    if k >= 2:
        out[f"{prefix}topk_scale"] = ((), "uint8")
    if k >= 3:
        out[f"{prefix}topk_q"] = ((k - 2,), "uint8")
    return out


def _member(name: str) -> tuple[str, str] | None:
    """``(prefix, field)`` of a decoded top-k array's name (``teacher0_lse`` -> ``("teacher0_", "lse")``)."""
    match = re.fullmatch(r"(teacher\d+_)?(topk_logit|tail_lse|lse)", name)
    return (match.group(1) or "", match.group(2)) if match else None


def stored_names(names: list[str], k: int, version: int = 4) -> list[str]:
    """The stored arrays that decoding ``names`` (what a seed reads as) takes, in order, each once."""
    out: dict[str, None] = {}
    for name in names:
        member = _member(name)
        if name == "hard":
            out["topk_idx"] = None
        elif member is not None:
            out.update(dict.fromkeys(topk_columns(k, member[0], version)))
        else:
            out[name] = None
    return list(out)


def encode_rows(arrays: dict[str, np.ndarray], k: int, keep: set[str], version: int = 4) -> dict[str, np.ndarray]:
    """Format ``version``'s stored arrays of a block of rows given as format 2's: each top-k (the ensemble's, each
    member's) encoded, ``hard`` dropped, every other array kept if its name is in ``keep``."""
    out = {}
    prefixes = {m[0] for m in map(_member, arrays) if m is not None}
    for prefix in sorted(prefixes):
        out.update(encode_topk(arrays[f"{prefix}topk_logit"], arrays[f"{prefix}lse"], arrays[f"{prefix}tail_lse"],
                               prefix, version))
    out.update({name: a for name, a in arrays.items() if name in keep and _member(name) is None})
    return out


def decode_rows(stored: dict[str, np.ndarray], names: list[str], k: int, version: int = 4
                ) -> dict[str, np.ndarray]:
    """The arrays ``names`` (format 2's names: ``hard``, ``topk_logit`` ...) from format ``version``'s stored ones."""
    out, decoded = {}, {}
    for name in names:
        member = _member(name)
        if name == "hard":
            out[name] = np.ascontiguousarray(stored["topk_idx"][:, 0])
        elif member is not None:
            if member[0] not in decoded:
                decoded[member[0]] = decode_topk(stored, k, member[0], version)
            out[name] = decoded[member[0]][name]
        else:
            out[name] = stored[name]
    return out
