"""The labeling and training paths import without the service's stack: a bare GPU machine (torch, timm and
the bench's few wheels, no Ray) runs `stillroom label --no-ray`, the trainer and `bench/gpu.py`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCKED = ("ray", "fastapi", "sqlalchemy", "uvicorn")

# a meta-path finder ahead of every other: importing a blocked module (or one of its submodules) raises
IMPORTS = textwrap.dedent("""
    import importlib, importlib.abc, sys

    BLOCKED = {blocked!r}

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is not on a bare GPU machine")
            return None

    sys.meta_path.insert(0, Refuse())
    for module in {modules!r}:
        importlib.import_module(module)
    from stillroom.services.cli import build_parser
    for command in ("label", "teacher", "train"):  # each imports its command module and lists its options
        build_parser(command)
    print(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
""")

MODULES = ("stillroom", "stillroom.pipelines.labeling", "stillroom.pipelines.teachers", "stillroom.pipelines.store",
           "stillroom.pipelines.training", "stillroom.student.run", "stillroom.student.trainer",
           "stillroom.student.online", "stillroom.student.data", "stillroom.services.cli")


def test_labeling_and_training_import_without_ray_or_the_service():
    code = IMPORTS.format(blocked=BLOCKED, modules=MODULES)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_the_finder_refuses_what_it_blocks():
    """The check above means something: the same finder stops the Ray pool's module."""
    code = IMPORTS.format(blocked=BLOCKED, modules=("stillroom.pipelines.labeling.ray_pool",))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "ray is not on a bare GPU machine" in proc.stderr


def test_a_command_that_needs_no_model_does_not_import_timm():
    """Listing timm's optimizers as --opt's choices imported timm (and torchvision with it) at every command's start,
    3 s of `stillroom recipes` and of every CLI process the suite starts; the config checks them instead."""
    code = ("import sys\nfrom stillroom.services.cli import main\nmain(['recipes', '--json'])\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'timm', 'torchvision'}))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
