"""Confinement of a spec's URLs under URL roots: scheme, bucket and prefix compared by path components, no
request made; URLs that no root could hold (credentials, a query, '..') are refused without being echoed."""

from __future__ import annotations

import json

import pytest

from stillroom.pipelines.core import UsageError
from stillroom.services.config import Settings
from stillroom.services.specs import SPECS, BadLocation, PathOutsideRoots, confine, confine_dataset, confined_spec


@pytest.fixture
def settings(tmp_path) -> Settings:
    s = Settings(state_dir=tmp_path / "state", store_root="s3://labels/stores/", data_root="s3://data/imagenet")
    s.prepare()
    return s


def test_urls_under_a_url_root_pass_and_others_are_outside(settings, tmp_path):
    roots, base = settings.allowed_roots, settings.state_dir
    assert settings.store_root == "s3://labels/stores" and settings.store_of("ab12").url == "s3://labels/stores/ab12"
    assert confine("s3://data/imagenet/train/", roots, base) == "s3://data/imagenet/train"
    assert confine("S3://data/imagenet", roots, base) == "s3://data/imagenet"
    assert confine_dataset("parquet:s3://data/imagenet/shards/*.parquet,val=0.1", roots, base) == \
        "parquet:s3://data/imagenet/shards/*.parquet,val=0.1"
    for outside in ("s3://data/imagenet2/x",  # a sibling prefix that shares the root's text
                    "s3://data/other", "s3://labels/x", "gs://data/imagenet/x", "s3://other/imagenet/x",
                    "/etc/hostname"):
        with pytest.raises(PathOutsideRoots, match="outside the configured roots"):
            confine(outside, roots, base)
    with pytest.raises(PathOutsideRoots):
        confine_dataset("parquet:s3://data/imagenet/../other/*.parquet", roots, base)
    # the local state dir is a root still: a plain path under it passes, resolved
    (settings.state_dir / "t.pt").write_bytes(b"")
    assert confine("t.pt", roots, base) == str(settings.state_dir / "t.pt")


@pytest.mark.parametrize("url, why", [
    ("s3://AKIA:s3cr3tsecret@data/imagenet/t.pt", "must not hold credentials"),
    ("s3://data/imagenet/t.pt?X-Amz-Signature=s3cr3tsecret", "no query or fragment"),
    ("s3://data/imagenet/t.pt#s3cr3tsecret", "no query or fragment"),
    ("s3://data/imagenet/../secret/t.pt", "'..' path components"),
    ("s3://data/imagenet//t.pt", "empty"),
    ("s3://data/imagenet/%2e%2e/t.pt", "percent-escapes"),
    ("s3:///imagenet/t.pt", "name its bucket"),
])
def test_urls_no_root_could_hold_are_bad_input_and_not_echoed(settings, url, why):
    body = {"dataset": "synthetic", "teachers": [f"test_resnet@{url}"], "seeds": [0]}
    spec = SPECS["label"].model_validate_json(json.dumps(body))
    with pytest.raises(BadLocation, match=why) as e:
        confined_spec("label", spec, settings.allowed_roots, settings.state_dir)
    assert e.value.field == "teachers" and "s3cr3tsecret" not in str(e.value)


def test_a_url_root_with_credentials_is_refused_at_start(tmp_path):
    with pytest.raises(UsageError, match="store root: .*must not hold credentials") as e:
        Settings(state_dir=tmp_path, store_root="s3://KEY:s3cr3tsecret@labels/stores").prepare()
    assert "s3cr3tsecret" not in str(e.value)


def test_the_work_root_is_the_state_dir_unless_set_and_a_url_work_root_is_a_root_in_its_place(tmp_path):
    default = Settings(state_dir=tmp_path / "a", store_root=tmp_path / "stores", data_root=tmp_path / "data")
    default.prepare()
    assert default.work_root == str(tmp_path / "a") and (tmp_path / "a" / "jobs").is_dir()
    assert default.work.url == str(tmp_path / "a") and tmp_path / "a" in default.allowed_roots

    s = Settings(state_dir=tmp_path / "b", store_root="s3://labels/stores", data_root="s3://data/imagenet",
                 work_root="s3://labels/work/")
    s.prepare()
    assert s.work_root == "s3://labels/work" and (s.work / "jobs" / "j1").url == "s3://labels/work/jobs/j1"
    assert not (tmp_path / "b" / "jobs").exists()  # the state dir keeps the token and the SQLite file only
    roots, base = s.allowed_roots, s.state_dir
    assert confine("s3://labels/work/teachers/k.pt", roots, base) == "s3://labels/work/teachers/k.pt"
    (s.state_dir / "api_token").write_text("x")  # no longer under a root: a spec cannot name the state dir
    with pytest.raises(PathOutsideRoots):
        confine("api_token", roots, base)
    with pytest.raises(UsageError, match="work root: .*must not hold credentials"):
        Settings(state_dir=tmp_path / "c", store_root=tmp_path / "stores", work_root="s3://KEY:s3cr3tsecret@labels/work").prepare()


@pytest.mark.parametrize("options", [",foo=1", ",val=2", ",bad=maybe", ",val=0.1,val=0.2"])
def test_bad_dataset_options_are_bad_input_and_not_echoed(settings, options):
    dataset = f"imagefolder:s3://AKIA:s3cr3tsecret@data/imagenet{options}"
    body = {"dataset": dataset, "teachers": ["test_resnet@s3://data/imagenet/t.pt"], "seeds": [0]}
    spec = SPECS["label"].model_validate_json(json.dumps(body))
    with pytest.raises(BadLocation, match=r"options after the data set's path") as e:
        confined_spec("label", spec, settings.allowed_roots, settings.state_dir)
    assert e.value.field == "dataset" and "s3cr3tsecret" not in str(e.value)
    ok = SPECS["label"].model_validate_json(json.dumps({**body, "dataset": "imagefolder:s3://data/imagenet,val=0.1"}))
    assert confined_spec("label", ok, settings.allowed_roots, settings.state_dir)["dataset"] == \
        "imagefolder:s3://data/imagenet,val=0.1"
