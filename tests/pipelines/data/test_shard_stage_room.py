"""Staged Parquet copies (``pipelines.data.stage``): a copy in flight outlives the DataLoader worker that started it
(a real S3 server on 127.0.0.1, moto, and a real worker process); the free-disk check counts a URL shard twice
while it lands; ``$STILLROOM_SHARD_STAGE_MAX`` caps the copies, the least recently read of other data sets
removed first, a data set's own copies never."""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from image_data import write_image_folder, write_parquet
from s3_server import S3Server
from torch.utils.data import DataLoader, Dataset

from stillroom.pipelines.data import stage as _shard_stage
from stillroom.pipelines.data.stage import ShardStage


@pytest.fixture
def stage(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(_shard_stage.ENV, str(tmp_path / "stage"))
    return tmp_path / "stage"


class StartsStaging(Dataset):
    """One item, whose read in a loader worker starts staging (a row group read twice), then the epoch ends."""

    def __init__(self, shard_stage: ShardStage):
        self.stage = shard_stage

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> int:
        self.stage.read_in_place(0, 0)
        self.stage.read_in_place(0, 0)
        return os.getpid()


def test_a_copy_in_flight_outlives_the_epochs_loader_worker(s3: S3Server, stage, tmp_path):
    """A 24 MB shard on S3: its download is under way when the epoch ends and its worker with it. Before the fix
    the copy died with the worker's threads and no copy was ever made (the next epoch began it again)."""
    rng = np.random.default_rng(0)
    images = [{"bytes": rng.bytes(1 << 20), "path": f"{i}.jpg"} for i in range(24)]
    local = tmp_path / "big.parquet"
    pq.write_table(pa.table({"image": images}), local, row_group_size=4)
    key = f"{s3.bucket}/{uuid.uuid4().hex[:8]}/big.parquet"
    s3.fs().put_file(str(local), key)
    shard_stage = ShardStage([f"s3://{key}"], [(local.stat().st_size, 1)], "image")

    loader = DataLoader(StartsStaging(shard_stage), batch_size=None, num_workers=1)
    (worker,) = list(loader)  # the epoch ends: its worker exits
    deadline = time.monotonic() + 60
    while not (stage / shard_stage.names[0]).exists():
        assert time.monotonic() < deadline, f"no copy 60 s after its worker ended: {sorted(stage.iterdir())}"
        time.sleep(0.1)
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)
    assert shard_stage.read(0, 5, [0, 3]) == [images[20]["bytes"], images[23]["bytes"]]
    while list(stage.glob("*.part-*")):  # the stager leaves nothing behind
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_url_shard_counts_twice_while_it_lands(stage, monkeypatch, caplog):
    """A disk that holds a 10 GB shard's copy but not its download beside it: a URL shard is not staged, a local one
    of that size is (only the listed sizes are read: no such file is made)."""
    stage.mkdir(parents=True)
    size = 10 * 10**9
    monkeypatch.setattr(_shard_stage, "KEEP_FREE", 0.0)
    monkeypatch.setattr(_shard_stage, "KEEP_FREE_MIN", shutil.disk_usage(stage).free - int(1.5 * size))
    with caplog.at_level(logging.WARNING, logger="stillroom.data"):
        assert ShardStage(["s3://bucket/train-0.parquet"], [(size, 1)], "image")._folder() is None
        assert ShardStage([str(stage.parent / "train-0.parquet")], [(size, 1)], "image")._folder() == stage
    assert "not staging 1 Parquet shards (10.0 GB, 20.0 GB while they land)" in caplog.text


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = write_image_folder(tmp_path_factory.mktemp("imagenet"), train=32, val=8)
    return write_parquet(tmp_path_factory.mktemp("parquet"), folder, rows_per_group=4)


def test_a_size_cap_removes_the_least_recently_read_copies_of_other_data_sets(shards, stage, monkeypatch):
    files = sorted((shards / "train").glob("*.parquet"))
    shard_stage = ShardStage([str(p) for p in files], [(p.stat().st_size, p.stat().st_mtime_ns) for p in files],
                             "image")
    stage.mkdir(parents=True)
    other = 50_000
    old, recent = stage / ("a" * 32 + ".arrow"), stage / ("b" * 32 + ".arrow")  # another data set's copies
    for age, copy in ((200, old), (100, recent)):
        copy.write_bytes(b"x" * other)
        os.utime(copy, (time.time() - age, time.time() - age))
    sizes = shard_stage.sizes
    monkeypatch.setenv(_shard_stage.MAX_ENV, str(sizes[0] + other + 1000))

    shard_stage.stage(0)  # room for shard 0 and one other copy: the older goes
    assert (stage / shard_stage.names[0]).exists() and not old.exists() and recent.exists()
    copy0 = stage / shard_stage.names[0]
    os.utime(copy0, (time.time() - 300, time.time() - 300))
    assert shard_stage.read(0, 0, [0]) is not None and copy0.stat().st_mtime > time.time() - 60  # read: recent

    shard_stage.stage(1)  # never room for both of ours: the other copy goes, shard 1 is read in place
    assert not recent.exists() and copy0.exists() and not (stage / shard_stage.names[1]).exists()
    monkeypatch.setenv(_shard_stage.MAX_ENV, "1G")
    shard_stage.stage(1)
    assert (stage / shard_stage.names[1]).exists()
    assert _shard_stage.stage_cap() == 1 << 30
    monkeypatch.setenv(_shard_stage.MAX_ENV, "lots")
    with pytest.raises(ValueError, match="STILLROOM_SHARD_STAGE_MAX='lots' is not a size"):
        _shard_stage.stage_cap()
