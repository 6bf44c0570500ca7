"""`stillroom demo`'s report: job records read into figures, the table, demo.png, and the README showing the
figures of the demo run last (docs/demo.json, written by that run)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from stillroom.pipelines.core import UsageError
from stillroom.services.cli.demo_report import SHARED_BY, compute_points, plot, summarize, table

ROOT = Path(__file__).resolve().parents[3]


def _student(job_id: str, loss: str, seed: int, top1: float, epoch_seconds: list[float], online: bool = False):
    """A finished train job as GET /v1/jobs/{id} returns it (the fields the report reads)."""
    spec = {"loss": loss, "seed": seed, "epochs": len(epoch_seconds), **({"online": True} if online else {})}
    return {"id": job_id, "kind": "train", "state": "SUCCEEDED", "spec": spec, "cache_hit": False,
            "attached_to": None, "result": {"top1": top1, "epoch_seconds": epoch_seconds, "online": online}}


def _records():
    teacher = {"id": "t", "kind": "teacher", "spec": {"model": "resnet10t", "epochs": 1}, "cache_hit": False,
               "result": {"top1": 0.9, "out": "/x/teacher.pt"}}
    label = {"id": "l", "kind": "label", "spec": {"num_workers": 1, "seeds": [0, 1]}, "cache_hit": False,
             "cache_key": "k", "result": {"cache_hit": False, "seeds_computed": [0, 1], "samples": 64,
                                          "seconds": 6.0, "labeling_s": 5.0, "cpus_per_worker": 2}}
    students = {"supervised": [_student("s0", "ce", 0, 0.70, [2.0, 2.0]), _student("s1", "ce", 1, 0.72, [2.0, 2.2])],
                "cached_kd": [_student("c0", "kd", 0, 0.75, [2.0, 2.0]), _student("c1", "kd", 1, 0.76, [2.2, 2.0])],
                "online_kd": [_student("o0", "kd", 0, 0.755, [5.0, 5.0], online=True)]}
    return teacher, label, students


def test_summary_reads_the_job_records():
    teacher, label, students = _records()
    second = {"teacher": {"cache_hit": True, "seconds": 0.04}, "label": {"cache_hit": True, "seconds": 0.03}}
    s = summarize(teacher, label, students, images=32, epochs=2, second_run=second)
    assert s["students"]["supervised"]["top1"] == [70.0, 72.0]
    assert s["students"]["supervised"]["mean"] == 71.0
    assert (s["students"]["cached_kd"]["low"], s["students"]["cached_kd"]["high"]) == (75.0, 76.0)
    assert s["gain"] == pytest.approx(75.5 - 71.0)
    assert s["students"]["cached_kd"]["epoch_s"] == pytest.approx(2.05)
    assert s["online_over_cached_epoch"] == pytest.approx(round(5.0 / 2.05, 2))
    # the label job held one worker of 2 cores for 6 s: 12 core-seconds, 64 teacher forwards (2 seeds of 32)
    assert s["labels"] == {"job": "l", "seeds": [0, 1], "seconds": 6.0, "cores": 2, "core_s": 12.0,
                           "teacher_forwards": 64}
    assert s["online_teacher_forwards"] == 32 * 2
    text = table(s)
    assert "| student, cached KD (from the store) | 75.50 [75.00, 76.00] | 2.0 | 4 + labels 12 / students |" in text
    assert "| student, online KD (teacher in the loop) | 75.50 (one seed) | 5.0 | 10 |" in text
    assert "**+4.50 points**" in text and "(2.44x)" in text
    assert "teacher cache hit in 0.04 s, labels cache hit in 0.03 s" in text


def test_picture_spreads_the_labeling_over_1_2_and_4_students(tmp_path):
    s = summarize(*_records(), images=32, epochs=2)
    points = plot(s, tmp_path / "demo.png")
    with Image.open(tmp_path / "demo.png") as im:
        assert im.format == "PNG" and im.width > 400 and im.height > 300
    train_s = s["students"]["cached_kd"]["train_core_s"]
    assert [p[0] for p in points["cached_kd"]] == pytest.approx([train_s + 12.0 / n for n in SHARED_BY])
    assert points["online_kd"] == [(10.0, 75.5, 75.5, 75.5)]
    assert points == compute_points(s)


def test_a_cache_hit_label_job_is_no_labeling_cost():
    teacher, label, students = _records()
    label["result"] = {"cache_hit": True, "seeds_computed": [], "samples": 0, "seconds": 0.0}
    with pytest.raises(UsageError, match="computed nothing"):
        summarize(teacher, label, students, images=32, epochs=2)
    del students["online_kd"]
    with pytest.raises(UsageError, match="no finished student jobs for online_kd"):
        summarize(*_records()[:2], students, images=32, epochs=2)



@pytest.mark.skipif(not (ROOT / "docs" / "demo.json").exists(),
                    reason="the demo's setting is not measured to the end yet (no docs/demo.json)")
def test_readme_shows_the_demo_run_last():
    """docs/demo.json is what the last `stillroom demo` wrote; the README shows its table and its picture."""
    import json

    summary = json.loads((ROOT / "docs" / "demo.json").read_text())
    readme = (ROOT / "README.md").read_text()
    assert table(summary) in readme
    assert "docs/demo.png" in readme and (ROOT / "docs" / "demo.png").exists()
    assert summary["date"][:10] in readme
