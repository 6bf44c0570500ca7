"""Where label workers decode JPEGs (issue 32, item 3): PIL by default, GPU teachers included, so a store's views are
the ones students replay; torchvision's decoder and ``roi_align`` (nvJPEG on CUDA; the same calls on the CPU here)
only when asked, then in the store's key, and a student replaying that store is told in one line."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import make_teacher
from image_data import write_image_folder

from stillroom.pipelines.labeling import LabelConfig, Labeler, prepare_store
from stillroom.pipelines.store import LabelStore

RECIPE = "imagenet-rrc:size=24"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("jpegs"), train=32, val=4)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    return make_teacher(tmp_path_factory.mktemp("t") / "t.pt", in_chans=3, resolution=24)


def config(folder, teacher, root, **kw) -> LabelConfig:
    return LabelConfig(**{"dataset": f"imagefolder:{folder}", "teachers": (teacher,), "recipe": RECIPE,
                          "seeds": (0,), "top_k": 3, "chunk_rows": 16, "batch_size": 16, "store_root": str(root),
                          **kw})


def label_seed(cfg: LabelConfig) -> LabelStore:
    """Label seed 0 in this process, on the CPU, as a worker does (``decode="gpu"``: torchvision's decoder and
    roi_align on the CPU, the stand-in for nvJPEG on CUDA)."""
    store = prepare_store(cfg)
    labeler = Labeler(cfg, str(store.path), "cpu", decode_workers=0)
    store.begin_seed(0)
    for piece, (a, b) in enumerate(store.schema.pieces()):
        labeler.label_piece(0, piece, a, b)
    store.commit_seed(0)
    return store


def test_gpu_workers_decode_with_pil_unless_asked(folder, teacher, tmp_path):
    """``--gpus-per-worker 1`` with the default (or ``auto``, as older configs say) decodes with PIL: the store of
    a CPU run, its key and its views; its decode processes take all the worker's CPUs but one."""
    cpu = config(folder, teacher, tmp_path)
    for decode in (None, "auto", "cpu"):
        on_gpu = config(folder, teacher, tmp_path, gpus_per_worker=1, **({"decode": decode} if decode else {}))
        assert on_gpu.decode_on == "cpu" and on_gpu.decode_processes(16) == 15
        store = prepare_store(on_gpu)
        assert "decode" not in store.provenance["labels"] and store.cache_key == prepare_store(cpu).cache_key
    assert cpu.decode_processes(16) == 4  # a CPU teacher keeps most cores for its threads
    asked = config(folder, teacher, tmp_path, gpus_per_worker=1, decode="gpu")
    assert asked.decode_on == "gpu"
    assert prepare_store(asked).provenance["labels"]["decode"] == "torchvision.io.decode_jpeg+roi_align"
    assert prepare_store(asked).cache_key != prepare_store(cpu).cache_key


def test_a_student_replaying_gpu_decoded_views_is_told(folder, teacher, tmp_path, capsys, caplog):
    from stillroom import ReplayDataset
    from stillroom.student.config import TrainConfig
    from stillroom.student.data import replay_note
    from stillroom.student.run import train

    pil = label_seed(config(folder, teacher, tmp_path / "pil"))
    gpu = label_seed(config(folder, teacher, tmp_path / "gpu", gpus_per_worker=1, decode="gpu"))
    pil_labels, gpu_labels = pil.load(0).arrays, gpu.load(0).arrays
    assert pil.view_record(0)["views"]["sha256"] == gpu.view_record(0)["views"]["sha256"]  # the same views' parameters,
    assert not np.array_equal(pil_labels["lse"], gpu_labels["lse"])  # other pixels: other teacher outputs
    assert replay_note(pil) is None
    note = replay_note(gpu)
    assert note is not None and "\n" not in note
    assert note.startswith(f"store {gpu.cache_key} was labeled on views decoded by torchvision.io.decode_jpeg")

    for store, told in ((pil, False), (gpu, True)):
        capsys.readouterr()
        metrics = train(TrainConfig(store=str(store.path), dataset=f"imagefolder:{folder}", student="test_resnet",
                                    loss="kd", out=str(tmp_path / f"run-{told}"), epochs=1, batch_size=16,
                                    max_steps=1, eval_limit=8, loader_workers=0, progress=False))
        assert np.isfinite(metrics["losses"]["loss"])
        said = [line for line in capsys.readouterr().err.splitlines() if "decoded by" in line]
        assert said == ([f"stillroom: note: {note}"] if told else [])
    with caplog.at_level(logging.WARNING, logger="stillroom.student"):
        ReplayDataset(gpu)
    assert [r.getMessage() for r in caplog.records if "decoded by" in r.getMessage()] == [note]
