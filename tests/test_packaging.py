"""What a user installs: one import name, ``stillroom``, that a project with folders of the same names as ours
(``services/``, ``pipelines/``, ``student/``) can use beside its own."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # builds a wheel: about 20 s
def test_a_wheel_from_the_committed_tree_holds_stillroom_alone_at_its_top(tmp_path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git checkout (git archive HEAD)")
    archive = tmp_path / "src.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "-o", str(archive), "HEAD"], check=True)
    src = tmp_path / "src"
    with tarfile.open(archive) as tar:
        tar.extractall(src, filter="tar")
    out = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("stillroom-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"stillroom", wheel.name.split("-py3")[0] + ".dist-info"}
    for module in ("stillroom/__init__.py", "stillroom/services/cli/__init__.py", "stillroom/student/dataset.py",
                   "stillroom/pipelines/store/__init__.py", "stillroom/services/templates/page.html"):
        assert module in names, module
    top_level = [n for n in names if n.endswith("top_level.txt")]
    assert not top_level or zipfile.ZipFile(wheel).read(top_level[0]).decode().split() == ["stillroom"]


def test_a_project_with_its_own_services_pipelines_and_student_uses_stillroom_beside_them(tmp_path):
    for name in ("services", "pipelines", "student"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"MINE = {name!r}\n")
    code = ("import services, pipelines, student, stillroom.services.cli as cli, stillroom.pipelines.store as store; "
            "print(services.MINE, pipelines.MINE, student.MINE, cli.__name__, store.__name__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["services", "pipelines", "student", "stillroom.services.cli",
                                   "stillroom.pipelines.store"]
    command = Path(sys.executable).parent / "stillroom"
    helped = subprocess.run([str(command), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "usage: stillroom" in helped.stdout, helped.stderr
    version = subprocess.run([str(command), "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.split()[0] == "stillroom", version.stderr
