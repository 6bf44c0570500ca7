"""A teacher checkpoint rewritten where it was (a path, or an object at its URL on the moto S3 server) is another
teacher to the running service: its label specs get the new checkpoint's store key at once, where they kept the
old one until the service restarted. The service here is real (its SQLite file, its store index, a store labeled
in this process by the label job's own code); no job is launched, so it needs no Ray: every answer is a cache hit."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_teacher
from serving import DATA

from stillroom.pipelines.labeling import LabelConfig, run_labeling
from stillroom.services.config import Settings
from stillroom.services.db import JobKind
from stillroom.services.service import Service
from stillroom.services.specs import LabelJobSpec


def _label(spec: LabelJobSpec, store_root: str) -> str:
    """Label ``spec``'s seeds in this process, with the config the service builds from it; the store's key."""
    d = spec.model_dump(mode="json")
    config = LabelConfig(**{**d, "teachers": tuple(d["teachers"]), "seeds": tuple(d["seeds"]),
                            "store_root": store_root})
    return str(run_labeling(config, backend="local", progress=False)["cache_key"])


@pytest.mark.parametrize("where", ["path", "s3"])
def test_a_teacher_rewritten_in_place_gets_its_own_store_key(tmp_path, where, request):
    local = Path(make_teacher(tmp_path / "t0.pt", seed=0).partition("@")[2])
    other = Path(make_teacher(tmp_path / "t1.pt", seed=1).partition("@")[2])
    assert local.stat().st_size == other.stat().st_size  # only the weights differ: the size cannot tell them
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        fs, url = s3.fs(), s3.url("rewritten", "teacher.pt")
        fs.put_file(str(local), url)
        data_root, teacher = s3.url("rewritten"), url

        def rewrite() -> None:
            fs.put_file(str(other), url)
    else:
        (tmp_path / "data").mkdir()
        data_root, teacher = str(tmp_path / "data"), str(tmp_path / "data" / "teacher.pt")
        Path(teacher).write_bytes(local.read_bytes())

        def rewrite() -> None:
            with open(teacher, "r+b") as f:  # the same file (inode), its bytes replaced
                f.write(other.read_bytes())
    settings = Settings(state_dir=tmp_path / "state", store_root=tmp_path / "stores", data_root=data_root,
                        api_token="rewritten-test-token")
    settings.prepare()
    spec = LabelJobSpec(dataset=DATA, teachers=[f"test_resnet@{teacher}"], seeds=[0], top_k=3, batch_size=64)
    first = _label(spec, settings.store_root)
    service = Service(settings, jobs=None)  # type: ignore[arg-type]  # nothing is launched: no Ray
    try:
        job, _ = service.submit(JobKind.label, spec, None)
        assert job.cache_hit and job.cache_key == first
        hit = service.cached_label(spec)
        assert hit is not None and hit.cache_key == first

        rewrite()
        second = _label(spec, settings.store_root)
        assert second != first  # the label job itself keys the store by the checkpoint's weights
        job, _ = service.submit(JobKind.label, spec, None)
        assert job.cache_hit and job.cache_key == second  # before: the first teacher's store, until a restart
        hit = service.cached_label(spec)
        assert hit is not None and hit.cache_key == second
    finally:
        service.db.close()
