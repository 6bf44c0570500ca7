"""Evaluation inputs: the student's own data config (timm's), recorded in its checkpoint; images on disk through
timm's eval transform at the checkpoint's crop_pct and interpolation; loader workers give the same batches."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from image_data import write_image_folder
from PIL import Image

from stillroom.pipelines.data import load_dataset
from stillroom.student import evaluate as E
from stillroom.student.models import LEGACY_INPUT, InputConfig, build_student, resolve_input_config, set_input_config


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    root = write_image_folder(tmp_path_factory.mktemp("images"), train=8, val=12)
    return f"imagefolder:{root}"


def _by_hand(data: bytes, size: int, crop_pct: float, resample: Image.Resampling) -> np.ndarray:
    """timm validate.py's transform written out with PIL: shorter side to floor(size / crop_pct), centre crop."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    short = int(size / crop_pct)
    w, h = img.size
    new = (short, int(h * short / w)) if w <= h else (int(w * short / h), short)  # the long side truncated
    img = img.resize(new, resample)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size))).transpose(2, 0, 1)


@pytest.mark.parametrize(("crop_pct", "interpolation", "resample"), [
    (0.875, "bilinear", Image.Resampling.BILINEAR), (0.5, "bicubic", Image.Resampling.BICUBIC),
    (1.0, "bicubic", Image.Resampling.BICUBIC)])
def test_images_on_disk_go_through_timms_eval_transform_at_the_configs_crop(folder, crop_pct, interpolation,
                                                                              resample):
    ds = load_dataset(folder, "val")
    ids = np.arange(len(ds))
    images, labels = E.EvalSource(ds, 24, InputConfig(interpolation=interpolation, crop_pct=crop_pct))\
        .__getitems__(ids)
    assert images.dtype == torch.uint8 and images.shape == (len(ds), 3, 24, 24)
    assert labels.tolist() == ds.labels.tolist()
    for i, (data, _) in enumerate(ds.encoded(ids)):
        assert np.array_equal(images[i].numpy(), _by_hand(data, 24, crop_pct, resample)), i


def test_loader_workers_and_ranks_score_as_one_process(folder):
    ds = load_dataset(folder, "val")
    torch.manual_seed(0)
    model = build_student("test_resnet", ds.num_classes, 3, 24)
    cfg = resolve_input_config(model, 3)
    one = list(E.eval_batches(ds, np.arange(len(ds)), 24, cfg, 5, 0, "cpu"))
    two = list(E.eval_batches(ds, np.arange(len(ds)), 24, cfg, 5, 2, "cpu"))
    assert len(one) == len(two) == 3
    for (x1, y1), (x2, y2) in zip(one, two, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert E.evaluate(model, ds, 24, batch_size=5, loader_workers=2) == E.evaluate(model, ds, 24, batch_size=5)


def test_the_students_data_config_is_timms_and_a_checkpoint_keeps_it(tmp_path, folder):
    resnet = build_student("resnet18", 4, 3, 32)
    cfg = resolve_input_config(resnet, 3)
    assert (cfg.mean, cfg.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (cfg.interpolation, cfg.crop_pct) == ("bicubic", 0.95)  # resnet18's default tag (a1_in1k)
    grey = resolve_input_config(build_student("resnet18", 4, 1, 32), 1)  # Fashion-MNIST: one channel
    assert grey.mean == (pytest.approx((0.485 + 0.456 + 0.406) / 3),) and len(grey.std) == 1
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(cfg.normalize(x)[:, 1], (x[:, 1] - 0.456) / 0.224)

    # --init from a stillroom checkpoint keeps the config it recorded; a plain state dict keeps the model's own
    recorded = InputConfig((0.3, 0.3, 0.3), (0.2, 0.2, 0.2), "bilinear", 0.8)
    E.save_checkpoint(tmp_path / "s.pt", {"model": resnet.state_dict(), "input_config": recorded.to_dict()})
    torch.save(resnet.state_dict(), tmp_path / "plain.pt")
    fresh = build_student("resnet18", 4, 3, 32)
    E.load_init_weights(fresh, tmp_path / "s.pt")
    assert resolve_input_config(fresh, 3) == recorded
    other = build_student("resnet18", 4, 3, 32)
    E.load_init_weights(other, tmp_path / "plain.pt")
    assert resolve_input_config(other, 3) == cfg
    assert E.checkpoint_input_config({}) == LEGACY_INPUT  # written before the config was recorded


def test_stillroom_eval_uses_the_checkpoints_crop_and_interpolation(tmp_path, folder, monkeypatch):
    ds = load_dataset(folder, "val")
    model = build_student("test_resnet", ds.num_classes, 3, 24)
    recorded = InputConfig((0.4, 0.4, 0.4), (0.3, 0.3, 0.3), "bicubic", 0.6)
    E.save_checkpoint(tmp_path / "last.pt", {
        "student": "test_resnet", "student_kwargs": {}, "num_classes": ds.num_classes, "in_chans": 3,
        "img_size": 24, "model": model.state_dict(), "input_config": recorded.to_dict(), "epoch": 0})
    seen: list[InputConfig] = []

    class Recording(E.EvalSource):
        def __init__(self, dataset, size, input_config):
            seen.append(input_config)
            super().__init__(dataset, size, input_config)

    monkeypatch.setattr(E, "EvalSource", Recording)
    scores = E.evaluate_checkpoint(tmp_path / "last.pt", folder, "val")
    assert seen == [recorded] and scores["samples"] == len(ds)
    set_input_config(model, recorded)
    assert scores["top1"] == E.evaluate(model, ds, 24)["top1"]
