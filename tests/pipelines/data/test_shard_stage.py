"""Parquet shards read at random staged on the node's disk as Arrow IPC copies (``pipelines._shard_stage``), from
a real S3 server (moto on 127.0.0.1) and from a local folder: a shuffled read stages every shard and then reads
nothing from the server, each row its own bytes; a copy removed or cut short meanwhile is read in place; a read in
id order stages nothing; a killed copy's part files are never taken; another process's copy is left to it; a disk
too small stages nothing and says so."""

from __future__ import annotations

import fcntl
import logging
import pickle
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from image_data import write_image_folder, write_parquet
from s3_server import S3Server

from stillroom.pipelines.data import ParquetShards, parquet
from stillroom.pipelines.data import stage as _shard_stage


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = write_image_folder(tmp_path_factory.mktemp("imagenet"), train=32, val=8)
    return write_parquet(tmp_path_factory.mktemp("parquet"), folder, rows_per_group=4)  # 2 shards x 4 groups


@pytest.fixture
def url(s3: S3Server, shards) -> str:
    prefix = f"{s3.bucket}/{uuid.uuid4().hex[:8]}"
    for p in sorted((shards / "train").glob("*.parquet")):
        s3.fs().put_file(str(p), f"{prefix}/train/{p.name}")
    return f"s3://{prefix}"


@pytest.fixture
def stage(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(_shard_stage.ENV, str(tmp_path / "stage"))
    return tmp_path / "stage"


def _shard_gets(s3: S3Server, mark: int) -> list[str]:
    return [r for r in s3.requests()[mark:] if r.startswith("GET") and ".parquet" in r.split()[1]]


def _wait_staged(folder: Path, count: int, timeout: float = 30.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        copies = sorted(folder.glob("*.arrow"))
        if len(copies) >= count:
            return copies
        time.sleep(0.05)
    raise AssertionError(f"{count} shards not staged in {timeout} s: {sorted(folder.iterdir())}")


def _shuffled_twice(ds: ParquetShards) -> dict[int, bytes]:
    """Two shuffled passes in batches of 4 over 8 row groups (re-reads: staging starts); what each id read."""
    order = np.random.default_rng(0).permutation(len(ds))
    got = {}
    for batch in np.array_split(np.concatenate([order, order]), 16):
        for i, (b, _) in zip(batch.tolist(), ds.encoded(batch), strict=True):
            got[i] = b
    return got


def test_shuffled_reads_stage_every_shard_then_read_nothing_from_the_server(s3: S3Server, url, shards, stage):
    ds = ParquetShards(url, "train")
    local = ParquetShards(str(shards), "train")
    truth = [b for b, _ in local.encoded(np.arange(len(local)))]
    parquet._OPEN.clear()
    assert _shuffled_twice(ds) == dict(enumerate(truth))
    _wait_staged(stage, 2)
    assert not list(stage.glob("*.part-*"))

    mark = len(s3.requests())
    ds._groups.clear()  # the row groups read before the copies were there
    ids = np.random.default_rng(1).permutation(len(ds))
    assert [b for b, _ in ds.encoded(ids)] == [truth[i] for i in ids]
    assert _shard_gets(s3, mark) == []  # every row from the node's copies
    assert not ds._groups  # row by row: no row group read since the copies were there
    # another process (a loader worker: the data set pickled) finds the copies at once
    mark = len(s3.requests())
    worker = pickle.loads(pickle.dumps(ds))
    assert [b for b, _ in worker.encoded(ids[:5])] == [truth[i] for i in ids[:5]]
    assert _shard_gets(s3, mark) == [] and not worker._groups


def test_local_shards_read_at_random_are_staged_too(shards, stage):
    ds = ParquetShards(str(shards), "train")
    truth = [b for b, _ in ParquetShards(str(shards), "train").encoded(np.arange(len(ds)))]
    assert _shuffled_twice(ds) == dict(enumerate(truth))
    _wait_staged(stage, 2)
    ds._groups.clear()
    ids = np.random.default_rng(3).permutation(len(ds))
    assert [b for b, _ in ds.encoded(ids)] == [truth[i] for i in ids] and not ds._groups


def test_a_copy_removed_or_cut_short_is_read_in_place(s3: S3Server, url, shards, stage, caplog):
    ds = ParquetShards(url, "train")
    truth = [b for b, _ in ParquetShards(str(shards), "train").encoded(np.arange(len(ds)))]
    _shuffled_twice(ds)
    copies = _wait_staged(stage, 2)
    ids = np.random.default_rng(2).permutation(len(ds))
    for copy in copies:  # the folder cleared while the process runs
        copy.unlink()
    fresh = pickle.loads(pickle.dumps(ds))  # nothing open, no row group cached in memory
    assert [b for b, _ in fresh.encoded(ids)] == [truth[i] for i in ids]
    # a copy cut short (a full disk, an edit by hand): removed, its rows read in place
    st = fresh._stage
    st.stage(0)
    copy = stage / st.names[0]
    copy.write_bytes(copy.read_bytes()[:200])
    fresh = pickle.loads(pickle.dumps(ds))
    with caplog.at_level(logging.WARNING, logger="stillroom.data"):
        assert [b for b, _ in fresh.encoded(ids)] == [truth[i] for i in ids]
    assert "removing the unreadable staged copy" in caplog.text and not copy.exists()


def test_reads_in_id_order_stage_nothing(s3: S3Server, url, shards, stage):
    for where in (url, str(shards)):
        ds = ParquetShards(where, "train")
        for batch in np.array_split(np.arange(len(ds)), 11):  # batches of 3 across groups of 4: a group in two
            ds.encoded(batch)
    time.sleep(0.2)
    assert not stage.exists() or not list(stage.glob("*.arrow"))


def test_part_files_and_another_process_copying(s3: S3Server, url, shards, stage):
    ds = ParquetShards(url, "train")
    st = ds._stage
    assert st.read(0, 0, [0]) is None  # nothing staged: in place
    stage.mkdir(parents=True, exist_ok=True)
    name = st.names[0]
    (stage / f"{name}.part-99999").write_bytes(b"half a shard")  # a process killed mid-copy
    (stage / f"{name}.part-99999.parquet").write_bytes(b"half a download")
    assert st.read(0, 1, [0]) is None  # part files are never taken for a copy

    with open(stage / f"{name}.lock", "a+b") as held:  # another process on the node is copying shard 0
        fcntl.flock(held, fcntl.LOCK_EX)
        st.stage(0)
        assert not (stage / name).exists()
    st.stage(0)  # the lock is free: copied whole, the part files removed
    assert (stage / name).exists() and not list(stage.glob("*.part-*"))
    truth = [b for b, _ in ParquetShards(str(shards), "train").encoded(np.arange(4, 8))]
    assert st.read(0, 1, [0, 1, 2, 3]) == truth  # rows 4-7 are row group 1 of shard 0


def test_a_disk_too_small_stages_nothing_and_says_so(s3: S3Server, url, stage, monkeypatch, caplog):
    monkeypatch.setattr(_shard_stage, "KEEP_FREE_MIN", 1 << 60)
    ds = ParquetShards(url, "train")
    with caplog.at_level(logging.WARNING, logger="stillroom.data"):
        for _ in range(3):
            ds.encoded(np.array([0, 5, 9, 30]))
    assert "not staging 2 Parquet shards" in caplog.text and _shard_stage.ENV in caplog.text
    assert not list(stage.glob("*.arrow"))
    monkeypatch.setenv(_shard_stage.ENV, "off")
    assert _shard_stage.stage_dir() is None
