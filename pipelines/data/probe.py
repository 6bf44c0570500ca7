"""Probing one sample's encoded bytes: its height and width from the image header (nothing is decoded) and
a blake2b hash of the bytes; many samples at once, in worker processes past ``PARALLEL_FROM`` of them.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from stillroom.pipelines.core import DataError

HASH_BYTES = 16  # blake2b digest of a sample's encoded bytes
FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # what PIL identifies and we decode


PARALLEL_FROM = 2048  # fewer samples than this are indexed in this process


def probe(data: bytes, where: str) -> tuple[int, int, bytes]:
    """``(height, width, hash)`` of one encoded image, from its header and bytes alone (no decoding).

    Raises ``DataError`` naming ``where`` for an empty file, a file PIL does not recognise as an image
    of ``FORMATS``, or a JPEG/PNG that is cut short (no end-of-image marker / IEND chunk at its end).
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise DataError(f"{where}: empty file")
    digest = hashlib.blake2b(data, digest_size=HASH_BYTES).digest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (w, h) = img.format, img.size
    except UnidentifiedImageError:
        raise DataError(f"{where}: not an image (no image format recognised)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{where}: not an image ({str(e).splitlines()[0][:120]})") from None
    if fmt not in FORMATS:
        raise DataError(f"{where}: {fmt} images are not read: expected one of {', '.join(FORMATS)}")
    tail = data[-4096:]
    if fmt in ("JPEG", "MPO") and b"\xff\xd9" not in tail:
        raise DataError(f"{where}: truncated JPEG (no end-of-image marker)")
    if fmt == "PNG" and b"IEND" not in data[-64:]:
        raise DataError(f"{where}: truncated PNG (no IEND chunk)")
    if h < 1 or w < 1:
        raise DataError(f"{where}: image of size {w}x{h}")
    return h, w, digest


def _probe_many(items: Sequence[tuple[bytes | str, str]]) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Probe ``(data or file path, where)`` pairs: ``(hw (n, 2) int32, hashes (n, 16) uint8, errors)``, the
    errors by row (bad rows only)."""
    hw = np.zeros((len(items), 2), dtype=np.int32)
    hashes = np.zeros((len(items), HASH_BYTES), dtype=np.uint8)
    errors: dict[int, str] = {}
    for i, (src, where) in enumerate(items):
        try:
            data = src if isinstance(src, bytes) else Path(src).read_bytes()
            h, w, digest = probe(data, where)
        except DataError as e:
            errors[i] = str(e)
            continue
        except OSError as e:
            errors[i] = f"{where}: cannot read ({e.strerror or e})"
            continue
        hw[i] = (h, w)
        hashes[i] = np.frombuffer(digest, dtype=np.uint8)
    return hw, hashes, errors


def _probe_files(paths: list[str]) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    return _probe_many([(p, p) for p in paths])


def _parallel(fn: Callable[..., Any], tasks: list[tuple], workers: int | None) -> list[Any]:
    """``[fn(*t) for t in tasks]``, on a pool of forked processes when there is enough work.

    Fork (not spawn): the children run only this module's functions, and need not import the caller's
    ``__main__`` again."""
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or len(tasks) <= 1:
        return [fn(*t) for t in tasks]
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx) as pool:
        return list(pool.map(fn, *zip(*tasks, strict=True)))
