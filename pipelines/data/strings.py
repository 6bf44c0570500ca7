"""Many strings packed into one uint8 buffer and an offsets array: the paths of a million samples as two numpy
arrays instead of a million Python objects (cheap to cache, to pickle to a worker and to hash).
"""

from __future__ import annotations

import numpy as np


def pack_strings(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (utf-8 bytes as uint8, offsets (n + 1,) int64): one buffer instead of n Python objects."""
    encoded = [s.encode() for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def unpack_string(blob: np.ndarray, offsets: np.ndarray, i: int) -> str:
    return blob[offsets[i] : offsets[i + 1]].tobytes().decode()


def take_strings(blob: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The packed strings of ``rows`` (in that order), packed again, without making Python strings."""
    lengths = offsets[rows + 1] - offsets[rows]
    new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    starts = np.repeat(offsets[rows] - new_offsets[:-1], lengths)
    return blob[starts + np.arange(int(new_offsets[-1]))], new_offsets
