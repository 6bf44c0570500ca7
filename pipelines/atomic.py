"""Atomic file writes: the new content goes to a temporary file beside the target, then replaces it in one
``os.replace``, so a reader sees the old file or the new one, never a half-written one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = True) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (``indent=None``: one line)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=sort_keys))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
