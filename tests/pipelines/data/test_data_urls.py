"""Data sets on object storage, against a real S3 server on 127.0.0.1 (moto, ``tests/s3_server.py``): Parquet
shards and an image folder on ``s3://``, listed once into an index cached where every node finds it, read by
ranged GETs (a row group's image column) or one GET an image, the same fingerprint as the same bytes on disk;
labeled into ``s3://`` and trained from; a read-only data bucket whose index goes under the cache URL."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_teacher
from image_data import jpeg_bytes, write_image_folder, write_parquet
from s3_server import S3Server

from stillroom.pipelines.data import ImageFolder, ParquetShards, index_cache, parquet

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("imagenet"), train=32, val=8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, folder) -> Path:
    return write_parquet(tmp_path_factory.mktemp("parquet"), folder, rows_per_group=4)


def _upload(s3: S3Server, local: Path, *, bucket: str | None = None) -> str:
    """``local`` (without its index cache) under a fresh prefix; its URL."""
    prefix = f"{bucket or s3.bucket}/{uuid.uuid4().hex[:8]}"
    fs = s3.fs()
    for p in sorted(local.rglob("*")):
        if p.is_file() and ".stillroom-index" not in p.parts:
            fs.put_file(str(p), f"{prefix}/{p.relative_to(local)}")
    return f"s3://{prefix}"


def _gets(lines: list[str], part: str) -> list[str]:
    return [line for line in lines if line.split()[0] == "GET" and part in line.split()[1]]


def _listings(lines: list[str]) -> list[str]:
    return [line for line in lines if "list-type=2" in line]


def test_imagefolder_on_s3_listed_once_cached_next_to_it_and_reused(s3: S3Server, folder):
    url = _upload(s3, folder)
    mark = len(s3.requests())
    ds = ImageFolder(url, "train")
    cold = s3.requests()[mark:]
    local = ImageFolder(folder, "train")
    assert len(ds) == len(local) == 32 and ds.class_names == local.class_names
    assert ds.fingerprint == local.fingerprint  # the same bytes and labels: the same data set wherever it lies
    np.testing.assert_array_equal(ds.sizes, local.sizes)
    assert len(_listings(cold)) == 1  # one listing of the whole prefix (splits, classes, files, sizes, ETags)
    assert len(_gets(cold, ".JPEG")) == 32 and not [r for r in cold if r.startswith("HEAD") and ".JPEG" in r]
    assert ds.cache_path == f"{url}/.stillroom-index/imagefolder-train.npz" and not ds.index_reused
    assert s3.fs().exists(f"{url[5:]}/.stillroom-index/imagefolder-train.npz")

    mark = len(s3.requests())
    again = ImageFolder(url, "train")  # another node, say: the listing and the cached index, no image read
    warm = s3.requests()[mark:]
    assert again.index_reused and again.fingerprint == ds.fingerprint
    assert len(_listings(warm)) == 1 and not _gets(warm, ".JPEG") and len(_gets(warm, ".npz")) == 1
    ids = np.array([0, 7, 31])
    assert [b for b, _ in again.encoded(ids)] == [b for b, _ in local.encoded(ids)]
    assert again.location(7) == f"{url}/train/{again.class_names[int(again.labels[7])]}/" + local.path(7).name

    # one object replaced: only it is read again, and the fingerprint follows its bytes
    changed = local.path(5).relative_to(folder)
    s3.fs().pipe_file(f"{url[5:]}/{changed}", jpeg_bytes(30, 40, seed=9))
    mark = len(s3.requests())
    third = ImageFolder(url, "train")
    assert not third.index_reused and _gets(s3.requests()[mark:], ".JPEG") == [f"GET /{url[5:]}/{changed} HTTP/1.1"]
    assert third.fingerprint != ds.fingerprint


def test_parquet_shards_on_s3_read_by_row_group_with_ranged_reads(s3: S3Server, shards, monkeypatch):
    import s3fs

    url = _upload(s3, shards)
    ds = ParquetShards(url, "train")
    local = ParquetShards(str(shards), "train")
    assert ds.fingerprint == local.fingerprint and ds.class_names == local.class_names and len(ds) == 32
    assert ds.cache_path == f"{url}/.stillroom-index/parquet-train.npz"
    mark = len(s3.requests())
    warm = ParquetShards(url, "train")
    lines = s3.requests()[mark:]
    # a warm open: the listing and the cached index (its schema too), not one read of a shard
    assert warm.index_reused and len(_listings(lines)) == 1 and not _gets(lines, ".parquet")

    ranges: list[tuple[str, int, int]] = []
    fetch = s3fs.core.S3File._fetch_range

    def counted(self, start, end):
        ranges.append((self.path, start, end))
        return fetch(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counted)
    parquet._OPEN.clear()  # this process's open shards: opened again (a file binds its fetcher when opened)
    ids = np.array([1, 2, 17])  # two row groups of two shards
    assert [b for b, _ in warm.encoded(ids)] == [b for b, _ in local.encoded(ids)]
    sizes = {Path(f).name: Path(f).stat().st_size for f in local.files}
    footers = [(p, s, e) for p, s, e in ranges if e == sizes[Path(p).name] and e - s <= 64 * 1024]
    chunks = [(Path(p).name, e - s) for p, s, e in ranges if (p, s, e) not in footers]
    import pyarrow.parquet as pq

    want = []
    for f, g in sorted({(int(warm._loc[i, 0]), int(warm._loc[i, 1])) for i in ids}):
        group = pq.ParquetFile(local.files[f]).metadata.row_group(g)
        leaves = [group.column(c) for c in range(group.num_columns)]  # image.bytes, image.path, label
        want.append((Path(local.files[f]).name, sum(c.total_compressed_size for c in leaves
                                                    if c.path_in_schema.startswith("image."))))
    # each row group: one ranged GET of its image column's chunks alone (bytes and path, side by side), after
    # each shard's footer (its last 64 KiB at most: these shards are small), once a shard
    assert sorted(chunks) == sorted(want) and all(n < sizes[name] / 2 for name, n in chunks)
    assert sorted(Path(p).name for p, _, _ in footers) == sorted({name for name, _ in want})


@pytest.mark.slow
def test_parquet_on_s3_labeled_into_s3_and_trained_from(s3: S3Server, shards, tmp_path):
    from stillroom.pipelines.labeling import LabelConfig, run_labeling
    from stillroom.pipelines.store import LabelStore
    from stillroom.student.config import TrainConfig
    from stillroom.student.run import train

    url = _upload(s3, shards)
    teacher = make_teacher(tmp_path / "t.pt", num_classes=4, in_chans=3, resolution=32)
    config = LabelConfig(dataset=f"parquet:{url}", teachers=(teacher,), recipe="imagenet-rrc:size=32", top_k=3,
                         chunk_rows=16, batch_size=16, store_root=s3.url("stores-pq"))
    result = run_labeling(config, backend="local", progress=False)
    reference = run_labeling(LabelConfig(**{**vars(config), "dataset": f"parquet:{shards}",
                                            "store_root": str(tmp_path / "stores")}), backend="local", progress=False)
    there, here = LabelStore(result["store"]).load(0).arrays, LabelStore(reference["store"]).load(0).arrays
    for name in there:  # the same labels as from the same shards on disk
        np.testing.assert_array_equal(there[name], here[name])
    torch.manual_seed(0)
    metrics = train(TrainConfig(store=result["store"], dataset=f"parquet:{url}", student="test_resnet", loss="kd",
                                out=str(tmp_path / "run"), epochs=1, batch_size=8, max_steps=2, eval_limit=8,
                                loader_workers=1))  # a forked loader worker opens the URL itself
    assert metrics["store_cache_key"] == result["cache_key"] and np.isfinite(metrics["losses"]["loss"])


def _open_in_a_process(spec: str, env: dict[str, str], cache: str) -> dict:
    code = ("import json, sys; from stillroom.pipelines.data import load_dataset; "
            "ds = load_dataset(sys.argv[1], 'train', index_cache=sys.argv[2]); "
            "print(json.dumps({'reused': ds.index_reused, 'cache': ds.cache_path, 'fp': ds.fingerprint}))")
    proc = subprocess.run([sys.executable, "-c", code, spec, cache], capture_output=True, text=True, timeout=120,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two processes, one after the other (a node that builds the index, one that reuses it)
def test_read_only_data_bucket_puts_the_index_under_the_cache_url(s3: S3Server, folder, tmp_path):
    import os

    import boto3

    bucket = f"ro-{uuid.uuid4().hex[:8]}"
    s3.fs().mkdir(bucket)
    url = _upload(s3, folder, bucket=bucket)
    iam = boto3.client("iam", endpoint_url=s3.endpoint, region_name="us-east-1")
    user = f"reader-{uuid.uuid4().hex[:6]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    # read-only on the data bucket; moto 5.2 authorises a ListObjectsV2 as "s3:ListObjectsV2" where S3 asks for
    # "s3:ListBucket" (no IAM action has the other name): both are allowed, neither writes
    iam.put_user_policy(UserName=user, PolicyName="read-data-write-cache", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket", "s3:ListObjectsV2"],
             "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]},
            {"Effect": "Allow", "Action": "s3:*",
             "Resource": [f"arn:aws:s3:::{s3.bucket}", f"arn:aws:s3:::{s3.bucket}/*"]}]}))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
           "STILLROOM_CACHE": str(tmp_path / "node-cache"), "PYTHONPATH": str(ROOT)}
    env.pop("STILLROOM_INDEX_CACHE", None)
    cache = s3.url("shared-cache")
    s3.set_auth(True)
    try:
        mark = len(s3.requests())
        first = _open_in_a_process(f"imagefolder:{url}", env, cache)  # one node builds it
        second = _open_in_a_process(f"imagefolder:{url}", env, cache)  # another reuses it
        lines = s3.requests()[mark:]
    finally:
        s3.set_auth(False)
    assert first["cache"].startswith(f"{cache}/.stillroom-index/imagefolder-train-") and not first["reused"]
    assert second == {**first, "reused": True}
    assert [r for r in lines if r.startswith("PUT") and bucket in r.split()[1]]  # refused (403) ...
    assert not s3.fs().exists(f"{url[5:]}/.stillroom-index")  # ... so nothing was written next to the data
    assert not list((tmp_path / "node-cache").rglob("*.npz"))  # nor on the node alone
    assert first["fp"] == ImageFolder(folder, "train").fingerprint
    assert len(_gets(lines, ".JPEG")) == 32  # the images were read once, by the first node


def test_url_cache_places_in_order(monkeypatch, tmp_path):
    monkeypatch.setenv("STILLROOM_CACHE", str(tmp_path))
    monkeypatch.delenv("STILLROOM_INDEX_CACHE", raising=False)
    index_cache.use_index_cache(None)
    assert len(index_cache.url_cache_places("s3://b/data", "parquet-train")) == 2  # next to it, this node's
    index_cache.use_index_cache("s3://b/stores")
    try:
        places = index_cache.url_cache_places("s3://b/data", "parquet-train")
        assert places[0] == "s3://b/data/.stillroom-index/parquet-train.npz"
        assert places[1].startswith("s3://b/stores/.stillroom-index/parquet-train-")
        monkeypatch.setenv("STILLROOM_INDEX_CACHE", "gs://c/idx")  # the environment over the process default
        assert index_cache.url_cache_places("s3://b/data", "x")[1].startswith("gs://c/idx/.stillroom-index/x-")
        assert index_cache.url_cache_places("s3://b/data", "x", "s3://d")[1].startswith("s3://d/")  # explicit first
        assert places[-1].startswith(str(tmp_path / "index"))
    finally:
        index_cache.use_index_cache(None)
