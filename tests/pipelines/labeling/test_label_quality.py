"""Label quality, computed at labeling and kept in each seed's COMPLETE record: checked against the stored
arrays and a second pass of the teacher; shown by ``stillroom store inspect`` and the label job's result."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stillroom.pipelines.data import load_dataset
from stillroom.pipelines.labeling import LabelConfig, run_labeling
from stillroom.pipelines.store import LabelStore
from stillroom.pipelines.teachers import load_teacher
from stillroom.pipelines.views import COL, build_views, get_recipe
from stillroom.services.cli import main as cli_main

DATA = "synthetic:n=96,classes=4,size=16"


@pytest.fixture(scope="module")
def labeled(tmp_path_factory, tiny_teacher):
    config = LabelConfig(dataset=DATA, teachers=(tiny_teacher,), recipe="fmnist-rrc", seeds=(0, 1), top_k=2,
                         store_root=str(tmp_path_factory.mktemp("stores")), batch_size=40, chunk_rows=32)
    return config, run_labeling(config, backend="local", progress=False)


def test_quality_matches_the_stored_arrays_and_the_teacher(labeled, tiny_teacher):
    config, result = labeled
    store = LabelStore(result["store"])
    ds = load_dataset(DATA)
    teacher = load_teacher(tiny_teacher, 4)
    for seed in (0, 1):
        got = store.quality(seed)
        assert result["quality"][str(seed)] == got
        a = store.load(seed).arrays
        views, params = build_views(ds, get_recipe(config.recipe), seed, np.arange(len(ds)))  # format 3: redrawn
        area = params[:, COL["h"]] * params[:, COL["w"]]
        with torch.inference_mode():
            log_p = teacher.logits(views).float().log_softmax(-1)
        entropy = -(log_p.exp() * log_p).sum(-1).numpy()
        for group, rows in (("all", area >= 0), ("area<0.5", area < 0.5), ("area>=0.5", area >= 0.5)):
            q = got[group]
            assert q["views"] == rows.sum()
            if not rows.any():
                continue
            y = ds.labels[rows]
            assert q["top1_agreement"] == pytest.approx((a["hard"][rows] == y).mean(), abs=1e-4)
            assert q["true_in_topk"] == pytest.approx((a["topk_idx"][rows] == y[:, None]).any(1).mean(), abs=1e-4)
            mass = np.exp(a["topk_logit"][rows].astype(np.float64) - a["lse"][rows, None]).sum(1).mean()
            assert q["mean_topk_mass"] == pytest.approx(mass, abs=2e-3)  # float16 logits
            assert q["mean_entropy"] == pytest.approx(entropy[rows].mean(), abs=1e-3)
    assert 0 < got["area<0.5"]["views"] < len(ds)  # fmnist-rrc crops fall on both sides of 0.5


def test_inspect_shows_quality_and_a_cache_hit_reports_it(labeled, capsys):
    config, result = labeled
    assert cli_main(["store", "inspect", result["store"]]) == 0
    text = capsys.readouterr().out
    assert "labels all" in text and "labels area<0.5" in text and "truth in top-k" in text
    assert cli_main(["store", "inspect", result["store"], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["per_seed"]["0"]["quality"]["all"]["views"] == 96
    again = run_labeling(config, backend="local", progress=False)
    assert again["cache_hit"] and again["quality"] == result["quality"]
