"""The labeling job, end to end on real parts: stored labels equal a direct teacher forward on the views
replayed from the stored parameters (in-process and on Ray), ensembles store the mean of probabilities,
sampled classes follow the teacher, features match, a killed run or a killed Ray worker still gives the
same store, repeats are cache hits, two Ray nodes share the work, and bad input fails before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SYNTHETIC, make_teacher

from stillroom.pipelines.core import StillroomError, UsageError
from stillroom.pipelines.data import load_dataset
from stillroom.pipelines.labeling import LabelConfig, Labeler, run_labeling, sample_classes
from stillroom.pipelines.store import COMPLETE, LabelStore, check_views
from stillroom.pipelines.teachers import load_teacher
from stillroom.pipelines.views import build_views, get_recipe

STILLROOM = str(Path(sys.executable).parent / "stillroom")


def config(root: Path, teachers, **kw) -> LabelConfig:
    fields = {"dataset": SYNTHETIC, "teachers": tuple(teachers), "seeds": (0,), "top_k": 3, "chunk_rows": 64,
              "batch_size": 32, "store_root": str(root / "stores"), **kw}
    return LabelConfig(**fields)


def checksums(store_path: str | Path, seed: int) -> dict[str, str]:
    record = json.loads((Path(store_path) / "seeds" / str(seed) / COMPLETE).read_text())
    return {name: a["sha256"] for name, a in record["arrays"].items()}


def replay(dataset: str, recipe: str, seed: int, params: np.ndarray) -> torch.Tensor:
    """The views rebuilt from stored parameters, as a student would."""
    ds = load_dataset(dataset)
    return build_views(ds, get_recipe(recipe), seed, np.arange(len(params)), params=params)[0]


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run in-process labeling on ``n`` threads, like a Ray actor holding ``n`` CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def teacher_logits(spec: str, views: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return load_teacher(spec, 4).logits(views).float()


def test_unknown_backend_fails_before_any_work(tmp_path, tiny_teacher):
    with pytest.raises(UsageError, match="unknown backend 'spark'"):
        run_labeling(config(tmp_path, [tiny_teacher]), backend="spark", progress=False)
    assert not (tmp_path / "stores").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, --no-ray --gpus-per-worker labels on it")
def test_gpus_in_this_process_without_cuda_are_refused_before_any_work(tmp_path, tiny_teacher):
    """In this process --gpus-per-worker means this process's GPU: without one the labels would be made on the
    CPU under a store key that says GPU."""
    with pytest.raises(UsageError, match="--gpus-per-worker 1: torch finds no CUDA device here"):
        run_labeling(config(tmp_path, [tiny_teacher], gpus_per_worker=1), backend="local", progress=False)
    assert not (tmp_path / "stores").exists()


@pytest.mark.parametrize("backend", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_labels_equal_a_direct_forward_on_replayed_views(tmp_path, tiny_teacher, backend, request):
    if backend == "ray":
        request.getfixturevalue("ray_cluster")
    # a mixing recipe: partners, mixup and cutmix are replayed from the stored rows too
    cfg = config(tmp_path, [tiny_teacher], recipe="fmnist-rrc-mix", num_workers=2, store_views=True)
    result = run_labeling(cfg, backend=backend, progress=False)
    assert result["seeds_computed"] == [0] and result["views"] == 256 and not result["cache_hit"]
    assert result["nodes"] == 1 and result["views_per_s"] > 0
    store = LabelStore(result["store"])
    assert store.seeds() == [0] and store.verify() == []
    labels = store.load(0).arrays
    _, drawn = build_views(load_dataset(SYNTHETIC), get_recipe("fmnist-rrc-mix"), 0, np.arange(256))
    np.testing.assert_array_equal(labels["view"], drawn)
    assert (labels["view"][:, 5] != 0).any(), "no view mixes: the replay of partners is not exercised"

    logits = teacher_logits(tiny_teacher, replay(SYNTHETIC, "fmnist-rrc-mix", 0, labels["view"]))
    idx = torch.from_numpy(labels["topk_idx"].astype(np.int64))
    np.testing.assert_array_equal(idx.numpy(), logits.topk(3, dim=-1).indices.numpy())
    np.testing.assert_array_equal(labels["hard"], logits.argmax(-1).numpy())
    # format 4's codes: each top-k probability within a few thousandths; the level (lse) in float16
    lse = torch.logsumexp(logits, -1, keepdim=True)
    np.testing.assert_allclose(np.exp(labels["topk_logit"].astype(np.float64) - labels["lse"][:, None]),
                               (logits.gather(1, idx) - lse).exp().numpy(), rtol=0, atol=5e-3)
    np.testing.assert_allclose(labels["lse"], torch.logsumexp(logits, -1).numpy(), rtol=2**-11, atol=1e-4)


def drawn_views(store: LabelStore, seed: int) -> np.ndarray:
    """A format-3 seed's view parameters: drawn again, every row checked against the store's digests."""
    ds, recipe = load_dataset(SYNTHETIC), get_recipe(store.provenance["recipe"]["name"])
    check_views(store.view_record(seed), "store", recipe, seed, len(ds), store.schema.chunk_rows,
                tuple(ds.image_shape[1:]), full=True)
    return build_views(ds, recipe, seed, np.arange(len(ds)))[1]


def test_ensemble_labels_are_the_log_of_the_mean_probability(tmp_path, tiny_teachers):
    result = run_labeling(config(tmp_path, tiny_teachers, per_teacher=True), backend="local", progress=False)
    store = LabelStore(result["store"])
    labels = store.load(0).arrays
    views = replay(SYNTHETIC, "fmnist-rrc", 0, drawn_views(store, 0))
    members = [teacher_logits(t, views) for t in tiny_teachers]
    mean = torch.stack([m.softmax(-1) for m in members]).mean(0).numpy()
    idx = labels["topk_idx"].astype(np.int64)
    stored_p = np.exp(labels["topk_logit"].astype(np.float64) - labels["lse"][:, None])
    np.testing.assert_allclose(stored_p, np.take_along_axis(mean, idx, 1), rtol=0, atol=5e-3)  # the codes
    np.testing.assert_array_equal(idx, np.argsort(-mean, axis=1, kind="stable")[:, :3])
    np.testing.assert_allclose(labels["lse"], 0.0, atol=1e-5)  # log-probabilities: they sum to one
    # the members differ, so the ensemble is not just one of them
    assert not np.allclose(members[0].softmax(-1).numpy(), members[1].softmax(-1).numpy(), atol=1e-2)
    for t, member in enumerate(members):  # each member's own top-k beside the ensemble's
        np.testing.assert_array_equal(labels[f"teacher{t}_topk_idx"], member.topk(3, -1).indices.numpy())
        np.testing.assert_allclose(labels[f"teacher{t}_lse"], torch.logsumexp(member, -1).numpy(), rtol=2**-11,
                                   atol=1e-4)  # a level: float16
    teachers = store.provenance["teachers"]
    assert len(teachers) == 2 and teachers[0]["weights_sha256"] != teachers[1]["weights_sha256"]


def test_sample_classes_follow_a_sharp_distribution():
    recipe = get_recipe("fmnist-rrc")
    p = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.0, 0.0, 1.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    logits = p.clamp_min(1e-12).log()
    ids = np.array([5, 9, 11])
    draws = sample_classes(logits, recipe, 0, ids, 4000)
    assert draws.shape == (3, 4000) and draws.min() >= 0 and draws.max() <= 3
    freq = np.stack([(draws == c).mean(1) for c in range(4)], axis=1)
    np.testing.assert_allclose(freq, p.numpy(), atol=0.03)  # 4000 draws: sd <= 0.008
    assert (draws[1] == 2).all() and not (draws[0] == 3).any()
    # keyed by the view: the same draws whatever the batch order, others under another seed
    np.testing.assert_array_equal(sample_classes(logits[[2, 0, 1]], recipe, 0, ids[[2, 0, 1]], 4000),
                                  draws[[2, 0, 1]])
    assert not np.array_equal(sample_classes(logits, recipe, 1, ids, 4000)[0], draws[0])


def test_sampled_labels_are_deterministic_and_follow_the_teacher(tmp_path, tiny_teacher):
    kw = {"top_k": 4, "sampled": 32}  # top-4 of 4 classes: the whole distribution is stored
    a = run_labeling(config(tmp_path / "a", [tiny_teacher], **kw), backend="local", progress=False)
    b = run_labeling(config(tmp_path / "b", [tiny_teacher], **kw, batch_size=64), backend="local",
                     progress=False)
    la, lb = LabelStore(a["store"]).load(0).arrays, LabelStore(b["store"]).load(0).arrays
    np.testing.assert_array_equal(la["sampled"], lb["sampled"])
    assert checksums(a["store"], 0)["sampled"] == checksums(b["store"], 0)["sampled"]
    probs = np.zeros((256, 4))
    np.put_along_axis(probs, la["topk_idx"].astype(np.int64),
                      np.exp(la["topk_logit"].astype(np.float64) - la["lse"][:, None]), 1)
    freq = np.stack([(la["sampled"] == c).mean(1) for c in range(4)], axis=1)
    # 256 views x 32 draws: each class's mean frequency is its mean probability, loosely
    np.testing.assert_allclose(freq.mean(0), probs.mean(0), atol=0.02)


def test_stored_features_equal_a_direct_forward(tmp_path, tiny_teacher):
    result = run_labeling(config(tmp_path, [tiny_teacher], features="final", feature_grid=2), backend="local",
                          progress=False)
    store = LabelStore(result["store"])
    labels = store.load(0).arrays
    views = replay(SYNTHETIC, "fmnist-rrc", 0, drawn_views(store, 0))
    with torch.inference_mode():
        logits, fmap = load_teacher(tiny_teacher, 4).features(views, "final")
    expected = F.adaptive_avg_pool2d(fmap.float(), 2).numpy()
    assert fmap.ndim == 4 and labels["features"].dtype == np.float16
    manifest = json.loads((store.path / "manifest.json").read_text())
    assert manifest["schema"]["feature_shape"] == list(expected.shape[1:]) == [fmap.shape[1], 2, 2]
    assert manifest["provenance"]["labels"]["features"] == {"layer": "final", "grid": 2}
    np.testing.assert_allclose(labels["features"].astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(labels["hard"], logits.argmax(-1).numpy())


def test_repeat_is_a_cache_hit_and_a_new_seed_alone_is_computed(tmp_path, tiny_teacher, monkeypatch):
    first = run_labeling(config(tmp_path, [tiny_teacher], seeds=(0,)), backend="local", progress=False)
    complete = Path(first["store"]) / "seeds" / "0" / COMPLETE
    before, stamp = checksums(first["store"], 0), complete.stat().st_mtime_ns

    original = Labeler.label_piece

    def no_teacher(*_a, **_k):
        raise AssertionError("a cache hit ran the teacher")

    monkeypatch.setattr(Labeler, "label_piece", no_teacher)
    again = run_labeling(config(tmp_path, [tiny_teacher], seeds=(0,)), backend="local", progress=False)
    assert again["cache_hit"] and again["seeds_computed"] == [] and again["seeds_reused"] == [0]
    assert again["cache_key"] == first["cache_key"] and again["views"] == 0

    labelled: list[int] = []

    def recording(self, seeds, *rest):
        labelled.extend(seeds)
        return original(self, seeds, *rest)

    monkeypatch.setattr(Labeler, "label_piece", recording)
    more = run_labeling(config(tmp_path, [tiny_teacher], seeds=(0, 1)), backend="local", progress=False)
    assert not more["cache_hit"] and more["seeds_computed"] == [1] and more["seeds_reused"] == [0]
    assert set(labelled) == {1} and len(labelled) == 4 and more["views"] == 256
    assert checksums(more["store"], 0) == before and complete.stat().st_mtime_ns == stamp
    assert LabelStore(more["store"]).seeds() == [0, 1]
    assert checksums(more["store"], 1) != before  # another seed, other views


KILL_DATA = "synthetic:n=1024,classes=4,size=16"  # 16 pieces of 64 rows


def _done_pieces(root: Path) -> int:
    return len(list(root.glob("*/seeds/0/pieces/*.done")))


def _wait_for_done_piece(root: Path, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _done_pieces(root):
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the labeling process ended (rc {proc.returncode}) before a piece was seen")
        time.sleep(0.01)
    raise AssertionError("no piece was finished in time")


@pytest.mark.slow
def test_killed_run_restarts_to_an_identical_store(tmp_path):
    teacher = make_teacher(tmp_path / "t64.pt", resolution=64)  # slow enough to be caught part-way
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    cfg = {"dataset": KILL_DATA, "seeds": (0,), "top_k": 3, "chunk_rows": 64, "batch_size": 32}
    cmd = [STILLROOM, "label", "--no-ray", "--dataset", KILL_DATA, "--teacher", teacher, "--seeds", "0",
           "--top-k", "3", "--chunk-rows", "64", "--batch-size", "32", "--store-root", str(killed / "stores")]
    # one torch thread in the killed run and in both runs here: the same arithmetic, bit for bit
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _wait_for_done_piece(killed / "stores", proc)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it was killed"
    store_dir = next((killed / "stores").iterdir())
    assert LabelStore(store_dir).seeds() == []  # no seed is complete
    finished = LabelStore(store_dir).done_pieces(0)
    assert 1 <= len(finished) < 16

    with torch_threads(1):
        restarted = run_labeling(LabelConfig(teachers=(teacher,), store_root=str(killed / "stores"), **cfg),
                                 backend="local", progress=False)
        reference = run_labeling(LabelConfig(teachers=(teacher,), store_root=str(clean / "stores"), **cfg),
                                 backend="local", progress=False)
    assert restarted["store"] == str(store_dir) and restarted["seeds_computed"] == [0]
    assert restarted["views"] == 1024 - 64 * len(finished)  # the finished pieces are kept
    assert reference["cache_key"] == restarted["cache_key"] and reference["views"] == 1024
    assert checksums(store_dir, 0) == checksums(reference["store"], 0)
    assert LabelStore(store_dir).verify() == []


def _children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("data_kind", ["in-memory", "jpeg-folder"])
def test_killed_ray_worker_still_gives_an_identical_store(tmp_path, ray_cluster, ray_dashboard, data_kind):
    from ray.util.state import list_actors

    if data_kind == "in-memory":
        teacher = make_teacher(tmp_path / "t64.pt", resolution=64)
        data, extra = "synthetic:n=1536,classes=4,size=16", {}  # 24 pieces, two actors of one CPU each
    else:  # each actor streams views from its own decode process
        from image_data import write_image_folder

        folder = write_image_folder(tmp_path / "jpegs", train=1536, val=4)
        teacher = make_teacher(tmp_path / "t64.pt", resolution=64, in_chans=3)
        data, extra = f"imagefolder:{folder}", {"recipe": "imagenet-rrc:size=24", "decode_workers": 1}
    outcome: dict[str, object] = {}

    def label() -> None:
        try:
            outcome["result"] = run_labeling(config(tmp_path / "killed", [teacher], dataset=data, num_workers=2,
                                                    **extra), backend="ray", progress=False)
        except Exception as e:  # reported by the assertion below
            outcome["result"] = e

    def label_workers() -> list:
        return list_actors(address=ray_dashboard, filters=[("class_name", "=", "LabelWorker"), ("state", "=", "ALIVE")])

    thread = threading.Thread(target=label)
    thread.start()
    orphans: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(alive := label_workers()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(alive) == 2, alive
        _wait_for_done_piece(tmp_path / "killed" / "stores", timeout=120)
        done_at_kill = _done_pieces(tmp_path / "killed" / "stores")
        if data_kind == "jpeg-folder":  # killed while its decode process works on a piece
            deadline = time.monotonic() + 30
            while not (orphans := _children(int(alive[0].pid))) and time.monotonic() < deadline:
                time.sleep(0.005)
            assert orphans, "the actor never had a decode process"
        os.kill(int(alive[0].pid), signal.SIGKILL)
    finally:
        thread.join(timeout=300)
    assert done_at_kill < 24, "the run ended before a worker was killed"
    killed = outcome["result"]
    assert isinstance(killed, dict), killed
    assert killed["views"] == 1536 and LabelStore(killed["store"]).verify() == []
    after = list_actors(address=ray_dashboard, filters=[("actor_id", "=", alive[0].actor_id)], detail=True)
    assert after and after[0].num_restarts >= 1  # Ray restarted the actor and retried its piece
    deadline = time.monotonic() + 15  # the killed actor's decode processes see their parent gone and end
    while any(Path(f"/proc/{pid}").exists() for pid in orphans) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in orphans if Path(f"/proc/{pid}").exists()], "decode processes outlived their actor"

    # the reference: in this process, on one thread like each actor
    with torch_threads(1):
        clean = run_labeling(config(tmp_path / "clean", [teacher], dataset=data, **extra), backend="local",
                             progress=False)
    assert killed["cache_key"] == clean["cache_key"]
    assert checksums(killed["store"], 0) == checksums(clean["store"], 0)


TWO_NODES = textwrap.dedent("""
    import json, ray
    from ray.cluster_utils import Cluster
    from stillroom.pipelines.labeling import LabelConfig, run_labeling
    cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1, "include_dashboard": False}})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        result = run_labeling(LabelConfig(dataset={data!r}, teachers=({teacher!r},), recipe="imagenet-rrc:size=24",
                                          seeds=(0,), top_k=3, chunk_rows=16, batch_size=16, num_workers=2,
                                          store_root={root!r}, ray_address=cluster.address), backend="ray",
                              progress=False)
        result["cluster_nodes"] = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        print(json.dumps(result))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


@pytest.mark.ray
@pytest.mark.slow
def test_two_node_cluster_labels_a_jpeg_folder_on_both_nodes(tmp_path):
    from image_data import write_image_folder

    folder = write_image_folder(tmp_path / "jpegs", train=96, val=4)
    teacher = make_teacher(tmp_path / "rgb.pt", in_chans=3, resolution=24)
    script = TWO_NODES.format(data=f"imagefolder:{folder}", teacher=teacher, root=str(tmp_path / "stores"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["views"] == 96 and result["seeds_computed"] == [0]
    # 6 pieces, one worker of one CPU on each 1-CPU node: each node labeled some of them
    per_node = result["pieces_per_node"]
    assert result["nodes"] == 2 and set(per_node) == set(result["cluster_nodes"]), result
    assert sum(per_node.values()) == 6 and min(per_node.values()) >= 1
    assert LabelStore(result["store"]).verify() == []


def test_bad_input_fails_before_any_work(tmp_path, tiny_teacher):
    ckpt = tiny_teacher.partition("@")[2]
    plain = tmp_path / "plain.pt"  # a plain state dict of a 4-class test_resnet
    torch.save(load_teacher(tiny_teacher).model.state_dict(), plain)
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    stores = tmp_path / "stores"
    cases = [
        (config(tmp_path, ["no_such_model_xyz@" + ckpt]), "unknown model 'no_such_model_xyz'"),
        (config(tmp_path, [f"resnet18@{plain}"]), "does not fit resnet18"),
        (config(tmp_path, [f"resnet18@{ckpt}"]), "holds a test_resnet, not a resnet18"),
        (config(tmp_path, [tiny_teacher], dataset="synthetic:n=256,classes=5,size=16"),
         r"predicts 4 classes \(its stillroom checkpoint\); the dataset has 5"),
        (config(tmp_path, [f"test_resnet@{tmp_path / 'missing.pt'}"]), "does not exist"),
        (config(tmp_path, [tiny_teacher], recipe="no-such-recipe"), "unknown view recipe"),
        (config(tmp_path, [tiny_teacher], top_k=9), "top-k 9 must be between 1 and the class count 4"),
        (config(tmp_path, [tiny_teacher], features="no.such.layer"), "has no layer 'no.such.layer'"),
    ]
    for cfg, message in cases:
        with pytest.raises(UsageError, match=message):
            run_labeling(cfg, backend="local", progress=False)
    assert not list(stores.glob("*/seeds")), "a refused job began a seed"

    t = time.monotonic()
    with pytest.raises(UsageError, match="no Ray cluster at 127.0.0.1:1"):
        run_labeling(config(tmp_path, [tiny_teacher], ray_address="127.0.0.1:1"), backend="ray", progress=False)
    assert time.monotonic() - t < 15, "a dead Ray address took long to refuse"
    assert not list(stores.glob("*/seeds")), "a refused job began a seed"

    with pytest.raises(StillroomError, match="cannot write to store root"):
        run_labeling(config(tmp_path, [tiny_teacher], store_root=str(not_a_dir / "stores")), backend="local",
                     progress=False)
    assert not_a_dir.read_text() == "x"


def test_the_result_counts_views_not_samples(tmp_path, tiny_teacher):
    """Two seeds over 256 images label 512 views: the result says so (it said ``"samples": 512``)."""
    result = run_labeling(config(tmp_path, [tiny_teacher], seeds=(0, 1)), backend="local", progress=False)
    assert result["views"] == 2 * 256 and result["images"] == 256 and result["views_per_s"] > 0
    assert "samples" not in result and "images_per_s" not in result
    again = run_labeling(config(tmp_path, [tiny_teacher], seeds=(0, 1)), backend="local", progress=False)
    assert again["cache_hit"] and again["views"] == 0 and again["images"] == 256
