"""The benches are type-checked as the package is: mypy's configured files hold bench/ (bench/data.py alone had 9
errors, bench/ 48). `make lint` runs that mypy; the suite does not run it a second time."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_mypy_checks_the_benches():
    files = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
    assert "bench" in files and "stillroom" in files

