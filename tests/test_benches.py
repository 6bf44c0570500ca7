"""Every bench script starts and runs its smallest setting, and its last line is the JSON it promises.

A store format, option or API change that breaks a bench fails here, not months later in front of a
README figure nobody can reproduce. The figures of these tiny runs mean nothing; only the keys are checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

# script -> runs: (arguments at its smallest setting, keys its JSON line must hold); "{work}" is a fresh
# directory for the files a bench keeps between runs
RUNS: dict[str, list[tuple[list[str], set[str]]]] = {
    "store.py": [(["--smoke"], {"write_samples_per_s", "load_seed_s", "gather_samples_per_s", "bytes_per_sample",
                                "targets_met"}),
                 (["--smoke", "--samples", "2048", "--recipe", "deit"],
                  {"bytes_per_sample", "view_bytes_per_sample", "view_params", "targets_met"})],
    "store_tv.py": [(["--work", "{work}", "--model", "test_resnet", "--epochs", "1", "--train-samples", "256",
                      "--images", "256"], {"tv_t1", "tv_t4", "teacher_top1_on_views", "targets_met"})],
    "view_order.py": [(["--smoke"], {"after_s", "before_s", "chunks_per_epoch", "targets_met"})],
    "accuracy.py": [(["--dataset", "fashion-mnist:n=128", "--teacher-epochs", "1,1", "--seeds", "1",
                      "--batch-size", "64", "--augment-rows"],
                     {"teacher_top1", "top1", "store_bytes_per_sample", "minutes", "targets", "augment_recipe"}),
                    (["--dataset", "fashion-mnist:n=128", "--teacher-epochs", "1,1", "--seeds", "1", "--batch-size",
                      "64", "--rows", "cached_kd", "--recipe-rows", "--student-seeds", "0,1", "--store-formats", "2,4",
                      "--plot", "{work}/accuracy.png"],
                     {"top1_seeds", "top1_spread", "recipe_adds", "format4_minus_format2", "plot"})],
    "data.py": [(["--n", "40", "--workers", "1", "--images", "20", "--batch", "10", "--rounds", "1",
                  "--work", "{work}"],
                 {"cold_open_s", "warm_open_s", "rss_ratio_4n_over_n", "index_bytes_per_sample",
                  "views_224_per_s_per_core", "ratio_vs_torchvision", "deit_ratio_vs_timm", "targets"})],
    "labeling.py": [(["--teacher", "test_resnet", "--resolution", "28", "--samples", "128", "--batch-size", "32",
                      "--chunk-rows", "64", "--repeats", "1", "--threads", "1"],
                     {"raw_ips", "pipeline_ips", "ratio", "startup_s"}),
                    (["--data", "jpeg", "--teacher", "test_resnet", "--resolution", "32", "--samples", "24",
                      "--batch-size", "8", "--chunk-rows", "16", "--threads", "1", "--work", "{work}"],
                     {"plain_ips", "pipeline_ips", "ratio", "startup_s", "peak_pss_mb"})],
    "training.py": [(["--dataset", "fashion-mnist:n=128", "--split", "train", "--teacher", "test_resnet",
                      "--student", "test_resnet", "--steps", "2", "--batch-size", "16", "--repeats", "1"],
                     {"epoch_seconds", "cached_over_supervised", "online_over_cached", "labeling_seconds"}),
                    (["--data", "jpeg", "--images", "24", "--size", "32", "--steps", "2", "--batch-size", "8",
                      "--repeats", "1", "--loader-workers", "0", "--views-per-image", "2", "--loader-ways",
                      "--work", "{work}"],
                     {"epoch_seconds", "cached_over_supervised", "loader_over_torchvision",
                      "loader_cached_over_supervised"}),
                    (["--data", "parquet-s3", "--images", "24", "--size", "32", "--steps", "2", "--batch-size", "8",
                      "--repeats", "1", "--loader-workers", "0", "--rows-per-group", "4", "--shards", "2",
                      "--work", "{work}"],
                     {"epoch_seconds", "s3_over_disk", "s3_warm_over_disk", "s3_bytes_per_epoch",
                      "epoch_image_bytes"})],
    "parquet.py": [(["--shards", "2", "--groups", "2", "--rows-per-group", "4", "--image-kb", "4", "--batch", "4",
                     "--batches", "2", "--rounds", "1", "--work", "{work}"],
                    {"images_per_s", "staged_over_row_groups", "stage_seconds"})],
    "features.py": [(["--samples", "4096", "--chunk-rows", "512", "--batches", "4", "--shape", "8,2,2"],
                     {"feature_rows_per_s", "zarr_oindex_rows_per_s", "ours_over_zarr", "bytes_per_sample"})],
    "precision.py": [(["--imagenet-views", "1", "--margin", "15", "--threads", "1"], {"imagenet_shape", "seconds"})],
    # --bare: Ray, FastAPI, SQLAlchemy and uvicorn refused in the bench's process, as on a bare GPU machine
    "gpu.py": [(["--scale", "smoke", "--device", "cpu", "--bare", "--out", "{work}/out"],
                {"labeling_test_resnet", "labeling_test_vit", "seeds", "student", "fidelity", "teacher_train",
                 "pytest_gpu", "plots"})],
    "service.py": [(["--posts", "16", "--clients", "2", "--read-seconds", "0.5"],
                    {"submit_p50_ms", "submit_p99_ms", "posts_per_s", "healthz_p99_ms", "status_reads_per_s",
                     "target_met"})],
}
# seconds a run may take on a busy machine, where 300 is not enough (gpu.py smoke: about a minute of CPU)
TIMEOUT_S = {"gpu.py": 600}
CASES = [pytest.param(script, args, keys, id=f"{script}-{i}") for script, runs in RUNS.items()
         for i, (args, keys) in enumerate(runs)]


def test_every_bench_has_a_smallest_setting():
    scripts = {p.name for p in BENCH.glob("*.py") if not p.name.startswith("_")}
    missing = sorted(scripts - set(RUNS))
    assert not missing, f"bench scripts without a smallest setting in tests/test_benches.py RUNS: {missing}"
    assert not set(RUNS) - scripts, f"RUNS names scripts that are gone: {sorted(set(RUNS) - scripts)}"


@pytest.mark.slow
@pytest.mark.parametrize(("script", "args", "keys"), CASES)
def test_bench_runs_its_smallest_setting(script, args, keys, tmp_path):
    work = tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STILLROOM_CACHE": str(tmp_path / "cache")}
    if script == "labeling.py":  # its ray.init() starts a Ray of its own, never one a `ray start` left here
        env["RAY_ADDRESS"] = "local"
    proc = subprocess.run([sys.executable, str(BENCH / script), *(a.replace("{work}", str(work)) for a in args)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S.get(script, 300))
    assert proc.returncode == 0, f"{script} {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"{script} printed nothing"
    result = json.loads(lines[-1])
    assert isinstance(result, dict)
    assert keys <= set(result), f"{script}: its JSON line lacks {sorted(keys - set(result))}"
    # a guarded measurement records its failure (or its skip) and the run goes on: here that fails the test
    failed = {k: v for k, v in result.items() if isinstance(v, dict) and ({"error", "skipped"} & set(v))}
    assert not failed, f"{script}: measurements failed or skipped: {failed}"
