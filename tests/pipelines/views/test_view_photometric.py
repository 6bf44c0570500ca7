"""Photometric ops as stored view parameters: RandAugment, colour jitter and random erasing drawn per view from its
counter-based stream, stored in the ``view`` array and replayed bit-identically by any process and batch order;
the rendered ops are ``pipelines._photometric``'s (checked against timm in test_photometric.py) and torchvision's;
a store labeled with ``deit:size=32`` on JPEGs trains a student; older recipes keep their columns and digests."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SYNTHETIC, make_teacher
from image_data import write_image_folder
from PIL import Image

from stillroom.pipelines.core import UsageError
from stillroom.pipelines.data import load_dataset
from stillroom.pipelines.views import (
    COL,
    NUM_VIEW_PARAMS,
    PIXEL_OPS,
    VIEW_COLUMNS,
    ColorJitterPolicy,
    RandAugmentPolicy,
    RandomErasingPolicy,
    Recipe,
    TorchvisionRandAugmentPolicy,
    build_views,
    draw_views,
    get_recipe,
    num_view_params,
    own_rows,
    photometric_of,
    render_batch,
    render_views,
    view_columns,
)

DEIT = "deit:size=32"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("jpegs"), train=48, val=8)


def test_older_recipes_keep_their_columns_and_digests():
    # the digests of stores labeled before photometric ops existed (their cache keys hold them)
    before = {"fkd": "6c2f1682ebc5adfd", "fmnist-flip": "b3db31ba3f770419", "fmnist-rrc": "3806d21964f19058",
              "fmnist-rrc-mix": "d8427b8443e054c7", "identity": "7e9489018bbddfd0",
              "imagenet-eval": "2ed4dc75cd1b4b15", "imagenet-rrc": "454b1df260b291df"}
    for name, digest in before.items():
        recipe = get_recipe(name)
        assert recipe.digest == digest and view_columns(recipe) == VIEW_COLUMNS and not recipe.photometric
        assert draw_views(recipe, 0, np.arange(4), 8, (32, 40)).shape == (4, NUM_VIEW_PARAMS)
    deit = get_recipe("deit")
    columns = view_columns(deit)
    assert columns[:NUM_VIEW_PARAMS] == VIEW_COLUMNS and "ra1_mag" in columns and "p_re0_w" in columns
    assert num_view_params(deit) == len(columns) == 43 and deit.pixel_ops == PIXEL_OPS
    assert get_recipe(DEIT).digest != deit.digest and get_recipe("ml-dr").digest != deit.digest
    with pytest.raises(UsageError, match="name the libraries"):
        Recipe("x", re_prob=0.5)
    with pytest.raises(UsageError, match="interpolation 'lanczos'"):
        Recipe("x", interpolation="lanczos")


def test_stored_photometric_views_replay_in_any_order_and_process(folder):
    ds = load_dataset(f"imagefolder:{folder}")
    recipe = get_recipe(DEIT)
    ids = np.arange(len(ds))
    whole, params = build_views(ds, recipe, 4, ids)
    assert params.shape == (len(ds), 43)
    applied = params[:, NUM_VIEW_PARAMS] >= 0
    assert applied.any() and (~applied).any() and (params[:, 26] > 0).any()  # some views erased (re0_h)
    reversed_views, _ = build_views(ds, recipe, 4, ids[::-1].copy())
    assert torch.equal(reversed_views.flip(0), whole)
    parts = torch.cat([build_views(ds, recipe, 4, ids[i : i + 7])[0] for i in range(0, len(ids), 7)])
    assert torch.equal(parts, whole)
    assert torch.equal(build_views(ds, recipe, 4, ids, params=params)[0], whole)  # from the stored rows
    code = ("import sys, numpy as np, torch; from stillroom.pipelines.data import load_dataset; "
            "from stillroom.pipelines.views import build_views, get_recipe; "
            f"v, p = build_views(load_dataset('imagefolder:{folder}'), get_recipe({DEIT!r}), 4, np.arange(0, 48, 5)); "
            "sys.stdout.buffer.write(np.ascontiguousarray(v.numpy()).tobytes() + p.tobytes())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    there = np.frombuffer(out.stdout[: whole[::5].numel() * 4], dtype=np.float32).reshape(whole[::5].shape)
    assert np.array_equal(there, whole[::5].numpy())
    assert np.array_equal(np.frombuffer(out.stdout[whole[::5].numel() * 4 :], dtype=np.float32).reshape(-1, 43),
                          params[::5])


def test_rendered_ops_are_the_policies_ops(folder):
    """A view rendered from its row is the crop (bicubic), then ``RandAugmentPolicy.apply`` of its layers, then
    ``RandomErasingPolicy.apply_uint8`` (timm's boxes, its noise as grey levels), bit for bit; a mixing row's partner
    view is the partner's own view."""
    ds = load_dataset(f"imagefolder:{folder}")
    recipe = get_recipe(DEIT)
    ids = np.arange(len(ds))
    params = draw_views(recipe, 2, ids, len(ds), ds.sizes)
    rendered = render_views(ds, ids, own_rows(params, recipe), 32, recipe.draft, recipe)
    plain = replace(recipe, auto_augment=None, re_prob=0.0)  # the crop alone, bicubic
    crops = render_views(ds, ids, params[:, 0:5], 32, recipe.draft, plain)
    policy = RandAugmentPolicy.parse("rand-m9-mstd0.5-inc1", translate_const=14, fill=(124, 116, 104),
                                     interpolation=int(Image.Resampling.BICUBIC))
    erasing = RandomErasingPolicy(0.25, "pixel", seed_bits=16)
    erased = 0
    for i in ids:
        img = policy.apply(Image.fromarray(crops[i].permute(1, 2, 0).numpy()), params[i, 17:25])
        expected = erasing.apply_uint8(np.array(img), params[i, 25:30], recipe.mean, recipe.std)
        assert np.array_equal(rendered[i].permute(1, 2, 0).numpy(), expected), i
        erased += int(params[i, 28] > 0)  # re0_h
        if params[i, 28] > 0:
            assert not np.array_equal(expected, np.array(img)), i
    assert erased and (rendered != crops).any()
    own, partner = render_batch(ds, ids, params, 32, recipe.draft, recipe)
    assert torch.equal(own, rendered) and partner is not None
    mixing = params[:, COL["mix_mode"]] > 0
    assert mixing.all()  # deit mixes every pair
    mates = params[:, COL["partner"]].astype(np.int64)
    alone = draw_views(recipe, 2, mates, len(ds), ds.sizes)
    assert torch.equal(partner, render_views(ds, mates, own_rows(alone, recipe), 32, recipe.draft, recipe))
    # DeiT's Mixup: mixup 0.8 / cutmix 1.0, switch 0.5
    many = draw_views(recipe, 0, np.arange(4000), 4000, (64, 64))
    cut = many[:, COL["mix_mode"]] == 2
    assert abs(cut.mean() - 0.5) < 0.05


def test_colour_jitter_is_torchvisions(folder):
    from torchvision import transforms

    recipe = Recipe("jitter-test", out_size=32, color_jitter=(0.4, 0.3, 0.2, 0.1), pixel_ops=PIXEL_OPS)
    assert view_columns(recipe)[NUM_VIEW_PARAMS:] == ("cj_order", "cj_brightness", "cj_contrast", "cj_saturation",
                                                      "cj_hue")
    params = draw_views(recipe, 0, np.arange(6000), 6000, (32, 32))
    cj = params[:, NUM_VIEW_PARAMS:]
    orders = np.unique(cj[:, 0], return_counts=True)
    assert len(orders[0]) == 24 and orders[1].min() > 6000 / 24 * 0.7  # every order of the four, about as often
    for col, (lo, hi) in zip(range(1, 5), ((0.6, 1.4), (0.7, 1.3), (0.8, 1.2), (-0.1, 0.1)), strict=True):
        assert lo - 1 / 2048 <= cj[:, col].min() < lo + 0.01 and hi - 0.01 < cj[:, col].max() <= hi  # on a 1/2048 grid
    ds = load_dataset(f"imagefolder:{folder}")
    policy = ColorJitterPolicy.of((0.4, 0.3, 0.2, 0.1))
    crops = render_views(ds, np.arange(8), np.tile([0.0, 0.0, 1.0, 1.0, 0.0], (8, 1)), 32, False)
    theirs = transforms.ColorJitter(0.4, 0.3, 0.2, 0.1)
    for i in range(8):
        row = cj[i]
        order = [(int(row[0]) >> (2 * k)) & 3 for k in range(4)]
        theirs.get_params = lambda *a, row=row, order=order: (torch.tensor(order), *map(float, row[1:]))
        img = Image.fromarray(crops[i].permute(1, 2, 0).numpy())
        assert np.array_equal(np.asarray(policy.apply(img, row)), np.asarray(theirs(img)))
    with pytest.raises(UsageError, match="color jitter"):
        ColorJitterPolicy.of((0.1, 0.2))


def test_ml_dr_randaugment_is_torchvisions(folder, monkeypatch):
    """ml-dr's RandAugment is torchvision's: its op (uniform over 14) and sign drawn, the image torchvision's
    ``RandAugment`` gives with those draws."""
    import torchvision.transforms.autoaugment as tv

    recipe = get_recipe("ml-dr:size=32")
    photo = photometric_of(recipe)
    assert isinstance(photo.randaugment, TorchvisionRandAugmentPolicy) and photo.erasing.mode == "black"
    params = draw_views(recipe, 0, np.arange(7000), 7000, (32, 32))[:, NUM_VIEW_PARAMS:]
    ops = params[:, [0, 4]].ravel()
    counts = np.bincount(ops.astype(int), minlength=14)
    assert len(counts) == 14 and np.all(np.abs(counts - len(ops) / 14) < 5 * np.sqrt(len(ops) / 14))
    assert abs((params[:, 9 + 2] > 0).mean() - 0.25) < 0.03  # erased 1 in 4 (re0_h)
    ds = load_dataset(f"imagefolder:{folder}")
    crops = render_views(ds, np.arange(12), np.tile([0.0, 0.0, 1.0, 1.0, 0.0], (12, 1)), 32, False)
    ours = photo.randaugment
    theirs = tv.RandAugment(num_ops=2, magnitude=9)
    for i in range(12):
        row = params[i, :8]
        signed = set(range(1, 10))  # ShearX to Sharpness: torchvision draws a sign for these alone
        draws = iter([v for op, sign in ((int(row[0]), row[2]), (int(row[4]), row[6]))
                      for v in ([op, int(sign < 0)] if op in signed else [op])])
        monkeypatch.setattr(tv.torch, "randint", lambda *a, draws=draws, **k: torch.tensor([next(draws)]))
        img = Image.fromarray(crops[i].permute(1, 2, 0).numpy())
        assert np.array_equal(np.asarray(ours.apply(img, row)), np.asarray(theirs(img))), i


def test_in_memory_photometric_views_replay():
    ds = load_dataset(SYNTHETIC)
    recipe = Recipe("memory-test", out_size=16, mixup_p=0.5, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5,
                    pixel_ops=PIXEL_OPS)
    ids = np.arange(64)
    views, params = build_views(ds, recipe, 1, ids)
    assert params.shape == (64, num_view_params(recipe)) and views.shape[0] == 64
    assert torch.equal(build_views(ds, recipe, 1, ids[::-1].copy())[0].flip(0), views)
    assert torch.equal(build_views(ds, recipe, 1, ids, params=params)[0], views)
    with pytest.raises(UsageError, match="columns"):
        build_views(ds, recipe, 1, ids, params=params[:, :NUM_VIEW_PARAMS])


def test_a_deit_store_on_jpegs_trains_a_student(folder, tmp_path):
    from stillroom.pipelines.labeling import LabelConfig, run_labeling
    from stillroom.pipelines.store import LabelStore
    from stillroom.student.config import TrainConfig
    from stillroom.student.data import StoreStream, check_store
    from stillroom.student.run import train

    data = f"imagefolder:{folder}"
    teacher = make_teacher(tmp_path / "t.pt", in_chans=3, resolution=32)
    config = LabelConfig(dataset=data, teachers=(teacher,), recipe=DEIT, seeds=(0,), top_k=3,
                         store_root=str(tmp_path / "stores"), batch_size=16, store_views=True)  # kept: compared
    result = run_labeling(config, backend="local", progress=False)
    store = LabelStore(result["store"])
    ds = load_dataset(data)
    stored = store.load(0).arrays["view"]
    assert store.schema.view_params == 43 and stored.shape == (len(ds), 43)
    np.testing.assert_array_equal(stored, draw_views(get_recipe(DEIT), 0, np.arange(len(ds)), len(ds), ds.sizes))
    # the student's batch (in a loader worker) is the teacher's view
    recipe = check_store(store, ds)
    stream = StoreStream(store, ds, recipe, batch_size=8, loader_workers=1)
    batch = next(iter(stream.epoch(0)))
    teacher_views, _ = build_views(ds, get_recipe(DEIT), 0, batch.ids)
    assert torch.equal(batch.views, teacher_views)
    torch.manual_seed(0)
    metrics = train(TrainConfig(store=result["store"], dataset=data, student="test_resnet", loss="kd",
                                out=str(tmp_path / "run"), epochs=1, batch_size=16, max_steps=2, eval_limit=8))
    assert np.isfinite(metrics["losses"]["loss"])


def test_photometric_recipes_decode_on_the_cpu(folder, tmp_path):
    from stillroom.pipelines.labeling import LabelConfig

    teacher = make_teacher(tmp_path / "t.pt", in_chans=3, resolution=32)
    data = f"imagefolder:{folder}"
    auto = LabelConfig(dataset=data, teachers=(teacher,), recipe=DEIT, gpus_per_worker=1, store_root=str(tmp_path))
    assert auto.decode_on == "cpu"  # nvJPEG would skip the ops
    plain = LabelConfig(dataset=data, teachers=(teacher,), recipe="fkd:size=32", gpus_per_worker=1, decode="gpu",
                        store_root=str(tmp_path))
    assert plain.decode_on == "gpu"  # asked for, on a recipe without photometric ops
    with pytest.raises(UsageError, match="--decode cpu"):
        LabelConfig(dataset=data, teachers=(teacher,), recipe=DEIT, decode="gpu", gpus_per_worker=1)


def test_a_student_replays_in_memory_photometric_views(tmp_path, monkeypatch):
    """In-memory data: the student finishes its batch from the stored rows (``apply_views`` with the recipe), and
    gets the teacher's views."""
    from stillroom.pipelines.labeling import LabelConfig, run_labeling
    from stillroom.pipelines.store import LabelStore
    from stillroom.pipelines.views import RECIPES
    from stillroom.student.data import StoreStream, check_store

    recipe = Recipe("memory-test", mixup_p=0.5, cutmix_p=0.5, color_jitter=(0.4, 0.4, 0.4), re_prob=0.5,
                    pixel_ops=PIXEL_OPS)
    monkeypatch.setitem(RECIPES, recipe.name, recipe)
    teacher = make_teacher(tmp_path / "t.pt")
    result = run_labeling(LabelConfig(dataset=SYNTHETIC, teachers=(teacher,), recipe=recipe.name, seeds=(0,),
                                      top_k=3, store_root=str(tmp_path / "stores"), batch_size=64),
                          backend="local", progress=False)
    store = LabelStore(result["store"])
    ds = load_dataset(SYNTHETIC)
    stream = StoreStream(store, ds, check_store(store, ds), batch_size=32, loader_workers=0)
    batch = next(iter(stream.epoch(0)))
    assert batch.params.shape == (32, num_view_params(recipe)) and (batch.params[:, COL["mix_mode"]] > 0).any()
    assert torch.equal(batch.views, build_views(ds, recipe, 0, batch.ids)[0])
