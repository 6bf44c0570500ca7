"""The label store on object storage, against a real S3 server on 127.0.0.1 (moto, ``tests/s3_server.py``):
the store's guarantees there (whole objects, a seed exists once ``COMPLETE`` is written, the lease by
conditional put), the store commands on a URL, labeling into ``s3://`` with a teacher checkpoint on ``s3://``
and training from it, a killed labeling run that leaves nothing complete and a rerun that finishes, and
credentials that appear in nothing stillroom writes or prints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SYNTHETIC, make_teacher
from conftest import run_cli as _run
from s3_server import S3Server

from stillroom.pipelines.core import Location
from stillroom.pipelines.labeling import LabelConfig, run_labeling
from stillroom.pipelines.store import COMPLETE, LabelStore, SeedLease, StoreSchema, list_stores

STILLROOM = str(Path(sys.executable).parent / "stillroom")
PROVENANCE = {"dataset": {"spec": "synthetic", "fingerprint": "abc", "num_classes": 12}, "recipe": {"name": "r1"}}


def _fake(schema: StoreSchema, seed: int) -> dict[str, np.ndarray]:
    """Random arrays of the schema; the top-k those of one logit a row above an empty tail (``lse`` its logit, a
    float16 value), so format 4's encoding gives them back exactly."""
    rng = np.random.default_rng(seed)
    out = {name: (rng.integers(0, schema.num_classes, size=shape) if np.issubdtype(np.dtype(dtype), np.integer)
                  else rng.normal(size=shape)).astype(dtype) for name, (shape, dtype) in schema.arrays().items()}
    n, k = schema.num_samples, schema.top_k
    top = rng.normal(size=n).astype(np.float16).astype(np.float64)
    gaps = np.zeros((n, k)) + 24.0 * (np.arange(k) > 0)  # the others at the clipped gap: below every probability
    out["topk_logit"] = (top[:, None] - gaps).astype(np.float32)
    out["lse"], out["tail_lse"] = top.astype(np.float32), np.full(n, -np.inf, np.float32)
    out["hard"] = out["topk_idx"][:, 0].copy()
    return out



@pytest.mark.slow
def test_store_on_s3_round_trip_commands_and_lease(s3: S3Server, tmp_path):
    schema = StoreSchema(num_samples=300, num_classes=12, top_k=3, chunk_rows=128)
    root = s3.url("roundtrip")
    store = LabelStore.create(root, PROVENANCE, schema)
    assert store.path == f"{root}/{store.cache_key}"
    labels = _fake(schema, 0)
    store.begin_seed(0)
    pieces = schema.pieces()
    for i, (a, b) in enumerate(pieces[:-1]):
        store.write_piece(0, i, a, {k: v[a:b] for k, v in labels.items()})
    reopened = LabelStore(store.path)
    assert reopened.seeds() == [] and reopened.partial_seeds() == {0: (2, 3)}  # not complete: not there
    a, b = pieces[-1]
    store.write_piece(0, 2, a, {k: v[a:b] for k, v in labels.items()})
    store.commit_seed(0)
    reopened = LabelStore(store.path)
    assert reopened.seeds() == [0] and reopened.verify() == []
    for name, want in labels.items():
        np.testing.assert_allclose(reopened.load(0).arrays[name], want, rtol=0, atol=1e-5)
    assert [s.cache_key for s in list_stores(root)] == [store.cache_key]
    assert not s3.fs().exists(f"{s3.bucket}/roundtrip/{store.cache_key}/seeds/0/pieces")

    # the lease: a conditional put (If-None-Match: *) that the server refuses for the second taker
    first, second = store.lease(1), store.lease(1)
    assert first.acquire()
    assert not Location(f"{root}/{store.cache_key}/leases/1/0.json").create(b"{}")  # the 412 itself
    assert not second.acquire() and second.holder()["pid"] == os.getpid()
    first.release()
    assert second.acquire() and second.generation == 1  # generations only grow (a released one is kept, marked)
    second.release()

    # the commands on a URL
    ls = _run("store", "ls", root)
    assert ls.returncode == 0 and store.cache_key in ls.stdout and "seeds=[0]" in ls.stdout
    inspect = json.loads(_run("store", "inspect", store.path, "--json").stdout)
    assert inspect["seeds"] == [0] and inspect["size_on_disk"] > 0 and inspect["path"] == store.path
    verify = _run("store", "verify", store.path)
    assert verify.returncode == 0 and "every checksum matches" in verify.stdout
    out = s3.url("exports", "seed0.parquet")
    export = _run("store", "export", store.path, "--seed", "0", "--out", out)
    assert export.returncode == 0 and json.loads(export.stdout)["rows"] == 300
    import pyarrow.parquet as pq

    with s3.fs().open(out.removeprefix("s3://"), "rb") as f:
        assert pq.read_table(f).num_rows == 300

    # a damaged chunk object is found, named by seed, array and chunk
    chunk = f"{s3.bucket}/roundtrip/{store.cache_key}/seeds/0/lse/c/1"
    s3.fs().pipe_file(chunk, s3.fs().cat_file(chunk)[:-3] + b"xyz")
    bad = _run("store", "verify", store.path)
    assert bad.returncode == 1 and "seed 0 array lse: chunk 1" in bad.stderr
    for done in (ls, verify, export, bad):
        assert s3.secret not in done.stdout + done.stderr


@pytest.mark.slow
def test_label_into_s3_with_a_teacher_on_s3_and_train_from_it(s3: S3Server, tmp_path):
    from stillroom.student.config import TrainConfig
    from stillroom.student.run import train

    local = make_teacher(tmp_path / "t.pt").partition("@")[2]
    s3.fs().put_file(local, f"{s3.bucket}/teachers/t.pt")
    teacher = f"test_resnet@{s3.url('teachers', 't.pt')}"
    config = LabelConfig(dataset=SYNTHETIC, teachers=(teacher,), seeds=(0, 1), top_k=3, chunk_rows=64, batch_size=64,
                         store_root=s3.url("stores"))
    result = run_labeling(config, backend="local", progress=False)
    assert result["seeds_computed"] == [0, 1] and result["store"].startswith(s3.url("stores"))
    reference = run_labeling(LabelConfig(**{**vars(config), "teachers": (f"test_resnet@{local}",),
                                            "store_root": str(tmp_path / "stores")}), backend="local", progress=False)
    # the same labels as from the same checkpoint on disk (the key covers weights, not where they lie)
    assert reference["cache_key"] == result["cache_key"]
    store = LabelStore(result["store"])
    assert store.verify() == [] and store.manifest["sources"]["teachers"] == [teacher]
    for seed in (0, 1):
        there, here = store.load(seed).arrays, LabelStore(reference["store"]).load(seed).arrays
        for name in there:
            np.testing.assert_array_equal(there[name], here[name])

    out = tmp_path / "run"
    torch.manual_seed(0)
    metrics = train(TrainConfig(store=result["store"], dataset=SYNTHETIC, student="test_resnet", loss="kd",
                                out=str(out), epochs=2, batch_size=64, max_steps=2, eval_limit=64))
    assert metrics["store_cache_key"] == result["cache_key"] and len(metrics["epoch_seconds"]) == 2
    assert np.isfinite(metrics["losses"]["loss"])
    again = _run("train", "--store", result["store"], "--student", "test_resnet", "--loss", "kd",
                 "--out", str(tmp_path / "run2"), "--epochs", "1", "--batch-size", "64", "--max-steps", "2",
                 "--eval-limit", "64")
    assert again.returncode == 0, again.stderr[-2000:]
    written = s3.everything() + b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert s3.secret.encode() not in written and s3.secret not in again.stdout + again.stderr


def _pieces_done(s3: S3Server, prefix: str) -> int:
    return len(s3.fs().glob(f"{s3.bucket}/{prefix}/*/seeds/0/pieces/*.done"))


@pytest.mark.slow
def test_killed_labeling_run_on_s3_leaves_nothing_complete_and_a_rerun_finishes(s3: S3Server, tmp_path):
    teacher = make_teacher(tmp_path / "t64.pt", resolution=64)  # slow enough to be caught part-way
    data = "synthetic:n=1024,classes=4,size=16"  # 16 pieces of 64 rows
    root = s3.url("killed")
    proc = subprocess.Popen([STILLROOM, "label", "--no-ray", "--dataset", data, "--teacher", teacher, "--seeds", "0",
                             "--top-k", "3", "--chunk-rows", "64", "--batch-size", "32", "--store-root", root],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 180
        while not _pieces_done(s3, "killed"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no piece was seen (rc {proc.poll()})")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it was killed"
    (store,) = list_stores(root)
    finished = store.done_pieces(0)
    assert store.seeds() == [] and 1 <= len(finished) < 16 and not store.is_complete(0)
    assert store.lease(0).holder()["pid"] == proc.pid  # the killed run's lease is still there

    cfg = LabelConfig(dataset=data, teachers=(teacher,), seeds=(0,), top_k=3, chunk_rows=64, batch_size=32,
                      store_root=root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed run: the same arithmetic, bit for bit
    try:
        rerun = run_labeling(cfg, backend="local", progress=False)
        reference = run_labeling(LabelConfig(**{**vars(cfg), "store_root": str(tmp_path / "clean")}),
                                 backend="local", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert rerun["seeds_computed"] == [0] and rerun["views"] == 1024 - 64 * len(finished)
    done = LabelStore(rerun["store"])
    assert done.seeds() == [0] and done.verify() == [] and done.lease(0).holder() is None
    want = json.loads(Path(reference["store"], "seeds", "0", COMPLETE).read_text())["arrays"]
    got = (done.loc / "seeds" / "0" / COMPLETE).read_json()["arrays"]
    assert {k: v["sha256"] for k, v in got.items()} == {k: v["sha256"] for k, v in want.items()}


def test_credentials_are_refused_in_urls_and_absent_from_errors(s3: S3Server, tmp_path):
    bad = _run("store", "ls", f"s3://stillroomtestkey:{s3.secret}@{s3.bucket}/stores")
    assert bad.returncode == 2 and "must not hold credentials" in bad.stderr and s3.secret not in bad.stderr
    missing = _run("store", "inspect", "s3://no-such-bucket-here/stores/abc")
    assert missing.returncode == 1 and missing.stderr.startswith("stillroom: error:")
    assert s3.secret not in missing.stderr + missing.stdout
    with pytest.raises(Exception, match="must not hold credentials") as e:
        SeedLease(Location(f"s3://k:{s3.secret}@{s3.bucket}/x"))
    assert s3.secret not in str(e.value)



@pytest.mark.ray
@pytest.mark.slow
def test_two_node_ray_cluster_labels_into_one_s3_store(s3: S3Server, tmp_path):
    """Both nodes' actors write pieces of one store on s3://, with the teacher read from s3:// too: the store
    and the teacher are on no path the nodes share (the JPEGs are, as each node's own copy would be). The
    nodes get the credentials as a cluster's would, from their own environment, not from the job."""
    from image_data import write_image_folder
    from test_labeling import TWO_NODES

    folder = write_image_folder(tmp_path / "jpegs", train=96, val=4)
    local = make_teacher(tmp_path / "rgb.pt", in_chans=3, resolution=24).partition("@")[2]
    s3.fs().put_file(local, f"{s3.bucket}/teachers/two-nodes.pt")
    teacher = f"test_resnet@{s3.url('teachers', 'two-nodes.pt')}"
    script = TWO_NODES.format(data=f"imagefolder:{folder}", teacher=teacher, root=s3.url("two-nodes"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=400, env=env,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["views"] == 96 and result["seeds_computed"] == [0] and result["store"].startswith("s3://")
    per_node = result["pieces_per_node"]  # 6 pieces, one 1-CPU worker on each 1-CPU node
    assert result["nodes"] == 2 and set(per_node) == set(result["cluster_nodes"]) and sum(per_node.values()) == 6
    store = LabelStore(result["store"])
    assert store.seeds() == [0] and store.verify() == []
    assert s3.secret not in run.stdout + run.stderr and s3.secret.encode() not in s3.everything()
