"""Labeling as a stream on images on disk: views decoded by worker processes ahead of the teacher give the
same store as views built in the labeling thread, and the labels equal a direct forward on the replayed
views; GPU-side decoding agrees with PIL's views; per-node resources and the GPU request that refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import make_teacher
from image_data import write_image_folder

from stillroom.pipelines.core import UsageError
from stillroom.pipelines.data import load_dataset
from stillroom.pipelines.labeling import LabelConfig, decode_views_torch, run_labeling
from stillroom.pipelines.store import LabelStore, check_views
from stillroom.pipelines.teachers import load_teacher
from stillroom.pipelines.views import build_views, draw_views, get_recipe, render_views

RECIPE = "imagenet-rrc:size=24"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("jpegs"), train=96, val=4)


@pytest.fixture(scope="module")
def rgb_teacher(tmp_path_factory) -> str:
    return make_teacher(tmp_path_factory.mktemp("rgb") / "t.pt", in_chans=3, resolution=24)


def label_config(folder, teacher, root, **kw) -> LabelConfig:
    fields = {"dataset": f"imagefolder:{folder}", "teachers": (teacher,), "recipe": RECIPE, "seeds": (0,),
              "top_k": 3, "chunk_rows": 32, "batch_size": 16, "store_root": str(root), **kw}
    return LabelConfig(**fields)


def sums(store_path: str) -> dict[str, str]:
    record = json.loads((LabelStore(store_path).seed_dir(0) / "COMPLETE").read_text())
    return {name: a["sha256"] for name, a in record["arrays"].items()}


def test_decode_processes_give_the_store_of_an_in_thread_run(tmp_path, folder, rgb_teacher):
    streamed = run_labeling(label_config(folder, rgb_teacher, tmp_path / "a", decode_workers=2), backend="local",
                            progress=False)
    in_thread = run_labeling(label_config(folder, rgb_teacher, tmp_path / "b", decode_workers=0), backend="local",
                             progress=False)
    assert streamed["cache_key"] == in_thread["cache_key"] and streamed["views"] == 96
    assert sums(streamed["store"]) == sums(in_thread["store"])
    store = LabelStore(streamed["store"])
    assert store.verify() == []
    labels = store.load(0).arrays
    ds = load_dataset(f"imagefolder:{folder}")
    views, params = build_views(ds, get_recipe(RECIPE), 0, np.arange(96))  # format 3: drawn again, as a reader does
    assert check_views(store.view_record(0), "store", get_recipe(RECIPE), 0, 96, store.schema.chunk_rows, ds.sizes,
                       full=True) == 96
    with torch.inference_mode():
        logits = load_teacher(rgb_teacher, 4).logits(views).float()
    np.testing.assert_array_equal(labels["hard"], logits.argmax(-1).numpy())
    np.testing.assert_allclose(labels["lse"], torch.logsumexp(logits, -1).numpy(), rtol=2**-11, atol=1e-4)


def test_torchvision_decode_agrees_with_the_pil_views(folder):
    ds = load_dataset(f"imagefolder:{folder}")
    ids = np.arange(48)
    params = draw_views(get_recipe("imagenet-rrc:size=32"), 0, ids, len(ds), ds.sizes)
    pil = render_views(ds, ids, params[:, 0:5], 32, draft=False).float()
    tv = decode_views_torch(ds.encoded(ids), params[:, 0:5], 32, "cpu").float()
    assert tv.shape == pil.shape == (48, 3, 32, 32)
    # two decoders and two resampling filters: close, not equal (grayscale, CMYK and PNG files included)
    assert (tv - pil).abs().mean() < 4.0, (tv - pil).abs().mean()
    flipped = params.copy()
    flipped[:, 4] = 1 - flipped[:, 4]
    other = decode_views_torch(ds.encoded(ids), flipped[:, 0:5], 32, "cpu")
    np.testing.assert_array_equal(other.flip(-1).numpy(), tv.to(torch.uint8).numpy())


def test_cpus_are_counted_per_node():
    from stillroom.pipelines.labeling.ray_pool import cpus_per_worker  # imports Ray: not at the top (gpu.py)

    assert cpus_per_worker([8, 8], 2) == 8  # one worker a node, each with the node's CPUs (not 16)
    assert cpus_per_worker([8, 8], 4) == 4
    assert cpus_per_worker([2], 4) == 1
    assert cpus_per_worker([16, 4], 2) == 4  # sized for the smallest node: it fits anywhere
    with pytest.raises(UsageError, match="no node with CPUs"):
        cpus_per_worker([], 1)


@pytest.mark.ray
def test_a_gpu_request_waits_then_refuses_rather_than_labeling_on_cpus(tmp_path, folder, rgb_teacher, ray_cluster):
    cfg = label_config(folder, rgb_teacher, tmp_path / "stores", gpus_per_worker=1, gpu_wait_s=1.5)
    with pytest.raises(UsageError, match=r"1 GPUs needed, the Ray cluster has 0 after waiting 1.5 s"):
        run_labeling(cfg, backend="ray", progress=False)
    store = next((tmp_path / "stores").iterdir())
    assert LabelStore(store).seeds() == [] and LabelStore(store).done_pieces(0) == set()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_labeling_decodes_on_the_gpu_and_agrees_with_cpu_labels(tmp_path, folder, rgb_teacher):
    from stillroom.pipelines.labeling import Labeler, prepare_store

    ds = load_dataset(f"imagefolder:{folder}")
    ids = np.arange(48)
    params = draw_views(get_recipe("imagenet-rrc:size=32"), 0, ids, len(ds), ds.sizes)
    on_gpu = decode_views_torch(ds.encoded(ids), params[:, 0:5], 32, "cuda")
    assert on_gpu.is_cuda and on_gpu.dtype == torch.uint8
    on_cpu = decode_views_torch(ds.encoded(ids), params[:, 0:5], 32, "cpu")
    assert (on_gpu.cpu().float() - on_cpu.float()).abs().mean() < 2.0  # nvJPEG against libjpeg-turbo

    gpu_cfg = label_config(folder, rgb_teacher, tmp_path / "gpu", gpus_per_worker=1, decode="gpu")
    cpu_cfg = label_config(folder, rgb_teacher, tmp_path / "cpu")
    assert gpu_cfg.decode_on == "gpu" and cpu_cfg.decode_on == "cpu"
    gpu_store, cpu_store = prepare_store(gpu_cfg), prepare_store(cpu_cfg)
    assert gpu_store.provenance["labels"]["decode"].startswith("torchvision") and gpu_store.path != cpu_store.path
    on_cuda = Labeler(gpu_cfg, str(gpu_store.path), "cuda").label(0, np.arange(96))
    on_cpu_labels = Labeler(cpu_cfg, str(cpu_store.path), "cpu", decode_workers=0).label(0, np.arange(96))
    np.testing.assert_array_equal(on_cuda["view"], on_cpu_labels["view"])
    assert np.isfinite(on_cuda["lse"]).all()
    # bf16 and slightly other pixels: mostly the same class (4 classes: chance is 0.25)
    assert (on_cuda["hard"] == on_cpu_labels["hard"]).mean() >= 0.7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_ray_labels_on_this_process_gpu(tmp_path, folder, rgb_teacher):
    """``stillroom label --no-ray --gpus-per-worker 1``: the teacher runs on this process's GPU, the JPEGs decoded
    there, and the store replays the views a CPU run draws."""
    gpu = run_labeling(label_config(folder, rgb_teacher, tmp_path / "gpu", gpus_per_worker=1, teacher_dtype="bf16",
                                    decode="gpu"), backend="local", progress=False)
    cpu = run_labeling(label_config(folder, rgb_teacher, tmp_path / "cpu"), backend="local", progress=False)
    assert gpu["views"] == 96 and gpu["cache_key"] != cpu["cache_key"]
    store = LabelStore(gpu["store"])
    assert store.provenance["labels"]["decode"].startswith("torchvision") and store.verify() == []
    on_gpu, on_cpu = store.load(0).arrays, LabelStore(cpu["store"]).load(0).arrays
    assert np.isfinite(on_gpu["lse"]).all() and on_gpu["topk_idx"].shape == on_cpu["topk_idx"].shape == (96, 3)
    assert (on_gpu["hard"] == on_cpu["hard"]).mean() >= 0.7  # bf16 and nvJPEG's pixels: mostly the same class


MEMORY = textwrap.dedent("""
    import json, resource, sys
    from stillroom.pipelines.labeling import LabelConfig, run_labeling
    cfg = LabelConfig(dataset="imagefolder:" + sys.argv[1], teachers=(sys.argv[2],), recipe="imagenet-rrc:size=24",
                      seeds=(0,), top_k=3, chunk_rows=64, batch_size=32, store_root=sys.argv[3], decode_workers=1)
    result = run_labeling(cfg, backend="local", progress=False)
    print(json.dumps({"views": result["views"], "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


@pytest.mark.slow
def test_labeling_four_times_the_images_does_not_raise_peak_memory(tmp_path, rgb_teacher):
    peaks = {}
    for n in (128, 512):
        data = write_image_folder(tmp_path / f"d{n}", train=n, val=4)
        run = subprocess.run([sys.executable, "-c", MEMORY, str(data), rgb_teacher, str(tmp_path / f"s{n}")],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr[-2000:]
        out = json.loads(run.stdout.strip().splitlines()[-1])
        assert out["views"] == n
        peaks[n] = out["rss_kb"]
    assert peaks[512] <= 1.1 * peaks[128], peaks
