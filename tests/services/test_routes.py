"""The app's shape in-process: dependencies tests can swap, one job-state Enum in the OpenAPI document, and
a token that is never printed."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from stillroom.services.app import create_app
from stillroom.services.config import Settings
from stillroom.services.db import JobState
from stillroom.services.deps import authorized


@pytest.fixture()
def app(tmp_path, ray_dashboard):
    from stillroom.services.launcher import RayJobs

    settings = Settings(state_dir=tmp_path / "state", store_root=tmp_path / "stores", data_root=tmp_path,
                        api_token="route-test-token")
    return create_app(settings, RayJobs(ray_dashboard))


@pytest.mark.ray
def test_the_auth_dependency_can_be_overridden(app):
    with TestClient(app) as http:
        assert http.get("/v1/jobs").status_code == 401
        app.dependency_overrides[authorized] = lambda: None
        answer = http.get("/v1/jobs", params={"state": "RUNNING", "kind": "label"})
        assert answer.status_code == 200 and answer.json() == {"jobs": [], "next_page_token": None}
        app.dependency_overrides.clear()
        assert http.get("/v1/jobs").status_code == 401


@pytest.mark.ray
def test_one_job_state_enum_in_the_openapi_document(app):
    doc = app.openapi()
    assert doc["components"]["schemas"]["JobState"]["enum"] == [s.value for s in JobState]
    state_param = next(p for p in doc["paths"]["/v1/jobs"]["get"]["parameters"] if p["name"] == "state")
    assert "#/components/schemas/JobState" in str(state_param["schema"])
    logs = doc["paths"]["/v1/jobs/{job_id}/logs"]["get"]["responses"]
    assert list(logs["200"]["content"]) == ["text/plain"]
    assert list(logs["401"]["content"]) == ["application/json"]


def test_a_new_token_is_saved_not_printed(tmp_path, capsys):
    settings = Settings(state_dir=tmp_path)
    token = settings.token
    err = capsys.readouterr().err
    assert token not in err and str(tmp_path / "api_token") in err
    assert (tmp_path / "api_token").stat().st_mode & 0o777 == 0o600
    assert Settings(state_dir=tmp_path).token == token  # the saved one, the next time
