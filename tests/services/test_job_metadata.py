"""A Ray job's metadata: strings naming what the job is, never a URL's credentials or signature."""

from __future__ import annotations

from stillroom.services.launcher import job_metadata


def test_metadata_names_the_job_without_secrets():
    resolved = {"dataset": "parquet:s3://key:secret@bucket/data/*.parquet,bad=skip", "split": "train",
                "teachers": ["resnet@s3://bucket/t.pt?X-Amz-Signature=abc", "vit"], "seeds": [0, 1, 2], "top_k": 5,
                "recipe": "fmnist-rrc", "batch_size": 64}
    meta = job_metadata("job_1", "label", resolved, "ab12")
    assert meta == {"stillroom_job_id": "job_1", "kind": "label", "store": "ab12", "split": "train",
                    "dataset": "parquet:s3://bucket/data/*.parquet,bad=skip", "recipe": "fmnist-rrc",
                    "teachers": "resnet@s3://bucket/t.pt,vit", "seeds": "0,1,2", "top_k": "5"}
    assert all(isinstance(v, str) for v in meta.values())
