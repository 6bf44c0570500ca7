"""Two runs committing seeds of one store at once: the manifest names both seeds and both seeds' skipped ids."""

from __future__ import annotations

import threading

from test_store import PROVENANCE, fake_labels

from stillroom.pipelines.store import MANIFEST, LabelStore, StoreSchema


def write_pieces(store: LabelStore, seed: int, skipped: dict[int, str] | None = None) -> None:
    labels = fake_labels(store.schema, seed)
    store.begin_seed(seed)
    for i, (a, b) in enumerate(store.schema.pieces()):
        store.write_piece(seed, i, a, {k: v[a:b] for k, v in labels.items()}, skipped=skipped if i == 0 else None)


def test_two_commits_at_once_both_reach_the_manifest(tmp_path):
    """Run A has listed the complete seeds (its own, 0) for the manifest when run B commits seed 1 and writes its
    manifest; A writes after B. Before the fix A's write named only seed 0 and dropped B's skipped ids."""
    schema = StoreSchema(num_samples=300, num_classes=12, top_k=3, chunk_rows=128)
    run_a = LabelStore.create(tmp_path, PROVENANCE, schema)
    run_b = LabelStore(run_a.path)
    write_pieces(run_a, 0)
    write_pieces(run_b, 1, skipped={5: "cannot decode"})

    a_listed, b_done = threading.Event(), threading.Event()
    listed = run_a.seeds

    def seeds_then_wait() -> list[int]:  # A's listing of the committed seeds, held until B has committed
        seeds = listed()
        if 0 in seeds and not a_listed.is_set():
            a_listed.set()
            assert b_done.wait(30)
        return seeds

    run_a.seeds = seeds_then_wait  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def commit_a() -> None:
        try:
            run_a.commit_seed(0)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    thread = threading.Thread(target=commit_a)
    thread.start()
    assert a_listed.wait(30)
    run_b.commit_seed(1)
    assert (run_b.loc / MANIFEST).read_json()["seeds"] == [0, 1]
    b_done.set()
    thread.join(30)
    assert not thread.is_alive() and not errors

    manifest = LabelStore(run_a.path).manifest
    assert manifest["seeds"] == [0, 1]
    assert manifest["skipped"] == {"1": [5]}
