"""Image data over REST: a job spec's ``recipe`` takes every name the CLI takes (``imagenet-rrc:size=112``), and
teacher -> label -> train jobs run end to end on a folder of JPEGs at a size other than 224."""

from __future__ import annotations

import re

import pytest
from image_data import write_image_folder
from pydantic import ValidationError
from serving import Server, wait

from stillroom.pipelines.core import UsageError
from stillroom.pipelines.views import RECIPES, get_recipe, recipe_pattern
from stillroom.services.specs import LabelJobSpec, TeacherJobSpec

OPTIONS = ("", ":size=8", ":size=0112", ":size=2048", ":size=7", ":size=2049", ":size=", ":size=x", ":size=1e2",
           ":foo=32", ":", ":size=32:size=32", ":size=32 ")


def _cli_takes(name: str) -> bool:
    try:
        get_recipe(name)
    except UsageError:
        return False
    return True


def test_recipe_field_takes_exactly_what_the_cli_takes():
    names = [base + option for base in sorted(RECIPES) for option in OPTIONS]
    names += ["", "IMAGENET-RRC", "imagenet", "imagenet-rrc-", "x:size=32", "../imagenet-rrc", "imagenet-rrc\n"]
    assert sum(map(_cli_takes, names)) == 4 * len(RECIPES)  # the bare name and three sizes in range
    for name in names:
        takes = _cli_takes(name)
        assert bool(re.fullmatch(recipe_pattern(), name)) == takes, name
        for spec, extra in ((TeacherJobSpec, {}), (LabelJobSpec, {"teachers": ["resnet18"], "seeds": [0]})):
            try:
                spec.model_validate({"dataset": "imagefolder:/data", "recipe": name, **extra})
                accepted = True
            except ValidationError:
                accepted = False
            assert accepted == takes, (spec.__name__, name)


@pytest.mark.ray
@pytest.mark.slow
def test_teacher_label_train_jobs_on_a_jpeg_folder_at_32_px(tmp_path, ray_dashboard):
    (tmp_path / "data").mkdir()
    folder = write_image_folder(tmp_path / "data" / "pets", train=48, val=8)  # 20-72 px JPEGs, 4 classes
    data, recipe = f"imagefolder:{folder}", "imagenet-rrc:size=32"
    server = Server(tmp_path, ray_dashboard).start()
    try:
        with server.client() as http:
            posted = http.post("/v1/teacher-jobs", json={"dataset": data, "recipe": recipe, "model": "test_resnet",
                                                         "epochs": 1, "batch_size": 48, "bn_samples": 0})
            assert posted.status_code == 202, posted.text
            teacher = wait(http, posted.json()["id"])
            assert teacher["state"] == "SUCCEEDED", teacher["error"]
            assert 0 <= teacher["result"]["top1"] <= 1  # scored on val/ at 32 px
            posted = http.post("/v1/label-jobs", json={"dataset": data, "recipe": recipe, "seeds": [0], "top_k": 3,
                                                       "teachers": [f"test_resnet@{teacher['result']['out']}"]})
            assert posted.status_code == 202, posted.text
            label = wait(http, posted.json()["id"])
            assert label["state"] == "SUCCEEDED", label["error"]
            store = http.get(f"/v1/stores/{label['cache_key']}").json()
            assert store["samples"] == 48 and store["provenance"]["recipe"]["name"] == recipe
            posted = http.post("/v1/train-jobs", json={"store": label["cache_key"], "student": "test_resnet",
                                                       "loss": "kd", "epochs": 1, "batch_size": 24})
            assert posted.status_code == 202, posted.text
            train = wait(http, posted.json()["id"])
            assert train["state"] == "SUCCEEDED", train["error"]
            metrics = http.get(f"/v1/jobs/{train['id']}/metrics").json()
            assert len(metrics["epochs"]) == 1 and 0 <= metrics["final"]["top1"] <= 1
    finally:
        server.stop()
