"""The student pipeline end to end on tiny real parts: a teacher labels a synthetic split into a real store,
students train from it with every loss, views replay bit-exactly, online equals cached, bad input is refused."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stillroom.pipelines.core import UsageError
from stillroom.pipelines.data import load_dataset
from stillroom.pipelines.labeling import LabelConfig, run_labeling
from stillroom.pipelines.store import LabelStore, StoreError
from stillroom.pipelines.views import COL, MIX_NONE, build_views, draw_views
from stillroom.services.cli import main as cli_main
from stillroom.student.config import LOSSES, TrainConfig
from stillroom.student.data import StoreStream, check_store
from stillroom.student.models import build_student, student_heads
from stillroom.student.run import train

DATA = "synthetic:n=64,classes=4,size=16"
TINY_DEIT = {"patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}


def _label(root: Path, teacher: str, **kw) -> str:
    config = LabelConfig(dataset=DATA, teachers=(teacher,), store_root=str(root), batch_size=64, chunk_rows=64, **kw)
    return run_labeling(config, backend="local", progress=False)["store"]


@pytest.fixture(scope="module")
def rich_store(tmp_path_factory, tiny_teacher) -> str:
    """Mixing views, two seeds, top-3, 8 sampled classes, a 2x2 teacher feature map."""
    return _label(tmp_path_factory.mktemp("stores"), tiny_teacher, recipe="fmnist-rrc-mix", seeds=(0, 1), top_k=3,
                  sampled=8, features="final", feature_grid=2)


@pytest.fixture(scope="module")
def plain_store(tmp_path_factory, tiny_teacher) -> str:
    """Top-2 only: no sampled classes, no features."""
    return _label(tmp_path_factory.mktemp("stores"), tiny_teacher, top_k=2)


def _config(store: str, out: Path, loss: str = "kd", **kw) -> TrainConfig:
    base = dict(store=store, dataset=DATA, student="test_resnet", loss=loss, out=str(out), batch_size=16,
                max_steps=2, epochs=1, progress=False)
    return TrainConfig(**{**base, **kw})


def _student_for(loss: str) -> dict:
    if loss in ("deit-soft", "deit-hard"):
        return {"student": "deit_tiny_distilled_patch16_224", "student_kwargs": TINY_DEIT}
    return {}


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains_two_batches(rich_store, tmp_path, loss):
    result = train(_config(rich_store, tmp_path / "run", loss, **_student_for(loss)))
    assert result["losses"] and all(math.isfinite(v) for v in result["losses"].values())
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
    for name in ("config.json", "metrics.json", "metrics.jsonl", "curves.png", "last.pt"):
        assert (tmp_path / "run" / name).is_file(), name
    epoch = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert epoch["samples"] == 32 and epoch["samples_per_s"] > 0
    if loss == "mealv2":  # the authors' form: the discriminator's loss is in the student's objective
        assert {"soft_ce", "disc"} <= set(epoch["losses"]) and "adv" not in epoch["losses"]
    if loss == "tat":
        assert {"kd", "tat"} <= set(epoch["losses"])
    if loss == "deit-soft":  # two heads: ground truth on the class head, teacher on the distillation head
        assert {"ce", "distill"} <= set(epoch["losses"])


def test_distilled_deit_has_two_heads_in_training_and_one_in_eval():
    model = build_student("deit_tiny_distilled_patch16_224", 4, 1, 16, TINY_DEIT)
    model.set_distilled_training(True)
    x = torch.rand(2, 1, 16, 16)
    cls, dist = student_heads(model.train(), x)
    assert dist is not None and cls.shape == dist.shape == (2, 4)
    mean, none = student_heads(model.eval(), x)  # eval: the mean of the two heads
    assert none is None
    torch.testing.assert_close(mean, (cls + dist) / 2)


def test_rebuilt_views_equal_the_views_the_teacher_labeled(rich_store):
    store = LabelStore(rich_store)
    ds = load_dataset(DATA)
    recipe = check_store(store, ds)
    stream = StoreStream(store, ds, recipe, batch_size=64)
    for seed in (0, 1):
        labels = stream.labels_for(seed)
        ids = np.arange(len(ds))[::-1].copy()
        assert "view" not in labels.arrays  # format 3: drawn again per batch, checked against the seed's digests
        batch = stream.make_batch(labels, ids)
        np.testing.assert_array_equal(batch.params, draw_views(recipe, seed, ids, len(ds), (16, 16)))
        teacher_views, _ = build_views(ds, recipe, seed, ids)  # drawn afresh, as the labeling job did
        assert torch.equal(batch.views, teacher_views)
        mixing = batch.params[:, COL["mix_mode"]] != MIX_NONE
        assert mixing.any() and (~mixing).any()
        torch.testing.assert_close(batch.targets.sum(1), torch.ones(len(ids)))
        lam = batch.params[mixing, COL["lam"]]
        own = batch.targets[torch.from_numpy(mixing), batch.labels[torch.from_numpy(mixing)]]
        assert (own >= torch.from_numpy(lam) - 1e-6).all()


def test_shards_are_distinct_and_seeds_cycle(rich_store):
    store, ds = LabelStore(rich_store), load_dataset(DATA)
    recipe = check_store(store, ds)
    shards = [StoreStream(store, ds, recipe, 8, rank=r, world_size=2, shuffle_seed=3) for r in (0, 1)]
    a, b = shards[0].order(5), shards[1].order(5)
    assert len(a) == len(b) == 32 and not set(a) & set(b)
    assert not np.array_equal(shards[0].order(5), shards[0].order(6))
    assert [shards[0].seed_for_epoch(e) for e in range(4)] == [0, 1, 0, 1]
    assert shards[0].warn_if_repeating(2) is None and "repeat" in shards[0].warn_if_repeating(3)


def test_mealv2_gan_form_trains_its_discriminator_on_its_own_loss(rich_store, tmp_path):
    result = train(_config(rich_store, tmp_path / "gan", "mealv2", mealv2_form="gan"))
    assert {"soft_ce", "adv", "gan_disc"} <= set(result["losses"])
    assert all(math.isfinite(v) for v in result["losses"].values())


@pytest.mark.parametrize("loss", ["kd", "deit-hard"])
def test_cached_and_store_encoded_online_give_the_same_first_step_loss(rich_store, tmp_path, loss):
    firsts = []
    for online in (False, True):
        out = tmp_path / f"online{online}"
        train(_config(rich_store, out, loss, online=online, online_targets="encoded", max_steps=1))
        firsts.append(json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["first_step"]["loss"])
    assert firsts[0] == pytest.approx(firsts[1], rel=1e-6, abs=1e-7)  # the same codes: the same targets


def test_full_online_targets_are_the_teachers_float32_distribution(rich_store, tmp_path):
    from stillroom.student.losses import soft_targets_from_topk
    from stillroom.student.online import OnlineTeacher

    store, ds = LabelStore(rich_store), load_dataset(DATA)
    recipe = check_store(store, ds)
    stream = StoreStream(store, ds, recipe, batch_size=16)
    batch = stream.make_batch(stream.labels_for(0), np.arange(16))
    full = OnlineTeacher(store, recipe, targets="full").labels(batch)
    assert full["logits"].dtype == torch.float32 and full["logits"].shape == (16, 4)
    assert "topk_logit" not in full
    torch.testing.assert_close(full["hard"], batch.teacher["hard"])
    t = batch.teacher  # top-3 of 4 classes: the one tail class makes the stored rebuild exact up to float16
    rebuilt = soft_targets_from_topk(t["topk_idx"], t["topk_logit"], t["tail_lse"], 4, T=4.0)
    torch.testing.assert_close(rebuilt, torch.softmax(full["logits"] / 4.0, 1), atol=2e-3, rtol=0)
    result = train(_config(rich_store, tmp_path / "full", "kd", online=True, max_steps=1))
    assert result["online"] is True and result["online_targets"] == "full"


def test_bad_input_is_refused_before_training(rich_store, plain_store, tmp_path):
    out = tmp_path / "run"
    cases = [
        (StoreError, "the number of classes differs",
         _config(rich_store, out, dataset="synthetic:n=64,classes=5,size=16")),
        (StoreError, "other images or labels", _config(rich_store, out, dataset="synthetic:n=64,classes=4,size=17")),
        (StoreError, r"\(train split, 64 images, 4 classes\); this run reads .*65 images.*the number of images differs",
         _config(rich_store, out, dataset="synthetic:n=65,classes=4,size=16")),
        (StoreError, "sampled", _config(plain_store, out, "sampled")),
        (StoreError, "features", _config(plain_store, out, "tat")),
        (StoreError, "seeds [7]", _config(rich_store, out, seeds=(7,))),
        (UsageError, "distillation token", _config(rich_store, out, "deit-hard", distill_token=True)),
        (UsageError, "unknown student", _config(rich_store, out, student="no_such_net")),
        (UsageError, "no layer", _config(rich_store, out, "tat", student_layer="layer9")),
        (UsageError, "--resume", _config(rich_store, out, resume=True)),
        (UsageError, "--init", _config(rich_store, out, init=str(tmp_path / "missing.pt"))),
        (UsageError, "fixed halves", _config(rich_store, out, "deit-hard", alpha=0.7)),
        (UsageError, "--tat-patches-per-group", _config(rich_store, out, "tat", tat_variant="patch",
                                                          tat_patches_per_group=3)),
    ]
    for error, words, config in cases:
        with pytest.raises(error, match=words.replace("[", r"\[")):
            train(config)
    # options outside their choices or bounds (pipelines.options): refused when the config is made
    for words, bad in [("unknown --loss 'nope'", {"loss": "nope"}),
                       ("unknown --online 'top1'", {"online": True, "online_targets": "top1"}),
                       ("unknown --mealv2-form 'wgan'", {"loss": "mealv2", "mealv2_form": "wgan"}),
                       ("unknown --deit-soft-reduction 'x'", {"loss": "deit-soft", "deit_soft_reduction": "x"}),
                       ("unknown --tat-variant 'grid'", {"loss": "tat", "tat_variant": "grid"}),
                       ("--alpha 1.5: expected 0 <= value <= 1", {"alpha": 1.5}),
                       ("--temperature 0.0: expected 0 < value <= 100", {"temperature": 0.0}),
                       ("--tat-groups 0: expected 1 <= value <= 64", {"loss": "tat", "tat_groups": 0})]:
        with pytest.raises(UsageError, match=words):
            _config(rich_store, out, **bad)
    assert not out.exists()


def test_train_and_eval_commands_resume_and_init(rich_store, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--store", rich_store, "--dataset", DATA, "--student", "test_resnet", "--loss", "ce",
            "--epochs", "1", "--batch-size", "16", "--max-steps", "2", "--out", str(out), "--no-progress"]
    assert cli_main(args) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["epochs"] == 1 and final["checkpoint"].endswith("last.pt")

    assert cli_main(["eval", "--checkpoint", str(out / "last.pt"), "--dataset", DATA, "--split", "test"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["top1"] == pytest.approx(final["top1"]) and scores["top5"] == pytest.approx(final["top5"])

    assert cli_main(args) == 2  # the run directory holds a run: refused without --resume
    assert "--resume" in capsys.readouterr().err
    args[args.index("--epochs") + 1] = "2"
    assert cli_main([*args, "--resume"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1]

    # MEAL V2 starts from the pretrained student
    result = train(_config(rich_store, tmp_path / "meal", "mealv2", init=str(out / "last.pt")))
    assert math.isfinite(result["losses"]["soft_ce"])
    bad = tmp_path / "bad.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(UsageError, match="does not fit"):
        train(_config(rich_store, tmp_path / "meal2", "mealv2", init=str(bad)))


@pytest.mark.slow
@pytest.mark.ray
def test_two_ray_train_workers_complete_and_the_checkpoint_evaluates(rich_store, tmp_path, ray_cluster, capsys):
    config = _config(rich_store, tmp_path / "ddp", "kd", workers=2, max_steps=None)
    result = train(config)
    assert result["workers"] == 2
    epoch = json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[0])
    assert epoch["samples"] == 64  # two shards of 32 make the whole epoch
    assert cli_main(["eval", "--checkpoint", result["checkpoint"], "--dataset", DATA]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["top1"] == pytest.approx(result["top1"])



def test_only_the_ray_train_entry_point_imports_ray():
    code = ("import sys; import stillroom.student.trainer, stillroom.student.run, stillroom.student.config, "
            "stillroom.student.data, stillroom.student.online, stillroom.services.cli.train, "
            "stillroom.student.evaluate, "
            "stillroom.pipelines.training, stillroom.pipelines.labeling; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_metrics_record_every_step_and_count_epochs_from_0(plain_store, tmp_path):
    from stillroom.student.trainer import StepLosses

    out = tmp_path / "run"
    train(_config(plain_store, out, "kd", epochs=2, max_steps=3))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and [r["steps"] for r in records] == [3, 3]
    for r in records:
        per_step = r["step_losses"]
        assert per_step["steps_per_point"] == 1 and set(per_step["losses"]) == set(r["losses"]) == {"kd", "loss"}
        kd = per_step["losses"]["kd"]
        assert len(kd) == 3 and kd[0] == pytest.approx(r["first_step"]["kd"], abs=1e-6)
        assert sum(kd) / 3 == pytest.approx(r["losses"]["kd"], abs=1e-5)  # the epoch's mean is their mean
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1  # the checkpoint counts from 0 too

    # a long epoch keeps at most `points` values per loss: the means of runs of consecutive steps
    binned = StepLosses(steps=7, points=3)
    for i in range(7):
        binned.add(i, {"kd": float(i)})
    assert binned.to_dict() == {"steps_per_point": 3, "losses": {"kd": [1.0, 4.0, 6.0]}}


def test_train_takes_a_cache_key_and_the_data_set_from_the_store_manifest(plain_store, tmp_path, capsys):
    store = Path(plain_store)
    out = tmp_path / "run"
    args = ["train", "--store", store.name, "--store-root", str(store.parent), "--student", "test_resnet",
            "--loss", "kd", "--batch-size", "16", "--max-steps", "1", "--out", str(out), "--no-progress"]
    assert cli_main(args) == 0, capsys.readouterr().err  # no --dataset: the manifest's
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    config = json.loads((out / "config.json").read_text())
    assert config["store"] == str(store) and config["dataset"] == load_dataset(DATA, "train").spec
    assert config["split"] == "train"
    assert cli_main(["eval", "--checkpoint", str(out / "last.pt")]) == 0  # no --dataset: the one it trained on
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top1"] == pytest.approx(trained["top1"])

    assert cli_main([*args[:2], "0123abcd", *args[3:]]) == 2  # a key that is not under the root
    assert "neither a label store directory nor the cache key" in capsys.readouterr().err

    # a store whose manifest does not record its data set (older): --dataset is asked for, and then it trains
    old = tmp_path / "old" / store.name
    shutil.copytree(store, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["provenance"]["dataset"]["spec"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    older = ["train", "--store", str(old), *args[5:-3], "--out", str(tmp_path / "old_run"), "--no-progress"]
    assert cli_main(older) == 2
    assert "does not record the data set it was labeled from: pass --dataset" in capsys.readouterr().err
    assert cli_main([*older, "--dataset", DATA]) == 0


def test_eval_limit_scores_a_class_balanced_subset_of_a_class_sorted_split():
    from stillroom.student.evaluate import evaluate

    ds = load_dataset("synthetic:n=256,classes=4,size=16", "test")
    order = np.argsort(ds.labels, kind="stable")  # sorted by class, as ImageNet's ids are
    ds.images, ds.labels = ds.images[order], ds.labels[order]

    class Always0(torch.nn.Module):  # a student that answers class 0 whatever it sees
        def forward(self, x):
            return torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(len(x), 1)

    # the first 40 ids are all class 0 (a 100 % score); 10 of each class score 25 %
    assert (ds.labels[:40] == 0).all()
    assert evaluate(Always0(), ds, 16, batch_size=16, limit=40)["top1"] == 0.25
    assert evaluate(Always0(), ds, 16, limit=10_000)["top1"] == round(float((ds.labels == 0).mean()), 6)


def test_random_view_order_trains_and_online_draws_each_views_own_sampled_classes(rich_store, tmp_path):
    """--view-order random: rows of a batch come from several seeds; the online teacher's sampled classes are keyed
    by each view's own seed, so it equals the cached run (the store's sampled classes) at the first step."""
    firsts = []
    for online in (False, True):
        out = tmp_path / f"online{online}"
        train(_config(rich_store, out, "sampled", online=online, online_targets="encoded", max_steps=1, epochs=2,
                      view_order="random"))
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [line["seed"] for line in lines] == [None, None]  # no one seed an epoch
        firsts.append(lines[0]["first_step"]["loss"])
    assert firsts[0] == pytest.approx(firsts[1], rel=1e-4, abs=1e-5)
    with pytest.raises(SystemExit):
        cli_main(["train", "--store", rich_store, "--student", "test_resnet", "--loss", "kd", "--out",
                  str(tmp_path / "bad"), "--view-order", "shuffled"])


def test_views_per_image_trains_k_views_of_each_sample_a_batch(rich_store, tmp_path):
    out = tmp_path / "k2"
    result = train(_config(rich_store, out, "kd", views_per_image=2, max_steps=2))
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert line["seed"] is None and line["samples"] == 2 * 16  # two steps of 16 views (8 images, 2 views each)
    assert math.isfinite(result["losses"]["loss"])
    with pytest.raises(UsageError, match="a divisor of the batch size 16"):
        train(_config(rich_store, tmp_path / "bad", "kd", views_per_image=3))
