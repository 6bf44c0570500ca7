"""``,bad=skip`` covers images that fail when decoded, not only at index time: on a real local Ray, a JPEG folder
with one file whose header and end marker are intact but whose data is scrambled (the index takes it, decoding
fails) is labeled with that view left out (rows blanked, never a label; recorded in the store and counted in the
job's result, one log line each), and a student trained from the store on Ray Train leaves it out of its epochs."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from conftest import make_teacher
from image_data import scramble, write_image_folder

from stillroom.pipelines.data import load_dataset
from stillroom.pipelines.labeling import LabelConfig, run_labeling
from stillroom.pipelines.store import LabelStore
from stillroom.pipelines.views import draw_views, get_recipe, partner_ids
from stillroom.student.config import TrainConfig
from stillroom.student.data import StoreStream
from stillroom.student.run import train

pytestmark = [pytest.mark.ray, pytest.mark.slow]
RECIPE = "deit:size=24"  # every view mixes with a partner: a bad image also fails the view it is the partner of
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def labeled(tmp_path_factory, ray_cluster) -> dict[str, Any]:
    """A 48-image folder with image 40 scrambled, labeled under two seeds with ``,bad=skip`` on the shared Ray."""
    root = tmp_path_factory.mktemp("skip")
    folder = write_image_folder(root / "pets", train=48, val=8)
    bad = load_dataset(f"imagefolder:{folder}").path(40)
    scramble(bad)
    teacher = make_teacher(root / "t.pt", in_chans=3, resolution=24)
    config = LabelConfig(dataset=f"imagefolder:{folder},bad=skip", teachers=(teacher,), recipe=RECIPE, seeds=SEEDS,
                         top_k=3, chunk_rows=16, batch_size=16, num_workers=1, decode_workers=1,
                         store_root=str(root / "stores"))
    return {"config": config, "bad": bad, "folder": folder, "root": root}


def test_labeling_leaves_the_undecodable_view_out_and_records_it(labeled, capfd):
    config, bad = labeled["config"], labeled["bad"]
    result = run_labeling(config, backend="ray", progress=False)
    err = capfd.readouterr().err
    store = LabelStore(result["store"])
    assert store.seeds() == list(SEEDS)  # the run went on and committed every seed
    dataset = load_dataset(config.dataset)
    recipe = get_recipe(RECIPE)
    total = 0
    for seed in SEEDS:
        skipped = store.skipped(seed)
        assert skipped[40].startswith(f"{bad}: cannot decode"), skipped
        labels = store.load(seed)
        params = draw_views(recipe, seed, np.arange(len(dataset)), len(dataset), dataset.sizes)  # format 3: redrawn
        partners = partner_ids(params, np.arange(len(dataset)))
        # the others are exactly the views whose mixing partner is the bad image, and say so
        assert set(skipped) - {40} == set(np.flatnonzero(partners == 40).tolist()) - {40}
        assert all(skipped[i].startswith(f"its mixing partner {bad}") for i in set(skipped) - {40})
        lost = np.array(sorted(skipped))
        assert (labels.arrays["topk_idx"][lost] == -1).all() and (labels.arrays["hard"][lost] == -1).all()
        assert np.isnan(labels.arrays["lse"][lost]).all()
        kept = np.setdiff1d(np.arange(len(dataset)), lost)
        assert (labels.arrays["topk_idx"][kept] >= 0).all() and np.isfinite(labels.arrays["lse"][kept]).all()
        assert store.quality(seed)["all"]["views"] == len(kept)  # quality counts the labeled views alone
        assert store.manifest["skipped"][str(seed)] == lost.tolist()
        for i in lost:
            assert f"stillroom: skipped: seed {seed} sample {i}: " in err
        total += len(lost)
    assert result["views_skipped"] == total and result["samples"] == len(dataset) * len(SEEDS)
    assert any(line.startswith(f"{bad}: cannot decode") for line in result["skipped_images"])
    assert recipe.mixes


def test_training_on_ray_leaves_the_skipped_views_out_of_every_epoch(labeled, tmp_path, capfd):
    config = labeled["config"]
    hit = run_labeling(config, backend="ray", progress=False)  # labeled already: its result still counts them
    store = LabelStore(hit["store"])
    left_out = set(store.skipped(0)) | set(store.skipped(1))
    assert hit["cache_hit"] and hit["views_skipped"] == len(store.skipped(0)) + len(store.skipped(1))
    dataset = load_dataset(config.dataset)
    recipe = get_recipe(RECIPE)
    for order in ("cycle", "random"):  # the partner runs (cycle, mixing on disk) and the shuffle
        for epoch in range(2):
            ranks = [StoreStream(store, dataset, recipe, 8, rank=r, world_size=2, drop_last=True,
                                 view_order=order).batches(epoch) for r in range(2)]
            seen = [np.concatenate(b) for b in ranks]
            assert len(ranks[0]) == len(ranks[1])  # the ranks run the same number of steps
            assert not left_out & set(np.concatenate(seen).tolist()), order
            assert len(np.concatenate(seen)) == 2 * ((len(dataset) - len(left_out)) // 2 // 8 * 8)  # full batches

    out = tmp_path / "run"
    result = train(TrainConfig(store=str(store.path), dataset=config.dataset, student="test_resnet", loss="kd",
                               out=str(out), batch_size=8, epochs=2, workers=2, progress=False))
    err = capfd.readouterr().err
    assert result["samples_left_out"] == len(left_out) and result["epochs"] == 2
    assert json.loads((out / "config.json").read_text())["samples_left_out"] == sorted(left_out)
    for i in left_out:
        assert f"stillroom: skipped: sample {i} is left out of every epoch: " in err
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(np.isfinite(v) for h in history for v in h["losses"].values())
