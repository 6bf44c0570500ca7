"""The benches are type-checked as the package is: mypy's configured files hold bench/, and mypy, run with the
project's configuration on every bench script, finds nothing (bench/data.py alone had 9 errors, bench/ 48)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_mypy_checks_the_benches():
    files = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
    assert "bench" in files and "stillroom" in files


@pytest.mark.slow  # mypy over bench/ and what it imports: minutes without its cache (.mypy_cache, as `make lint`)
def test_every_bench_script_type_checks():
    api = pytest.importorskip("mypy.api", reason="mypy is in the dev extra")
    scripts = sorted(str(p) for p in (REPO / "bench").glob("*.py"))
    assert scripts
    out, err, status = api.run(["--config-file", str(REPO / "pyproject.toml"), *scripts])
    assert status == 0, out + err
