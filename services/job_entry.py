"""The one entry point the service runs as a Ray job: ``python -m services.job_entry JOB_DIR``.

``JOB_DIR`` is a path or a URL under the service's work root (``s3://bucket/prefix/jobs/<id>``: the node
that runs the job shares no volume with the service). ``JOB_DIR/spec.json`` (written by the service, never a
shell string) names the kind, one of an allowlist, and its typed spec with paths already resolved and
confined. The job writes progress to ``JOB_DIR/progress.json`` and its result (or error) to
``JOB_DIR/result.json``, each write one whole file or object, which the service reads. A local ``JOB_DIR``
also gets ``process.json``, naming the job's process and process group on this machine (a job elsewhere is
stopped through Ray's job stop, as every job is).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from stillroom.pipelines.core import JOB_ID_ENV, PROGRESS_ENV, Location, StillroomError, error_line


def run_teacher(spec: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    from stillroom.pipelines.teachers import TeacherTrainConfig, train_teacher

    return train_teacher(TeacherTrainConfig(out=job["out"], **spec))


def run_label(spec: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    from stillroom.pipelines.labeling import LabelConfig, run_labeling

    config = LabelConfig(**{**spec, "teachers": tuple(spec["teachers"]), "seeds": tuple(spec["seeds"]),
                            "store_root": job["store_root"]})
    return run_labeling(config, backend="ray")


def run_train(spec: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    from stillroom.student.config import TrainConfig
    from stillroom.student.run import train

    fields = {**spec, "store": (Location(job["store_root"]) / spec["store"]).url, "out": job["out"],
              "resume": bool(job.get("resume"))}  # a resumed attempt (``POST /v1/jobs/{id}/resume``): from last.pt
    if spec["workers"] > 1 and job["resources"]["gpus"] > 0:  # the Ray Train workers ask for the GPUs
        fields["device"] = "cuda"
    if fields.get("seeds") is not None:
        fields["seeds"] = tuple(fields["seeds"])
    return train(TrainConfig(**fields))


ENTRY_POINTS: dict[str, Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]] = {
    "teacher": run_teacher, "label": run_label, "train": run_train,
}


def main(argv: list[str]) -> int:
    job_dir = Location(argv[0])
    job = (job_dir / "spec.json").read_json()
    result_file = job_dir / "result.json"
    entry = ENTRY_POINTS.get(job["kind"])
    if entry is None:
        result_file.write_json({"ok": False, "error": f"unknown job kind {job['kind']!r}"})
        return 2
    # how the service runs the job (what its process asked Ray for) is no option of the job
    job["resources"] = job["spec"].pop("resources", {"cpus": 0, "gpus": 0})
    os.environ[PROGRESS_ENV] = (job_dir / "progress.json").url
    os.environ[JOB_ID_ENV] = job["job_id"]  # the tag of the job's Ray metrics
    if job_dir.local is not None:  # who runs this job, so that whoever stops it can check nothing of it is left
        (job_dir / "process.json").write_json({"pid": os.getpid(), "pgid": os.getpgid(0)})
    # a teacher or single-worker student trains in this process on the CPUs it asked Ray for (Ray leaves
    # OMP_NUM_THREADS=1 to an entry point); a coordinating process asked for none and computes nothing
    import torch

    torch.set_num_threads(max(1, int(job["resources"]["cpus"])))
    print(f"stillroom job {job['job_id']} ({job['kind']}): {json.dumps(job['spec'])}", flush=True)
    try:
        result = entry(job["spec"], job)
    except StillroomError as e:
        # an error raised in a Ray actor or worker: its traceback to this job's log, one line to the record
        where = ""
        if e.worker_traceback:
            print(e.worker_traceback, file=sys.stderr, flush=True)
            where = f" (traceback in the job's log: stillroom jobs logs {job['job_id']})"
        line = error_line(e) + where
        print(f"stillroom: error: {line}", file=sys.stderr, flush=True)
        result_file.write_json({"ok": False, "error": line})
        return 1
    except Exception as e:
        traceback.print_exc()
        line = f"{type(e).__name__}: {error_line(e)} (traceback in the job's log: stillroom jobs logs {job['job_id']})"
        result_file.write_json({"ok": False, "error": line})
        return 1
    print(json.dumps(result), flush=True)
    result_file.write_json({"ok": True, "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
