"""Atomic file writes: the new content goes to a temporary file beside the target, then replaces it in one
``os.replace``, so a reader sees the old file or the new one, never a half-written one."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a temporary file beside ``path`` (same suffix, for writers that go by it), then
    replace ``path`` with it; the temporary file is removed if ``write`` fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = True) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (``indent=None``: one line)."""
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=indent, sort_keys=sort_keys)))
