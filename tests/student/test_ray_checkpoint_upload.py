"""Under Ray Train with ``--out`` on object storage, an epoch's ``last.pt`` goes up once: rank 0's run directory
uploads it, and Ray's checkpoint is a copy the object store makes of it (a real S3 server on 127.0.0.1, moto).
``ray.train.report`` is stood in for by what Ray does with its arguments (a ``checkpoint_upload_fn``, else its
pyarrow copy of the local directory into its storage), so no Ray Train run is started."""

from __future__ import annotations

import pyarrow.fs
import pytest
import ray.train
import s3fs
import torch
from fsspec.asyn import sync_wrapper
from s3_server import S3Server

from stillroom.pipelines.core import Location, RunDirectory
from stillroom.student.train_ray import report_epoch
from stillroom.student.trainer import CHECKPOINT, RAY_TRAIN_DIR


@pytest.fixture
def uploads(monkeypatch) -> list[str]:
    """The keys of every S3 request that carries bytes up (a PUT of an object or of a part)."""
    sent: list[str] = []
    call = s3fs.S3FileSystem._call_s3

    async def counted(self, method, *args, **kwargs):
        if method in ("put_object", "upload_part"):
            sent.append(kwargs.get("Key") or (args[0] if args else {}).get("Key"))
        return await call(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted)
    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", sync_wrapper(counted))  # what a file's writes call
    return sent


def test_last_pt_goes_up_once_an_epoch_under_ray_with_a_url_out(s3: S3Server, uploads, monkeypatch):
    out = s3.url("runs", "once")
    reported: list[ray.train.Checkpoint] = []

    def ray_report(metrics, checkpoint=None, checkpoint_dir_name=None, checkpoint_upload_fn=None, **kw):
        if checkpoint_upload_fn is not None:
            reported.append(checkpoint_upload_fn(checkpoint, checkpoint_dir_name))
        else:  # Ray's own upload: the local directory copied whole into its storage
            filesystem, root = Location(out).arrow_filesystem()
            dest = f"{root}/{RAY_TRAIN_DIR}/{checkpoint_dir_name}"
            pyarrow.fs.copy_files(checkpoint.path, dest, destination_filesystem=filesystem)
            reported.append(ray.train.Checkpoint(path=dest, filesystem=filesystem))

    monkeypatch.setattr(ray.train, "report", ray_report)
    directory = RunDirectory(out, last=(CHECKPOINT,))
    try:
        for epoch in range(2):  # what fit does on rank 0 after an epoch: save, sync, report
            torch.save({"epoch": epoch}, directory.local / CHECKPOINT)
            (directory.local / "metrics.jsonl").write_text(f"{epoch}\n")
            directory.sync()
            report_epoch({"epoch": epoch, "loss": 0.5}, directory.local / CHECKPOINT, out=out)
    finally:
        directory.close()

    assert [k for k in uploads if k.endswith(CHECKPOINT)] == ["runs/once/last.pt"] * 2  # once an epoch
    fs = s3.fs()
    for epoch, checkpoint in enumerate(reported):  # Ray was handed its copy in its storage, this epoch's
        assert checkpoint.path == f"{s3.bucket}/runs/once/{RAY_TRAIN_DIR}/epoch_{epoch:04d}"
        with fs.open(f"{checkpoint.path}/{CHECKPOINT}", "rb") as f:
            assert torch.load(f, weights_only=True) == {"epoch": epoch}
    with fs.open(f"{s3.bucket}/runs/once/{CHECKPOINT}", "rb") as f:
        assert torch.load(f, weights_only=True) == {"epoch": 1}
