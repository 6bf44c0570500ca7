"""`stillroom demo` end to end at a tiny size: the service on the shared Ray, every job over HTTP, the table,
demo.json and demo.png; the teacher and labels submitted again are cache hits (a second `stillroom demo`, which
trains only the students again, takes its labeling cost from the first run's record: test_demo_report)."""

from __future__ import annotations

import json

import pytest
from conftest import needs_fmnist
from PIL import Image

from stillroom.services.cli import main
from stillroom.services.cli.demo_report import table


@pytest.mark.slow
@pytest.mark.ray
@needs_fmnist
def test_the_demo_runs_small_and_again(tmp_path, ray_dashboard, monkeypatch, capsys):
    monkeypatch.setenv("STILLROOM_RAY_ADDRESS", ray_dashboard)
    args = ["demo", "--images", "256", "--state-dir", str(tmp_path / "state"), "--store-root",
            str(tmp_path / "stores"), "--out", str(tmp_path / "out")]
    assert main(args) == 0
    first = json.loads((tmp_path / "out" / "demo.json").read_text())
    assert (tmp_path / "out" / "demo.md").read_text().strip() == table(first)
    assert table(first) in capsys.readouterr().out
    with Image.open(tmp_path / "out" / "demo.png") as im:
        assert im.format == "PNG"
    assert [len(first["students"][k]["top1"]) for k in ("supervised", "cached_kd", "online_kd")] == [2, 2, 1]
    assert first["labels"]["teacher_forwards"] == 2 * 256 and first["labels"]["core_s"] > 0
    assert first["second_run"]["teacher"]["cache_hit"] and first["second_run"]["label"]["cache_hit"]

