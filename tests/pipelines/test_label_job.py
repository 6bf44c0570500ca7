"""The labeling job: labels equal a direct teacher forward on the replayed views, ensembles average
probabilities, crashes and killed workers leave identical stores, repeats are cache hits, Ray spreads
work over nodes, and bad input fails before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SYNTHETIC, make_teacher

from pipelines.datasets import load_dataset
from pipelines.errors import StillroomError, UsageError
from pipelines.labeling import LabelConfig, Labeler, pool_features, run_labeling
from pipelines.store import COMPLETE, LabelStore
from pipelines.teachers import load_teacher
from pipelines.views import build_views, get_recipe


def config(tmp_path: Path, teachers, **kw) -> LabelConfig:
    fields = {"dataset": SYNTHETIC, "teachers": tuple(teachers), "seeds": (0,), "top_k": 3, "chunk_rows": 64,
              "batch_size": 32, "store_root": str(tmp_path / "stores"), **kw}
    return LabelConfig(**fields)


def checksums(store_path: str, seed: int) -> dict[str, str]:
    record = json.loads((Path(store_path) / "seeds" / str(seed) / COMPLETE).read_text())
    return {name: a["sha256"] for name, a in record["arrays"].items()}


def direct_forward(teachers: list[str], recipe: str, seed: int, params: np.ndarray) -> torch.Tensor:
    """What the teacher(s) say on the views rebuilt from stored params, computed here in one batch."""
    ds = load_dataset(SYNTHETIC)
    views, _ = build_views(ds, get_recipe(recipe), seed, np.arange(len(ds)), params=params)
    with torch.inference_mode():
        probs = [load_teacher(t, ds.num_classes).logits(views).float().softmax(-1) for t in teachers]
    return torch.stack(probs).mean(0)


def assert_labels_match(labels, probs: torch.Tensor) -> None:
    top_p, top_i = probs.topk(labels["topk_idx"].shape[1], dim=-1)
    np.testing.assert_array_equal(labels["topk_idx"], top_i.numpy())
    np.testing.assert_array_equal(labels["hard"], probs.argmax(-1).numpy())
    stored_p = np.exp(labels["topk_logit"].astype(np.float64) - labels["lse"][:, None])
    np.testing.assert_allclose(stored_p, top_p.numpy(), atol=2e-3, rtol=2e-3)  # f16 logits


@pytest.mark.parametrize("backend", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_labels_equal_a_direct_forward_on_replayed_views(tmp_path, tiny_teacher, backend, request):
    if backend == "ray":
        request.getfixturevalue("ray_cluster")
    result = run_labeling(config(tmp_path, [tiny_teacher], recipe="fmnist-rrc-mix", sampled=8), backend=backend,
                          progress=False)
    assert result["seeds_computed"] == [0] and result["samples"] == 256 and not result["cache_hit"]
    labels = LabelStore(result["store"]).load(0).arrays
    # stored views are the views this process draws for the same (recipe, seed, id)
    _, drawn = build_views(load_dataset(SYNTHETIC), get_recipe("fmnist-rrc-mix"), 0, np.arange(256))
    np.testing.assert_array_equal(labels["view"], drawn)
    assert_labels_match(labels, direct_forward([tiny_teacher], "fmnist-rrc-mix", 0, labels["view"]))
    assert labels["sampled"].shape == (256, 8) and labels["sampled"].max() < 4


def test_ensemble_labels_are_the_mean_of_probabilities(tmp_path, tiny_teachers):
    result = run_labeling(config(tmp_path, tiny_teachers, per_teacher=True), backend="local", progress=False)
    labels = LabelStore(result["store"]).load(0).arrays
    mean = direct_forward(tiny_teachers, "fmnist-rrc", 0, labels["view"])
    assert_labels_match(labels, mean)
    # each member's own top-k is kept beside the ensemble's
    own = {k.removeprefix("teacher1_"): v for k, v in labels.items() if k.startswith("teacher1_")}
    own["hard"] = own["topk_idx"][:, 0]
    assert_labels_match(own, direct_forward(tiny_teachers[1:], "fmnist-rrc", 0, labels["view"]))
    provenance = LabelStore(result["store"]).provenance
    assert [t["name"] for t in provenance["teachers"]] == ["test_resnet", "test_resnet"]
    assert provenance["teachers"][0]["weights_sha256"] != provenance["teachers"][1]["weights_sha256"]


def test_sampled_labels_are_deterministic_and_follow_the_teacher(tmp_path, tiny_teacher):
    a = run_labeling(config(tmp_path / "a", [tiny_teacher], sampled=64), backend="local", progress=False)
    b = run_labeling(config(tmp_path / "b", [tiny_teacher], sampled=64), backend="local", progress=False)
    la, lb = LabelStore(a["store"]).load(0).arrays, LabelStore(b["store"]).load(0).arrays
    np.testing.assert_array_equal(la["sampled"], lb["sampled"])
    probs = direct_forward([tiny_teacher], "fmnist-rrc", 0, la["view"]).numpy()
    freq = np.stack([(la["sampled"] == c).mean(1) for c in range(4)], axis=1)
    # 256 views x 64 draws: the mean frequency of each class matches its mean probability closely
    np.testing.assert_allclose(freq.mean(0), probs.mean(0), atol=0.02)


def test_stored_features_equal_a_direct_forward(tmp_path, tiny_teacher):
    result = run_labeling(config(tmp_path, [tiny_teacher], features="final", feature_grid=2), backend="local",
                          progress=False)
    store = LabelStore(result["store"])
    labels = store.load(0).arrays
    teacher = load_teacher(tiny_teacher, 4)
    views, _ = build_views(load_dataset(SYNTHETIC), get_recipe("fmnist-rrc"), 0, np.arange(16),
                           params=labels["view"][:16])
    with torch.inference_mode():
        _, fmap = teacher.features(views, "final")
    expected = pool_features(fmap, 2).numpy()
    assert labels["features"].dtype == np.float16 and store.schema.feature_shape == expected.shape[1:]
    np.testing.assert_allclose(labels["features"][:16].astype(np.float32), expected, rtol=1e-2, atol=1e-2)
    assert store.describe()["per_seed"]["0"]["bytes_per_sample_by_array"]["features"] > 0


def test_repeat_is_a_cache_hit_and_new_seeds_alone_are_computed(tmp_path, tiny_teacher, monkeypatch):
    first = run_labeling(config(tmp_path, [tiny_teacher], seeds=(0, 1)), backend="local", progress=False)
    before = {s: checksums(first["store"], s) for s in (0, 1)}

    def no_teacher(*_a, **_k):
        raise AssertionError("a cache hit ran the teacher")

    monkeypatch.setattr(Labeler, "label_piece", no_teacher)
    again = run_labeling(config(tmp_path, [tiny_teacher], seeds=(0, 1)), backend="local", progress=False)
    assert again["cache_hit"] and again["seeds_computed"] == [] and again["seeds_reused"] == [0, 1]
    assert again["cache_key"] == first["cache_key"]
    monkeypatch.undo()
    more = run_labeling(config(tmp_path, [tiny_teacher], seeds=(0, 1, 2)), backend="local", progress=False)
    assert more["seeds_computed"] == [2] and more["seeds_reused"] == [0, 1] and more["samples"] == 256
    assert {s: checksums(more["store"], s) for s in (0, 1)} == before
    assert LabelStore(more["store"]).seeds() == [0, 1, 2]


KILLABLE = textwrap.dedent("""
    import sys
    from pipelines.labeling import LabelConfig, run_labeling
    run_labeling(LabelConfig(dataset="synthetic:n=1024,classes=4,size=16", teachers=({teacher!r},), seeds=(0,),
                             top_k=3, chunk_rows=64, batch_size=16, store_root={root!r}), backend="local",
                 progress=False)
    print("done", flush=True)
""")


def _wait_for_pieces(root: Path, at_least: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(root.glob("*/seeds/0/pieces/*.done"))) >= at_least:
            return
        time.sleep(0.05)
    raise AssertionError("no piece was finished in time")


@pytest.mark.slow
def test_killed_run_restarts_to_an_identical_store(tmp_path):
    teacher = make_teacher(tmp_path / "slow.pt", name="resnet18", resolution=64)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    script = KILLABLE.format(teacher=teacher, root=str(killed))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        _wait_for_pieces(killed, 2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    store_dir = next(killed.iterdir())
    assert LabelStore(store_dir).seeds() == []
    finished = LabelStore(store_dir).done_pieces(0)
    assert 2 <= len(finished) < 16
    for root in (killed, clean):
        subprocess.run([sys.executable, "-c", KILLABLE.format(teacher=teacher, root=str(root))], check=True,
                       capture_output=True)
    assert checksums(str(store_dir), 0) == checksums(str(next(clean.iterdir())), 0)


@pytest.mark.ray
@pytest.mark.slow
def test_killed_ray_worker_still_gives_an_identical_store(tmp_path, ray_cluster):
    from ray.util.state import list_actors

    teacher = make_teacher(tmp_path / "slow.pt", name="resnet18", resolution=64)
    common = {"dataset": "synthetic:n=1024,classes=4,size=16", "num_workers": 2}
    outcome: dict = {}

    def label(root: Path) -> None:
        try:
            outcome[root] = run_labeling(config(root, [teacher], **common), backend="ray", progress=False)
        except Exception as e:  # surfaced below
            outcome[root] = e

    killed_root = tmp_path / "killed"
    worker = threading.Thread(target=label, args=(killed_root,))
    worker.start()
    _wait_for_pieces(killed_root / "stores", 1, timeout=120)
    alive = list_actors(filters=[("class_name", "=", "LabelWorker"), ("state", "=", "ALIVE")])
    assert alive, "no LabelWorker actor alive"
    os.kill(int(alive[0].pid), signal.SIGKILL)
    worker.join(timeout=300)
    assert not isinstance(outcome[killed_root], Exception), outcome[killed_root]
    label(tmp_path / "clean")
    killed, clean = outcome[killed_root], outcome[tmp_path / "clean"]
    assert killed["cache_key"] == clean["cache_key"]
    assert checksums(killed["store"], 0) == checksums(clean["store"], 0)


TWO_NODES = textwrap.dedent("""
    import json, ray
    from ray.cluster_utils import Cluster
    from pipelines.labeling import LabelConfig, run_labeling
    cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1, "include_dashboard": False}})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        result = run_labeling(LabelConfig(dataset={data!r}, teachers=({teacher!r},), seeds=(0,), top_k=3,
                                          chunk_rows=32, batch_size=32, num_workers=2, store_root={root!r},
                                          ray_address=cluster.address), backend="ray", progress=False)
        print(json.dumps(result))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


@pytest.mark.ray
@pytest.mark.slow
def test_two_node_cluster_uses_both_nodes(tmp_path, tiny_teacher):
    script = TWO_NODES.format(data=SYNTHETIC, teacher=tiny_teacher, root=str(tmp_path / "stores"))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["nodes"] == 2 and result["samples"] == 256
    assert LabelStore(result["store"]).verify() == []


def test_bad_input_fails_before_any_work(tmp_path, tiny_teacher):
    ckpt = tiny_teacher.partition("@")[2]
    three_classes = make_teacher(tmp_path / "three.pt", num_classes=3)
    not_a_file = tmp_path / "file.txt"
    not_a_file.write_text("x")
    cases = [
        (config(tmp_path, ["no_such_model@" + ckpt]), UsageError, "unknown model 'no_such_model'"),
        (config(tmp_path, ["resnet18@" + ckpt]), UsageError, "holds a test_resnet, not a resnet18"),
        (config(tmp_path, [three_classes]), UsageError, "predicts 3 classes; the dataset has 4"),
        (config(tmp_path, [tiny_teacher], ray_address="127.0.0.1:1"), UsageError, "no Ray cluster at 127.0.0.1:1"),
        (config(tmp_path, ["test_resnet@" + str(tmp_path / "missing.pt")]), UsageError, "does not exist"),
    ]
    for cfg, error, message in cases:
        with pytest.raises(error, match=message):
            run_labeling(cfg, backend="ray" if cfg.ray_address else "local", progress=False)
    with pytest.raises(StillroomError, match="cannot write to store root"):
        run_labeling(config(tmp_path, [tiny_teacher], store_root=str(not_a_file / "stores")), backend="local",
                     progress=False)
    stores = tmp_path / "stores"
    assert not any(stores.glob("*/seeds")), "a failed start wrote seeds"
