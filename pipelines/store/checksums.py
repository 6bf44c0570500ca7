"""Checksums of a store's arrays, chunk by chunk.

Checksums are taken as the chunks are written (``chunk_checksums``): a piece's ``.done`` marker keeps the
sha256 of each of its chunks, and committing a seed only gathers them (it reads no array). An array's
checksum is the sha256 of its chunks' hex digests in order; ``verify`` recomputes them chunk by chunk and
names the chunk that differs.
"""

from __future__ import annotations

import hashlib

import numpy as np


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def chunk_checksums(data: np.ndarray, chunk_rows: int) -> list[str]:
    """The sha256 of each ``chunk_rows``-row chunk of ``data`` (its bytes as stored, C order), in order."""
    return [_sha256(data[s : s + chunk_rows]) for s in range(0, len(data), chunk_rows)]


def combine_checksums(chunks: list[str]) -> str:
    """An array's checksum: the sha256 of its chunks' hex digests, in order."""
    return hashlib.sha256("".join(chunks).encode()).hexdigest()
