"""The ``stillroom store`` commands (run in-process: ``run_cli``; test_packaging runs the installed script)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import needs_fmnist
from conftest import run_cli as run
from test_store import PROVENANCE, fake_labels, write_seed

from stillroom.pipelines.store import LabelStore, StoreSchema


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stores")
    store = LabelStore.create(root, PROVENANCE, StoreSchema(num_samples=300, num_classes=12, top_k=3, chunk_rows=128))
    write_seed(store, 0)
    write_seed(store, 2)
    return store.path


def test_store_ls_inspect_verify_export(store_dir, tmp_path):
    ls = run("store", "ls", str(store_dir.parent))
    assert ls.returncode == 0 and store_dir.name in ls.stdout and "seeds=[0, 2]" in ls.stdout
    info = run("store", "inspect", str(store_dir), "--json")
    assert info.returncode == 0
    described = json.loads(info.stdout)
    assert described["seeds"] == [0, 2] and described["samples"] == 300 and described["top_k"] == 3
    assert 0 < described["per_seed"]["0"]["bytes_per_sample"] < 200
    text = run("store", "inspect", str(store_dir))
    assert "bytes/sample" in text.stdout and described["cache_key"] in text.stdout
    ok = run("store", "verify", str(store_dir))
    assert ok.returncode == 0 and "every checksum matches" in ok.stdout
    out = tmp_path / "s2.parquet"
    exported = run("store", "export", str(store_dir), "--seed", "2", "--out", str(out))
    assert exported.returncode == 0 and json.loads(exported.stdout)["rows"] == 300 and out.exists()


def test_verify_exits_1_naming_seed_and_array(tmp_path):
    schema = StoreSchema(num_samples=300, num_classes=12, top_k=3, chunk_rows=128)
    store = LabelStore.create(tmp_path, PROVENANCE, schema)
    write_seed(store, 0)
    chunk = store.seed_dir(0) / "lse" / "c" / "1"
    chunk.write_bytes(chunk.read_bytes()[:-7] + b"garbage")
    bad = run("store", "verify", str(store.path))
    assert bad.returncode == 1
    assert "seed 0 array lse" in bad.stderr and "Traceback" not in bad.stderr


def test_expected_errors_are_one_line_without_traceback(tmp_path):
    missing = run("store", "inspect", str(tmp_path))
    assert missing.returncode == 1 and "not a label store" in missing.stderr and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    unknown = run("view", "show", "--dataset", "synthetic", "--recipe", "nope", "--out", str(tmp_path / "g.png"))
    assert unknown.returncode == 2 and "unknown view recipe 'nope'" in unknown.stderr
    usage = run("store", "export", str(tmp_path))  # --seed missing: argparse's usage error
    assert usage.returncode == 2
    out_of_range = run("view", "show", "--dataset", "synthetic:n=10", "--ids", "3,10", "--out", str(tmp_path / "g.png"))
    assert out_of_range.returncode == 2 and "out of range" in out_of_range.stderr
    assert not (tmp_path / "g.png").exists()


@needs_fmnist
def test_view_show_on_fashion_mnist(tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    shown = run("view", "show", "--dataset", "fashion-mnist", "--recipe", "fmnist-rrc-mix", "--seed", "1",
                "--ids", "0,1,2", "--out", str(out))
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["ids"] == [0, 1, 2]
    img = Image.open(out)
    assert img.width > img.height / 3 and img.height >= 3 * 28  # three rows of original | view


def test_ls_verify_inspect_name_the_seed_a_killed_run_left_partial(tmp_path):
    schema = StoreSchema(num_samples=300, num_classes=12, top_k=3, chunk_rows=64)  # 5 pieces
    store = LabelStore.create(tmp_path, PROVENANCE, schema)
    write_seed(store, 0)
    labels = fake_labels(schema, 1)
    store.begin_seed(1)  # a run that wrote two of seed 1's five pieces, then died before commit_seed
    for i in (0, 3):
        a, b = schema.pieces()[i]
        store.write_piece(1, i, a, {k: v[a:b] for k, v in labels.items()})
    assert LabelStore(store.path).partial_seeds() == {1: (2, 5)}
    ls = run("store", "ls", str(tmp_path))
    assert ls.returncode == 0 and "seeds=[0]" in ls.stdout and "seed 1 partial: 2 of 5 pieces done" in ls.stdout
    verify = run("store", "verify", str(store.path))
    assert verify.returncode == 0, verify.stderr
    assert "seeds [0], every checksum matches" in verify.stdout
    assert "seed 1 partial: 2 of 5 pieces done" in verify.stdout
    inspect = run("store", "inspect", str(store.path))
    assert "seed 1 partial: 2 of 5 pieces done" in inspect.stdout
    described = json.loads(run("store", "inspect", str(store.path), "--json").stdout)
    assert described["seeds"] == [0] and described["partial_seeds"] == {"1": {"pieces_done": 2, "pieces": 5}}
    store.begin_seed(2)  # begun, nothing written yet
    assert LabelStore(store.path).partial_seeds() == {1: (2, 5), 2: (0, 5)}
