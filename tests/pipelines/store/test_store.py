"""Label store: round trip, crash safety, corruption found by verify, manifest checks, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from stillroom.pipelines.core import StillroomError
from stillroom.pipelines.store import COMPLETE, MANIFEST, LabelStore, StoreError, StoreSchema, cache_key

PROVENANCE = {"dataset": {"spec": "synthetic", "fingerprint": "abc", "num_classes": 12}, "recipe": {"name": "r1"}}


def fake_labels(schema: StoreSchema, seed: int) -> dict[str, np.ndarray]:
    """What a writer hands the store: a teacher's top-k of random logits (consistent: ``hard`` its first, ``lse``
    and ``tail_lse`` its log-sum-exps), random view parameters, sampled classes and features."""
    rng = np.random.default_rng(seed)
    n, k = schema.num_samples, schema.top_k
    logits = rng.normal(0, 2, size=(n, schema.num_classes))
    idx = np.argsort(-logits, axis=1)[:, :k]
    top = np.take_along_axis(logits, idx, 1)
    tail = logits.copy()
    np.put_along_axis(tail, idx, -np.inf, 1)
    out = {"view": rng.random((n, schema.view_params)).astype(np.float32), "topk_idx": idx.astype(np.int16),
           "topk_logit": top.astype(np.float16), "lse": np.logaddexp.reduce(logits, 1).astype(np.float32),
           "tail_lse": np.logaddexp.reduce(tail, 1).astype(np.float32), "hard": idx[:, 0].astype(np.int16)}
    if schema.sampled:
        out["sampled"] = rng.integers(0, schema.num_classes, (n, schema.sampled)).astype(np.int16)
    if schema.feature_shape:
        out["features"] = rng.normal(size=(n, *schema.feature_shape)).astype(np.float16)
    return out


def assert_labels_match(got: dict[str, np.ndarray], want: dict[str, np.ndarray], schema: StoreSchema) -> None:
    """Every array read back as written; format 4's top-k and tail probabilities within its codes' error (the
    targets' bound is tested in test_store_format3) and its level (``lse``) in float16, its view parameters not
    stored."""
    for name, a in want.items():
        if name == "view" and not schema.views_stored:
            assert name not in got
        elif schema.format_version >= 3 and name in ("topk_logit", "tail_lse"):  # as probabilities
            mine, theirs = (x["lse"].astype(np.float64).reshape(-1, *([1] * (a.ndim - 1))) for x in (got, want))
            np.testing.assert_allclose(np.exp(got[name] - mine), np.exp(a.astype(np.float64) - theirs), atol=0.005)
        elif schema.format_version >= 4 and name == "lse":
            np.testing.assert_array_equal(got[name], a.astype(np.float16).astype(np.float32))
        else:
            np.testing.assert_array_equal(got[name], a)


def write_seed(store: LabelStore, seed: int) -> dict[str, np.ndarray]:
    labels = fake_labels(store.schema, seed)
    store.begin_seed(seed)
    for i, (a, b) in enumerate(store.schema.pieces()):
        store.write_piece(seed, i, a, {k: v[a:b] for k, v in labels.items()})
    store.commit_seed(seed)
    return labels


@pytest.fixture(params=["format3", "format3-views", "format2"])
def schema(request) -> StoreSchema:
    """Format 3 (the default), format 3 with the view parameters (``--store-views``), format 2 (still read)."""
    return StoreSchema(num_samples=1000, num_classes=12, top_k=3, sampled=5, feature_shape=(4, 2, 2), chunk_rows=128,
                       store_views=request.param == "format3-views",
                       format_version=2 if request.param == "format2" else 3)


def test_round_trip_and_gather(tmp_path, schema):
    store = LabelStore.create(tmp_path, PROVENANCE, schema)
    labels = {s: write_seed(store, s) for s in (0, 3)}
    reopened = LabelStore(store.path)
    assert reopened.seeds() == [0, 3] and reopened.manifest["seeds"] == [0, 3]
    seed = reopened.load(3)
    assert_labels_match(seed.arrays, labels[3], schema)
    ids = np.array([999, 0, 500, 500])
    got = seed.gather(ids)
    np.testing.assert_array_equal(got["topk_idx"], labels[3]["topk_idx"][ids])
    assert got["features"].dtype == np.float16 and got["features"].shape == (4, 4, 2, 2)
    assert reopened.verify() == []
    with pytest.raises(StoreError, match="seed 7 is not in"):
        reopened.load(7)


def test_cache_key_covers_provenance_and_labels(schema):
    key = cache_key(PROVENANCE, schema)
    assert key == cache_key(json.loads(json.dumps(PROVENANCE)), schema)
    other = {**PROVENANCE, "recipe": {"name": "r2"}}
    assert cache_key(other, schema) != key
    assert cache_key(PROVENANCE, replace(schema, top_k=4)) != key
    # chunking changes no label, so it is not in the key; the format and whether the views are stored do
    assert cache_key(PROVENANCE, replace(schema, chunk_rows=256)) == key
    assert cache_key(PROVENANCE, replace(schema, format_version=5 - schema.format_version, store_views=False)) != key


def test_writes_must_be_whole_chunks(tmp_path, schema):
    store = LabelStore.create(tmp_path, PROVENANCE, schema)
    store.begin_seed(0)
    part = {k: v[:100] for k, v in fake_labels(schema, 0).items()}
    with pytest.raises(StoreError, match="whole 128-row chunks"):
        store.write_piece(0, 0, 0, part)
    with pytest.raises(StoreError, match="pieces .* are not written"):
        store.commit_seed(0)


WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_store import PROVENANCE, fake_labels
    from stillroom.pipelines.store import LabelStore, StoreSchema
    schema = StoreSchema(num_samples=1000, num_classes=12, top_k=3, sampled=5, feature_shape=(4, 2, 2), chunk_rows=128)
    store = LabelStore.create({root!r}, PROVENANCE, schema)
    labels = fake_labels(schema, 0)
    store.begin_seed(0)
    for i, (a, b) in enumerate(schema.pieces()):
        if i in store.done_pieces(0):
            continue
        store.write_piece(0, i, a, {{k: v[a:b] for k, v in labels.items()}})
        print("piece", i, flush=True)
        if {stop_after} == i:
            time.sleep(60)
    store.commit_seed(0)
    print("committed", flush=True)
""")


def test_killed_writer_leaves_no_seed_and_resumes(tmp_path):
    schema = StoreSchema(num_samples=1000, num_classes=12, top_k=3, sampled=5, feature_shape=(4, 2, 2), chunk_rows=128)
    tests_dir = str(Path(__file__).parent)
    script = WRITER.format(tests=tests_dir, root=str(tmp_path), stop_after=2)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.strip() == "piece 2":
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    store = LabelStore.create(tmp_path, PROVENANCE, schema)
    assert store.seeds() == [] and store.done_pieces(0) == {0, 1, 2}
    with pytest.raises(StoreError, match="seed 0 is not in"):
        store.load(0)
    # started again, the writer keeps the three finished pieces and does the rest
    rerun = subprocess.run([sys.executable, "-c", WRITER.format(tests=tests_dir, root=str(tmp_path), stop_after=-1)],
                           capture_output=True, text=True, check=True)
    assert "piece 0" not in rerun.stdout and "piece 3" in rerun.stdout and "committed" in rerun.stdout
    labels = LabelStore(store.path).load(0)
    assert_labels_match(labels.arrays, fake_labels(schema, 0), schema)


@pytest.mark.parametrize("damage", ["edit", "truncate"])
def test_verify_finds_a_damaged_chunk(tmp_path, schema, damage):
    store = LabelStore.create(tmp_path, PROVENANCE, schema)
    write_seed(store, 0)
    chunk = store.seed_dir(0) / "topk_idx" / "c" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    if damage == "edit":
        data[-5] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    chunk.write_bytes(bytes(data))
    problems = store.verify()
    assert len(problems) == 1 and problems[0].startswith("seed 0 array topk_idx")


def test_manifest_check_names_the_field(tmp_path, schema):
    store = LabelStore.create(tmp_path, PROVENANCE, schema)
    store.check({"dataset.fingerprint": "abc", "schema.num_classes": 12})
    with pytest.raises(StoreError, match="dataset.fingerprint='abc'; this run needs 'xyz'"):
        store.check({"dataset.fingerprint": "xyz"})
    with pytest.raises(StoreError, match="schema.num_classes=12; this run needs 10"):
        store.check({"schema.num_classes": 10})


def test_other_format_version_and_non_store_are_refused(tmp_path, schema):
    store = LabelStore.create(tmp_path, PROVENANCE, schema)
    manifest = json.loads((store.path / MANIFEST).read_text())
    manifest["format_version"] = 99
    (store.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="format version 99"):
        LabelStore(store.path)
    with pytest.raises(StillroomError, match="not a label store"):
        LabelStore(tmp_path)


def test_seed_without_complete_marker_does_not_exist(tmp_path, schema):
    store = LabelStore.create(tmp_path, PROVENANCE, schema)
    write_seed(store, 1)
    (store.seed_dir(1) / COMPLETE).unlink()
    assert LabelStore(store.path).seeds() == []


def test_parquet_export(tmp_path, schema):
    import pyarrow.parquet as pq

    store = LabelStore.create(tmp_path, PROVENANCE, schema)
    labels = write_seed(store, 0)
    out = tmp_path / "seed0.parquet"
    assert store.export_parquet(0, out) == 1000
    table = pq.read_table(out)
    assert table.num_rows == 1000
    assert table.schema.metadata[b"stillroom.cache_key"].decode() == store.cache_key
    np.testing.assert_array_equal(np.stack(table["topk_idx"].to_numpy(zero_copy_only=False)), labels["topk_idx"])
    np.testing.assert_allclose(table["lse"].to_numpy(), labels["lse"])
