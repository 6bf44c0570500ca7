"""Parquet shards on a real S3 server (moto on 127.0.0.1) staged on the node's disk once read at random
(``pipelines._shard_stage``): a shuffled read stages every shard and then reads nothing from the server; a copy
removed meanwhile is read in place; a read in id order stages nothing; a killed download's part file is never
taken; a copy of the wrong size is not used; another process's download is left to it; a disk too small stages
nothing and says so."""

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

from pipelines import _readers, _shard_stage
from pipelines.datasets import ParquetShards


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
        copies = sorted(folder.glob("*.parquet"))
        if len(copies) >= count:
            return copies
        time.sleep(0.05)
    raise AssertionError(f"{count} shards not staged in {timeout} s: {sorted(folder.iterdir())}")


def test_shuffled_reads_stage_each_shard_then_read_nothing_from_the_server(s3: S3Server, url, shards, stage):
    ds = ParquetShards(url, "train")
    local = ParquetShards(str(shards), "train")
    _readers._OPEN.clear()
    order = np.random.default_rng(0).permutation(len(ds))
    got = {}
    for batch in np.array_split(np.concatenate([order, order]), 16):  # batches of 4 across 8 groups: re-reads
        for i, (b, _) in zip(batch.tolist(), ds.encoded(batch), strict=True):
            got[i] = b
    assert got == {i: b for i, (b, _) in enumerate(local.encoded(np.arange(len(local))))}
    copies = _wait_staged(stage, 2)
    assert sorted(p.stat().st_size for p in copies) == sorted(Path(f).stat().st_size for f in local.files)
    assert not list(stage.glob("*.part-*"))

    mark = len(s3.requests())
    ids = np.random.default_rng(1).permutation(len(ds))
    assert [b for b, _ in ds.encoded(ids)] == [b for b, _ in local.encoded(ids)]
    assert _shard_gets(s3, mark) == []  # every row from the node's copies
    # another process (a loader worker: the data set pickled) finds the copies at once
    mark = len(s3.requests())
    worker = pickle.loads(pickle.dumps(ds))
    assert [b for b, _ in worker.encoded(ids[:5])] == [b for b, _ in local.encoded(ids[:5])]
    assert _shard_gets(s3, mark) == []


def test_a_copy_removed_while_reading_is_read_in_place(s3: S3Server, url, shards, stage, monkeypatch):
    ds = ParquetShards(url, "train")
    local = ParquetShards(str(shards), "train")
    for batch in np.array_split(np.tile(np.arange(len(ds)), 2), 8):  # every group read twice: staging starts
        ds.encoded(batch)
    copies = _wait_staged(stage, 2)
    for copy in copies:  # the folder cleared while the process runs
        copy.unlink()
    ids = np.random.default_rng(2).permutation(len(ds))
    fresh = pickle.loads(pickle.dumps(ds))  # no row group cached in memory
    assert [b for b, _ in fresh.encoded(ids)] == [b for b, _ in local.encoded(ids)]
    # a copy that vanishes between the stat and the read (another process clearing the folder)
    monkeypatch.setattr(_shard_stage.ShardStage, "where", lambda self, shard, group: str(stage / "gone.parquet"))
    fresh = pickle.loads(pickle.dumps(ds))
    assert [b for b, _ in fresh.encoded(ids[:6])] == [b for b, _ in local.encoded(ids[:6])]


def test_reads_in_id_order_stage_nothing(s3: S3Server, url, stage):
    ds = ParquetShards(url, "train")
    for batch in np.array_split(np.arange(len(ds)), 8):
        ds.encoded(batch)
    time.sleep(0.2)
    assert not stage.exists() or not list(stage.glob("*.parquet"))


def test_part_files_stale_copies_and_another_downloader(s3: S3Server, url, stage):
    ds = ParquetShards(url, "train")
    st = ds._stage
    assert st is not None and st.where(0, 0) == ds.files[0]  # one read: in place
    stage.mkdir(parents=True, exist_ok=True)
    name = st.names[0]
    (stage / f"{name}.part-99999").write_bytes(b"half a shard")  # a downloader killed mid-way
    (stage / name).write_bytes(b"short")  # a copy that does not match the listing's size is not taken
    assert st.where(0, 1) == ds.files[0]

    with open(stage / f"{name}.lock", "a+b") as held:  # another process on the node is fetching shard 0
        fcntl.flock(held, fcntl.LOCK_EX)
        st._download(0)
        assert (stage / name).read_bytes() == b"short"
    st._download(0)  # the lock is free: fetched whole, the part file removed
    assert (stage / name).stat().st_size == st.sizes[0] and not list(stage.glob("*.part-*"))
    assert st.where(0, 2) == str(stage / name)


def test_a_disk_too_small_stages_nothing_and_says_so(s3: S3Server, url, stage, monkeypatch, caplog):
    monkeypatch.setattr(_shard_stage, "KEEP_FREE_MIN", 1 << 60)
    ds = ParquetShards(url, "train")
    with caplog.at_level(logging.WARNING, logger="stillroom.data"):
        for _ in range(3):
            ds.encoded(np.array([0, 5, 9, 30]))
    assert "not staging 2 Parquet shards" in caplog.text and _shard_stage.ENV in caplog.text
    assert not list(stage.glob("*.parquet"))
    monkeypatch.setenv(_shard_stage.ENV, "off")
    assert _shard_stage.stage_dir() is None
