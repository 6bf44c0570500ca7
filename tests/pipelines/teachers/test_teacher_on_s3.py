"""A teacher trained onto object storage, against a real S3 server on 127.0.0.1 (moto, ``tests/s3_server.py``):
``stillroom teacher train --out s3://.../teacher.pt`` writes the checkpoint and its records there, the teacher then
labels as ``NAME@s3://.../teacher.pt``, and the credentials appear in nothing written or printed."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SYNTHETIC
from conftest import run_cli as _run
from s3_server import S3Server

from stillroom.pipelines.store import LabelStore


@pytest.mark.slow
def test_teacher_trained_onto_s3_then_labels_from_there(s3: S3Server, tmp_path):
    out = s3.url("teacher-on-s3", "t.pt")  # a prefix of its own: the session's bucket is shared with other tests
    trained = _run("teacher", "train", "--dataset", SYNTHETIC, "--model", "test_resnet", "--epochs", "1",
                   "--batch-size", "32", "--train-samples", "64", "--resolution", "20", "--out", out)
    assert trained.returncode == 0, trained.stderr[-2000:]
    result = json.loads(trained.stdout.strip().splitlines()[-1])
    assert result["out"] == out and result["train_samples"] == 64
    fs = s3.fs()
    assert sorted(fs.ls(f"{s3.bucket}/teacher-on-s3", detail=False)) == [
        f"{s3.bucket}/teacher-on-s3/{name}" for name in ("t.config.json", "t.json", "t.pt")]
    assert json.loads(fs.cat_file(f"{s3.bucket}/teacher-on-s3/t.json")) == result
    assert json.loads(fs.cat_file(f"{s3.bucket}/teacher-on-s3/t.config.json"))["resolution"] == 20
    with fs.open(f"{s3.bucket}/teacher-on-s3/t.pt", "rb") as f:
        assert torch.load(f, weights_only=True)["metrics"]["top1"] == result["top1"]

    teacher = f"test_resnet@{out}"
    labeled = _run("label", "--no-ray", "--dataset", SYNTHETIC, "--teacher", teacher, "--seeds", "0", "--top-k", "3",
                   "--chunk-rows", "128", "--store-root", s3.url("stores"))
    assert labeled.returncode == 0, labeled.stderr[-2000:]
    store = LabelStore(json.loads(labeled.stdout.strip().splitlines()[-1])["store"])
    assert store.seeds() == [0] and store.verify() == [] and store.manifest["sources"]["teachers"] == [teacher]

    refused = _run("teacher", "train", "--dataset", SYNTHETIC, "--model", "test_resnet",
                   "--out", f"s3://stillroomtestkey:{s3.secret}@{s3.bucket}/teachers/u.pt")
    assert refused.returncode == 2 and "must not hold credentials" in refused.stderr
    printed = "".join(r.stdout + r.stderr for r in (trained, labeled, refused))
    assert s3.secret.encode() not in s3.everything() and s3.secret not in printed
