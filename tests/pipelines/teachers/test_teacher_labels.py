"""Teachers as users bring them, through the label job: a hub teacher of a superset of the classes labels through
a class map (in the cache key), each teacher's preprocessing said and stored, the compute dtype keyed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from hub_cache import HUB_ID

from stillroom.pipelines.core import UsageError
from stillroom.pipelines.labeling import LabelConfig, run_labeling
from stillroom.pipelines.store import LabelStore

RGB = "synthetic:n=64,classes=4,size=16,channels=3"


def _config(tmp_path: Path, **kw) -> LabelConfig:
    base = dict(dataset=RGB, teachers=(HUB_ID,), store_root=str(tmp_path / "stores"), batch_size=64, chunk_rows=64,
                teacher_input_size=32, class_map=str(tmp_path / "map.txt"), top_k=3)
    return LabelConfig(**{**base, **kw})


def test_the_label_command_says_and_stores_each_teachers_preprocessing(offline_hub, tmp_path):
    (tmp_path / "map.txt").write_text("7\n300\n281\n999\n")
    run = run_cli("label", "--dataset", RGB, "--teacher", HUB_ID, "--class-map",
                  str(tmp_path / "map.txt"), "--teacher-input-size", "32", "--teacher-mean", "0.45",
                  "--store-root", str(tmp_path / "stores"), "--batch-size", "64", "--chunk-rows", "64",
                  "--top-k", "3", "--no-ray")
    assert run.returncode == 0, run.stderr[-3000:]
    said = ("teacher test_resnet.r160_in1k (pretrained): input 32 px, mean 0.45,0.45,0.45, std 0.5,0.5,0.5, "
            "interpolation bilinear, crop_pct 0.95, fp32, classes mapped 4 of 1000; preprocessing from options "
            "(mean, resolution); the rest from timm pretrained_cfg of test_resnet.r160_in1k")
    assert said in run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    expected = {"resolution": 32, "mean": [0.45] * 3, "std": [0.5] * 3, "in_chans": 3, "interpolation": "bilinear",
                "crop_pct": 0.95}
    assert result["teachers"][0]["preprocess"] == expected and result["teachers"][0]["dtype"] == "fp32"
    store = LabelStore(result["store"])
    teacher = store.provenance["teachers"][0]
    assert teacher["preprocess"] == expected
    assert teacher["class_map"] == {"teacher_classes": 1000, "indices": [7, 300, 281, 999]}
    assert store.provenance["labels"]["dtype"] == "fp32"
    assert store.manifest["sources"]["preprocess_from"][0].startswith("options (mean, resolution)")
    hard = store.load(0).arrays["hard"]
    assert hard.min() >= 0 and hard.max() < 4  # the dataset's classes, not the teacher's 1000


def test_the_class_map_and_the_dtype_are_in_the_cache_key(offline_hub, tmp_path):
    with pytest.raises(UsageError, match=r"predicts 1000 classes \(timm's pretrained_cfg num_classes\); the dataset "
                                         r"has 4"):
        run_labeling(_config(tmp_path, class_map=None), backend="local", progress=False)
    assert not (tmp_path / "stores").exists() or not list((tmp_path / "stores").iterdir())
    (tmp_path / "map.txt").write_text("7\n300\n281\n999\n")
    fp32 = run_labeling(_config(tmp_path), backend="local", progress=False)
    (tmp_path / "map.txt").write_text("7\n300\n999\n281\n")
    other_map = run_labeling(_config(tmp_path), backend="local", progress=False)
    (tmp_path / "map.txt").write_text("7\n300\n281\n999\n")
    bf16 = run_labeling(_config(tmp_path, teacher_dtype="bf16"), backend="local", progress=False)
    assert len({fp32["cache_key"], other_map["cache_key"], bf16["cache_key"]}) == 3
    assert not bf16["cache_hit"] and LabelStore(bf16["store"]).provenance["labels"]["dtype"] == "bf16"
    a, b = LabelStore(fp32["store"]).load(0).arrays, LabelStore(bf16["store"]).load(0).arrays
    assert not np.array_equal(a["lse"], b["lse"])  # bf16 autocast ran on the CPU: other (close) numbers
    np.testing.assert_allclose(a["lse"], b["lse"], atol=0.1)
    again = run_labeling(_config(tmp_path), backend="local", progress=False)
    assert again["cache_hit"] and again["cache_key"] == fp32["cache_key"]


# --- a teacher of another input size sees its input rendered at that size from the source image

# how far a stored top-k logit may be from the teacher's: format 3's 8-bit codes of the gaps to the top-1 (the k-th
# gap to 1.5 %: a few thousandths of a nat for these small gaps; pipelines/store/codec.py)
STORED = 5e-3


def _store_logits(result: dict) -> np.ndarray:
    arrays = LabelStore(result["store"]).load(0).arrays
    return arrays["topk_logit"].astype(np.float32), arrays["topk_idx"]


def test_a_teacher_of_another_input_size_sees_the_source_at_its_size(tmp_path, decodes):
    import torch
    from conftest import make_teacher
    from image_data import write_image_folder

    from stillroom.pipelines.data import load_dataset
    from stillroom.pipelines.teachers import load_teacher
    from stillroom.pipelines.views import draw_views, get_recipe, mix_views, render_batch, render_views

    folder = write_image_folder(tmp_path / "jpegs", train=32, val=4)
    big = make_teacher(tmp_path / "big.pt", in_chans=3, resolution=40)  # the views are 16 px, the teacher's 40
    small = make_teacher(tmp_path / "small.pt", in_chans=3, resolution=16, seed=1)
    recipe = "imagenet-rrc:size=16"
    result = run_labeling(LabelConfig(dataset=f"imagefolder:{folder}", teachers=(big,), recipe=recipe, top_k=3,
                                      chunk_rows=32, batch_size=32, store_root=str(tmp_path / "s"),
                                      decode_workers=0), backend="local", progress=False)
    ds = load_dataset(f"imagefolder:{folder}", "train")
    ids = np.arange(len(ds))
    params = draw_views(get_recipe(recipe), 0, ids, len(ds), ds.sizes)
    teacher = load_teacher(big, 4)
    with torch.inference_mode():
        own = teacher.logits(render_views(ds, ids, params[:, 0:5], 40, draft=True).float() / 255.0).float()
        upsampled = teacher.logits(mix_views(*render_batch(ds, ids, params, 16, True), params)).float()
    stored, idx = _store_logits(result)
    expected = own.topk(3, dim=-1)
    np.testing.assert_array_equal(idx, expected.indices.numpy())
    np.testing.assert_allclose(stored, expected.values.numpy(), rtol=0, atol=STORED)
    assert not np.allclose(stored, upsampled.topk(3, dim=-1).values.numpy(), rtol=0, atol=STORED)
    assert LabelStore(result["store"]).provenance["labels"]["teacher_input"].startswith("rendered from the source")
    # an ensemble of a 40 px and a 16 px teacher: each image is decoded once for both sizes, twice where the two
    # sizes take their crop at two DCT scales (a JPEG whose crop spans 32 px or more: 1/2 scale for 16 px, full
    # for 40), and the 16 px teacher sees exactly the student's view
    from io import BytesIO

    from PIL import Image

    from stillroom.pipelines.views import draft_scale

    jpeg = [Image.open(BytesIO(data)).format == "JPEG" for data, _ in ds.encoded(ids)]
    twice = sum(j and draft_scale(tuple(p[2:4]), tuple(hw), 16) != draft_scale(tuple(p[2:4]), tuple(hw), 40)
                for j, p, hw in zip(jpeg, params, ds.sizes, strict=True))
    assert twice > 0
    decodes[0] = 0
    pair = run_labeling(LabelConfig(dataset=f"imagefolder:{folder}", teachers=(big, small), recipe=recipe, top_k=3,
                                    chunk_rows=32, batch_size=32, store_root=str(tmp_path / "s"), per_teacher=True,
                                    decode_workers=0), backend="local", progress=False)
    assert decodes[0] == len(ds) + twice
    arrays = LabelStore(pair["store"]).load(0).arrays
    with torch.inference_mode():
        student_view = mix_views(*render_batch(ds, ids, params, 16, True), params)
        direct = load_teacher(small, 4).logits(student_view).float().topk(3, dim=-1)
    np.testing.assert_array_equal(arrays["teacher0_topk_idx"], idx)
    np.testing.assert_array_equal(arrays["teacher1_topk_idx"], direct.indices.numpy())


def test_an_in_memory_teacher_of_another_size_gets_the_boxes_at_its_size(tmp_path):
    import torch
    from conftest import SYNTHETIC, make_teacher

    from stillroom.pipelines.data import load_dataset
    from stillroom.pipelines.teachers import load_teacher
    from stillroom.pipelines.views import apply_views, draw_views, get_recipe

    spec = make_teacher(tmp_path / "t.pt", resolution=24)  # the synthetic images are 16 px
    result = run_labeling(LabelConfig(dataset=SYNTHETIC, teachers=(spec,), recipe="fmnist-rrc", top_k=3,
                                      chunk_rows=256, store_root=str(tmp_path / "s")), backend="local",
                          progress=False)
    ds = load_dataset(SYNTHETIC, "train")
    ids = np.arange(len(ds))
    params = draw_views(get_recipe("fmnist-rrc"), 0, ids, len(ds), (16, 16))
    with torch.inference_mode():
        expected = load_teacher(spec, 4).logits(apply_views(ds.read(ids), params, 24)).float().topk(3, dim=-1)
    stored, idx = _store_logits(result)
    np.testing.assert_array_equal(idx, expected.indices.numpy())
    np.testing.assert_allclose(stored, expected.values.numpy(), rtol=0, atol=STORED)


def test_views_at_several_sizes_decode_once_per_dct_scale_and_match_views_alone(decodes):
    from image_data import jpeg_bytes

    from stillroom.pipelines.views import decode_view, decode_views, draft_scale

    data = jpeg_bytes(480, 320)
    box = np.array([0.0, 0.0, 1.0, 1.0, 1.0])
    sizes = [56, 80, 200]  # DCT scales 4, 4 and 1 of a 480 x 320 image's whole box
    assert [draft_scale((1.0, 1.0), (480, 320), s) for s in sizes] == [4, 4, 1]
    decodes[0] = 0
    together = decode_views(data, "x", [(box, s) for s in sizes], draft=True)
    assert decodes[0] == 2  # scale 4 for the two small views, a full decode for the large one
    for size, view in zip(sizes, together, strict=True):
        np.testing.assert_array_equal(view, decode_view(data, "x", box, size, draft=True))


def test_a_label_spec_takes_the_preprocessing_and_confines_the_class_map(tmp_path):
    from stillroom.services.specs import SPECS, PathOutsideRoots, confined_spec

    (tmp_path / "map.txt").write_text("0\n1\n")
    body = {"teachers": ["test_resnet"], "teacher_mean": [0.5, 0.5, 0.5], "teacher_interpolation": "bicubic",
            "class_map": str(tmp_path / "map.txt"), "teacher_dtype": "bf16"}
    resolved = confined_spec("label", SPECS["label"].model_validate_json(json.dumps(body)), (tmp_path,), tmp_path)
    config = LabelConfig(**{**resolved, "teachers": tuple(resolved["teachers"]), "seeds": tuple(resolved["seeds"])})
    assert config.teacher_mean == (0.5, 0.5, 0.5) and config.class_map == str((tmp_path / "map.txt").resolve())
    assert config.compute_dtype == "bf16" and config.preprocess_overrides()["interpolation"] == "bicubic"
    with pytest.raises(PathOutsideRoots):
        confined_spec("label", SPECS["label"].model_validate_json(json.dumps({**body, "class_map": "/etc/hostname"})),
                      (tmp_path,), tmp_path)


def test_several_seeds_in_one_pass_decode_each_image_once_for_all(tmp_path, decodes):
    from io import BytesIO

    from conftest import make_teacher
    from image_data import write_image_folder
    from PIL import Image

    from stillroom.pipelines.data import load_dataset
    from stillroom.pipelines.views import draft_scale, draw_views, get_recipe

    folder = write_image_folder(tmp_path / "jpegs", train=32, val=4)
    teacher = make_teacher(tmp_path / "t.pt", in_chans=3, resolution=24)
    recipe, seeds = "imagenet-rrc:size=24", (0, 1, 2)

    def label(root: str, seed_list: tuple[int, ...]) -> dict:
        return run_labeling(LabelConfig(dataset=f"imagefolder:{folder}", teachers=(teacher,), recipe=recipe, top_k=3,
                                        seeds=seed_list, chunk_rows=16, batch_size=24, store_root=str(tmp_path / root),
                                        decode_workers=0), backend="local", progress=False)

    ds = load_dataset(f"imagefolder:{folder}", "train")
    ids = np.arange(len(ds))
    jpeg = [Image.open(BytesIO(data)).format == "JPEG" for data, _ in ds.encoded(ids)]
    scales = [[draft_scale(tuple(p[2:4]), tuple(hw), 24) if j else 1 for p, hw, j in
               zip(draw_views(get_recipe(recipe), seed, ids, len(ds), ds.sizes), ds.sizes, jpeg, strict=True)]
              for seed in seeds]
    distinct = sum(len({scales[k][i] for k in range(len(seeds))}) for i in ids)  # (image, DCT scale) pairs
    decodes[0] = 0
    together = label("one-pass", seeds)
    one_pass = decodes[0]
    decodes[0] = 0
    alone = {seed: label(f"seed{seed}", (seed,)) for seed in seeds}
    assert one_pass == distinct < decodes[0] == len(seeds) * len(ds)
    assert together["views"] == len(seeds) * len(ds) and together["seeds_computed"] == list(seeds)
    store = LabelStore(together["store"])
    assert store.verify() == [] and store.seeds() == list(seeds)
    for seed in seeds:  # the same views and labels as one seed at a time (the teacher's batches hold other rows)
        a, b = store.load(seed).arrays, LabelStore(alone[seed]["store"]).load(seed).arrays
        views = store.view_record(seed)["views"], LabelStore(alone[seed]["store"]).view_record(seed)["views"]
        assert views[0]["chunk_sha256"] == views[1]["chunk_sha256"]  # format 3: the views' digests, chunk by chunk
        np.testing.assert_array_equal(a["topk_idx"], b["topk_idx"])
        np.testing.assert_allclose(a["topk_logit"].astype(np.float32), b["topk_logit"].astype(np.float32),
                                   rtol=2e-3, atol=2e-3)
