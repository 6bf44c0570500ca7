"""An image that fails to decode inside a Ray label actor reaches the person as one line, cause first; Ray's
traceback goes to the job's log (a file the CLI names; the Ray job's output for a service job); the pieces
labeled before it are kept. A real local Ray (the shared cluster) and a real JPEG folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_teacher
from image_data import scramble, write_image_folder

from stillroom.pipelines.core import DataError, error_line
from stillroom.pipelines.data import load_dataset
from stillroom.pipelines.labeling import LabelConfig, run_labeling
from stillroom.pipelines.store import LabelStore, list_stores

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def broken(tmp_path):
    """A 48-image folder whose image in the last of three 16-image pieces decodes to an error; its path."""
    folder = write_image_folder(tmp_path / "pets", train=48, val=4)
    bad = load_dataset(f"imagefolder:{folder}").path(40)  # ids are sorted by class: a dog in the last piece
    scramble(bad)
    teacher = make_teacher(tmp_path / "t.pt", in_chans=3, resolution=24)
    config = LabelConfig(dataset=f"imagefolder:{folder}", teachers=(teacher,), recipe="imagenet-rrc:size=24",
                         seeds=(0,), top_k=3, chunk_rows=16, batch_size=16, num_workers=1, decode_workers=1,
                         store_root=str(tmp_path / "stores"))
    return config, bad


def test_a_decode_failure_in_a_label_actor_is_one_line_and_keeps_the_pieces_done(broken, ray_cluster):
    config, bad = broken
    with pytest.raises(DataError) as caught:
        run_labeling(config, backend="ray", progress=False)
    line = error_line(caught.value)
    assert line.startswith("DataError: ") and f"{bad.name}: cannot decode" in line and "\n" not in line, line
    assert "\x1b[" not in line and "ray::" not in line
    tb = caught.value.worker_traceback or ""
    assert "Traceback" in tb and "LabelWorker" in tb and "\x1b[" not in tb  # Ray's, for the log, plain text
    [store] = list_stores(config.store_root)
    assert LabelStore(store.path).done_pieces(0) == {0, 1}  # the pieces before the bad image's are kept
    assert LabelStore(store.path).seeds() == []


def test_a_service_job_records_the_line_and_logs_the_traceback(broken, ray_cluster, tmp_path, capsys):
    from stillroom.services.job_entry import main

    config, bad = broken
    job_dir = tmp_path / "jobs" / "job_x"
    job_dir.mkdir(parents=True)
    spec = {k: v for k, v in config.__dict__.items() if k != "store_root"}
    spec.update(teachers=list(config.teachers), seeds=list(config.seeds))
    (job_dir / "spec.json").write_text(json.dumps({"job_id": "job_x", "kind": "label", "spec": spec,
                                                   "store_root": config.store_root}))
    assert main([str(job_dir)]) == 1
    error = json.loads((job_dir / "result.json").read_text())["error"]
    assert error.startswith("DataError: ") and f"{bad.name}: cannot decode" in error and "\n" not in error
    assert error.endswith("(traceback in the job's log: stillroom jobs logs job_x)")
    log = capsys.readouterr().err  # the Ray job's output, which `stillroom jobs logs` shows
    assert "Traceback" in log and f"stillroom: error: {error}" in log


def test_the_cli_prints_one_line_naming_the_traceback_file(broken, ray_cluster, capsys):
    from stillroom.services.cli import main

    config, bad = broken
    code = main(["label", "--dataset", config.dataset, "--teacher", config.teachers[0], "--recipe", config.recipe,
                 "--seeds", "0", "--top-k", "3", "--chunk-rows", "16", "--batch-size", "16", "--num-workers", "1",
                 "--store-root", config.store_root])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("stillroom: error: ")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("stillroom: error: DataError: ") and f"{bad.name}: cannot decode" in lines[0]
    log = Path(lines[0].rsplit("(traceback: ", 1)[1].rstrip(")"))
    assert "Traceback" in log.read_text() and "cannot decode" in log.read_text()
