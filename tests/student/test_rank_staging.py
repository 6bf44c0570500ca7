"""Which processes of a student run on a URL make a local staging directory (``RunDirectory``): only the one that
writes the run (rank 0); the other ranks of a multi-worker run make nothing. Rank 1 of two runs here in-process
(its all-reduce a no-op), against a real S3 server on 127.0.0.1 (moto)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from s3_server import S3Server

from stillroom.pipelines.labeling import LabelConfig, run_labeling
from stillroom.student.config import TrainConfig
from stillroom.student.trainer import Distributed, fit

DATA = "synthetic:n=64,classes=4,size=16"


def store_and_temp_dir(tmp_path: Path, teacher: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A tiny store, and an empty folder made the temp dir, where staging directories would go."""
    label = LabelConfig(dataset=DATA, teachers=(teacher,), store_root=str(tmp_path / "stores"), batch_size=64,
                        chunk_rows=64, top_k=3)
    store = str(run_labeling(label, backend="local", progress=False)["store"])
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return store, tmp


def test_a_rank_other_than_the_lead_makes_no_staging_directory(s3: S3Server, tmp_path, tiny_teacher, monkeypatch):
    store, tmp = store_and_temp_dir(tmp_path, tiny_teacher, monkeypatch)
    config = TrainConfig(store=store, dataset=DATA, student="test_resnet", loss="kd", out=s3.url("runs", "rank1"),
                         batch_size=16, epochs=2, progress=False, loader_workers=0)
    seen: list[list[Path]] = []

    def end_epoch(record, checkpoint) -> None:  # mid-run, where ray.train.report would be
        assert checkpoint is None
        seen.append(sorted(tmp.glob("stillroom-run-*")))

    assert fit(config, Distributed(rank=1, world_size=2, end_epoch=end_epoch)) == {}
    assert seen == [[], []]
    assert not s3.fs().exists(f"{s3.bucket}/runs/rank1")  # and it wrote nothing


def test_start_run_is_handed_its_run_directory_by_the_caller_who_closes_it(s3: S3Server, tmp_path, tiny_teacher,
                                                                              monkeypatch):
    """``start_run`` made a ``RunDirectory`` of its own when given none and never closed it: a staging directory left
    in the temp dir by every such call. Now the caller makes it and closes it (``with``)."""
    from stillroom.pipelines.core import RunDirectory
    from stillroom.student.trainer import BEST, CHECKPOINT, prepare, start_run

    store, tmp = store_and_temp_dir(tmp_path, tiny_teacher, monkeypatch)
    config = TrainConfig(store=store, dataset=DATA, student="test_resnet", loss="kd", out=s3.url("runs", "owner"),
                         batch_size=16, epochs=1, progress=False, loader_workers=0)
    setup = prepare(config)
    with pytest.raises(TypeError, match="directory"):
        start_run(config, Distributed(), setup)  # type: ignore[call-arg]
    assert not list(tmp.glob("stillroom-run-*"))
    with RunDirectory(config.out, last=(BEST, CHECKPOINT)) as directory:
        run = start_run(config, Distributed(), setup, directory)
        assert run.out == directory.local and (run.out / "config.json").exists()
    assert not list(tmp.glob("stillroom-run-*"))
