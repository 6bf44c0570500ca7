"""Teachers: loading stillroom checkpoints and plain state dicts, weight digests, preprocessing, bad
checkpoints, and ``stillroom teacher train`` through its console script."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import SYNTHETIC, make_teacher, run_cli
from hub_cache import HUB_ID

from stillroom.pipelines.core import UsageError
from stillroom.pipelines.teachers import Preprocess, load_teacher, weights_digest


def test_load_a_stillroom_checkpoint(tmp_path):
    spec = make_teacher(tmp_path / "t.pt", num_classes=4, in_chans=1, resolution=24, seed=3)
    teacher = load_teacher(spec, num_classes=4)
    assert (teacher.name, teacher.num_classes, teacher.source) == ("test_resnet", 4, str(tmp_path / "t.pt"))
    assert teacher.preprocess == Preprocess(24, (0.5,), (0.25,), 1)
    assert teacher.kwargs == {"num_classes": 4, "in_chans": 1}
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    # the same weights as the model that was saved
    torch.manual_seed(3)
    saved = timm.create_model("test_resnet", num_classes=4, in_chans=1)
    assert teacher.weights_sha256 == weights_digest(saved.state_dict())
    views = torch.rand(2, 1, 16, 16)
    with torch.inference_mode():
        expected = saved.eval()((torch.nn.functional.interpolate(views, size=24, mode="bilinear") - 0.5) / 0.25)
        torch.testing.assert_close(teacher.logits(views), expected)
    assert teacher.describe()["preprocess"]["resolution"] == 24


@pytest.mark.parametrize("nested", [False, True])
def test_load_a_plain_state_dict(tmp_path, nested):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5).eval()
    path = tmp_path / "plain.pt"
    torch.save({"state_dict": model.state_dict()} if nested else model.state_dict(), path)
    teacher = load_teacher(f"test_resnet@{path}", num_classes=5)
    assert teacher.num_classes == 5 and teacher.weights_sha256 == weights_digest(model.state_dict())
    # preprocessing from timm's pretrained config: its resolution, 3 channels, its mean/std
    cfg = model.pretrained_cfg
    assert teacher.preprocess.resolution == cfg["input_size"][-1] and teacher.preprocess.in_chans == 3
    assert teacher.preprocess.mean == tuple(cfg["mean"])
    x = torch.rand(2, 3, cfg["input_size"][-1], cfg["input_size"][-1])
    with torch.inference_mode():
        torch.testing.assert_close(teacher.logits(x), model(teacher.preprocess(x)))


def test_weights_digest_follows_the_weights():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4)
    state = model.state_dict()
    digest = weights_digest(state)
    assert weights_digest(dict(reversed(list(state.items())))) == digest  # order does not matter
    changed = {k: v.clone() for k, v in state.items()}
    name = next(k for k, v in changed.items() if v.is_floating_point())
    changed[name].view(-1)[0] += 1e-3
    assert weights_digest(changed) != digest
    renamed = {("x." + k if k == name else k): v for k, v in state.items()}
    assert weights_digest(renamed) != digest  # names count too


def test_preprocess_resizes_expands_and_normalises():
    views = torch.rand(3, 1, 16, 16)
    out = Preprocess(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 3)(views)
    assert out.shape == (3, 3, 32, 32)
    up = torch.nn.functional.interpolate(views, size=(32, 32), mode="bilinear", align_corners=False)
    for c in range(3):  # one grey channel copied to all three, then normalised
        torch.testing.assert_close(out[:, c : c + 1], (up - 0.5) / 0.25)
    grey = Preprocess(16, (0.5,), (0.5,), 1)(torch.rand(2, 3, 16, 16))
    assert grey.shape == (2, 1, 16, 16)
    same = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(Preprocess(8, (0.0,), (1.0,), 1)(same), same)  # no resize at its own size
    with pytest.raises(UsageError, match="cannot feed 2-channel views"):
        Preprocess(8, (0.0,) * 3, (1.0,) * 3, 3)(torch.rand(1, 2, 8, 8))


def test_bad_teachers_raise_usage_errors(tmp_path):
    spec = make_teacher(tmp_path / "t.pt", num_classes=4)
    ckpt = spec.partition("@")[2]
    torch.manual_seed(0)
    plain = tmp_path / "plain4.pt"
    torch.save(timm.create_model("test_resnet", num_classes=4).state_dict(), plain)
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"model": timm.create_model("test_resnet", num_classes=4)}, tmp_path / "pickled.pt")  # the module
    (tmp_path / "cut.pt").write_bytes(plain.read_bytes()[:200])
    cases = {
        "no_such_model_xyz": "unknown model 'no_such_model_xyz'",
        f"no_such_model_xyz@{ckpt}": "unknown model",
        f"resnet18@{ckpt}": "holds a test_resnet, not a resnet18",
        f"resnet18@{plain}": "does not fit resnet18",
        f"test_resnet@{tmp_path / 'missing.pt'}": "does not exist",
        f"test_resnet@{tmp_path / 'text.pt'}": r"text.pt is not a checkpoint: not a file torch.save wrote",
        f"test_resnet@{tmp_path / 'pickled.pt'}": r"holds pickled Python objects \(timm.models.resnet.ResNet\)",
        f"test_resnet@{tmp_path / 'cut.pt'}": "is not a checkpoint torch can read",
        f"test_resnet@{tmp_path / 'list.pt'}": "neither a stillroom teacher checkpoint nor a state dict",
        "test_resnet@": "expected NAME@CHECKPOINT",
    }
    for bad, message in cases.items():
        with pytest.raises(UsageError, match=message) as caught:
            load_teacher(bad, num_classes=4)
        assert "weights_only" not in str(caught.value)
    with pytest.raises(UsageError, match=r"predicts 4 classes \(its stillroom checkpoint\); the dataset has 10"):
        load_teacher(spec, num_classes=10)


def test_teacher_train_command_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "teacher.pt"
    run = run_cli("teacher", "train", "--dataset", SYNTHETIC, "--model", "test_resnet",
                  "--epochs", "1", "--batch-size", "32", "--train-samples", "64", "--resolution", "20",
                  "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert 0.0 <= result["top1"] <= 1.0 and result["out"] == str(out) and result["train_samples"] == 64
    teacher = load_teacher(f"test_resnet@{out}", num_classes=4)
    assert teacher.preprocess.resolution == 20 and teacher.preprocess.in_chans == 1
    assert teacher.kwargs == {"num_classes": 4, "in_chans": 1}
    saved = torch.load(out, weights_only=True)
    assert saved["metrics"]["top1"] == result["top1"]
    with torch.inference_mode():
        assert teacher.logits(torch.rand(2, 1, 16, 16)).shape == (2, 4)


def test_teacher_train_refuses_bad_settings_before_training(tmp_path):
    from stillroom.pipelines.teachers import TeacherTrainConfig

    for bad, message in [({"smoothing": 1.0}, "--smoothing 1.0: expected 0 <= value < 1"),
                         ({"epochs": 0}, "--epochs 0: expected 1 <= value <= 1000")]:
        with pytest.raises(UsageError, match=message):
            TeacherTrainConfig(dataset=SYNTHETIC, model="test_resnet", out=str(tmp_path / "t.pt"), **bad)
    run = run_cli("teacher", "train", "--dataset", SYNTHETIC, "--model", "test_resnet",
                  "--smoothing", "-0.1", "--out", str(tmp_path / "t.pt"))
    assert run.returncode == 2 and "expected 0 <= value < 1" in run.stderr and not (tmp_path / "t.pt").exists()


def test_batchnorm_statistics_are_reestimated_before_the_final_evaluation(tmp_path):
    """A few steps leave BatchNorm's running averages far from the final weights' statistics: the same
    weights score much lower in eval mode than with batch statistics until they are re-estimated."""
    import numpy as np

    from stillroom.pipelines.data import load_dataset
    from stillroom.pipelines.teachers import TeacherTrainConfig, train_teacher

    test = load_dataset(SYNTHETIC, "test")

    def top1(teacher, batch_stats: bool) -> float:
        teacher.model.train(batch_stats)  # True: each batch of 128 normalised with its own statistics
        hits = 0
        with torch.no_grad():
            for start in range(0, len(test), 128):
                ids = np.arange(start, min(start + 128, len(test)))
                logits = teacher.model(teacher.preprocess(test.read(ids).float() / 255.0))
                hits += int((logits.argmax(1) == torch.from_numpy(test.labels[ids])).sum())
        return hits / len(test)

    runs = {}
    for bn_samples in (0, 10_000):  # 0: the running averages training left (the old behaviour)
        out = tmp_path / f"bn{bn_samples}.pt"
        result = train_teacher(TeacherTrainConfig(dataset=SYNTHETIC, model="test_resnet", out=str(out), epochs=1,
                                                  batch_size=32, bn_samples=bn_samples), progress=False)
        teacher = load_teacher(f"test_resnet@{out}", num_classes=4)
        runs[bn_samples] = (result, top1(teacher, batch_stats=False), top1(teacher, batch_stats=True), teacher)
    (before, eval_before, batch_before, t_before), (after, eval_after, batch_after, t_after) = runs[0], runs[10_000]
    assert before["bn_reestimated_on"] == 0 and after["bn_reestimated_on"] == 256  # the 8 batches of 32 seen
    params = dict(t_before.model.named_parameters())
    assert all(torch.equal(p, params[name]) for name, p in t_after.model.named_parameters())  # same weights
    assert batch_after == batch_before
    assert after["top1"] == eval_after  # the printed accuracy is the eval-mode accuracy of the saved teacher
    assert abs(eval_after - batch_after) < abs(eval_before - batch_before)
    assert abs(eval_after - batch_after) <= 0.1 < abs(eval_before - batch_before)


# --- teachers as users bring them: the hub's weights (from an offline cache), other label spaces, preprocessing

def test_a_pretrained_teacher_of_another_class_count_is_refused_unless_mapped(offline_hub, tmp_path):
    from stillroom.pipelines.teachers import read_class_map

    for name in (HUB_ID, "test_resnet"):  # tagged, and the default tag
        with pytest.raises(UsageError, match=r"predicts 1000 classes \(timm's pretrained_cfg num_classes\); "
                                             r"the dataset has 4\. .* --class-map FILE"):
            load_teacher(name, num_classes=4)
    full = load_teacher(HUB_ID, num_classes=1000)  # its own label space: the hub's weights, head and all
    assert full.weights_sha256 == weights_digest(offline_hub.state_dict()) and full.num_classes == 1000
    # a data set of 4 classes drawn from the teacher's 1000: class i is the teacher's class map[i]
    mapping = tmp_path / "classes.txt"
    mapping.write_text("# ImageNet-100 style: dataset class, teacher class index\nant 7\nbee 300\ncat 281\ndog 999\n")
    class_map = read_class_map(str(mapping), 4, ("ant", "bee", "cat", "dog"))
    assert class_map == (7, 300, 281, 999)
    teacher = load_teacher(HUB_ID, num_classes=4, class_map=class_map)
    assert (teacher.num_classes, teacher.teacher_classes) == (4, 1000)
    assert teacher.describe()["class_map"] == {"teacher_classes": 1000, "indices": [7, 300, 281, 999]}
    x = torch.rand(3, 3, 160, 160)
    with torch.inference_mode():
        torch.testing.assert_close(teacher.logits(x), offline_hub(teacher.preprocess(x))[:, [7, 300, 281, 999]])
        torch.testing.assert_close(teacher.features(x, "final")[0], teacher.logits(x))
    bad = {"ant 7\nbee 300\ncat 281\n": "maps 3 classes; the dataset has 4",
           "ant 7\nbee 7\ncat 281\ndog 999\n": "teacher class 7 is given to two data set classes",
           "ant 7\nbee 300\ndog 281\ncat 999\n": "names 'dog', the dataset's class 2 is 'cat'",
           "7\n300\nx\n999\n": "line 3: expected INDEX or NAME INDEX"}
    for text, message in bad.items():
        mapping.write_text(text)
        with pytest.raises(UsageError, match=message):
            read_class_map(str(mapping), 4, ("ant", "bee", "cat", "dog"))
    with pytest.raises(UsageError, match="gives teacher class 1000; teacher .* predicts 1000 classes"):
        load_teacher(HUB_ID, num_classes=4, class_map=(0, 1, 2, 1000))


def test_a_stillroom_teacher_refuses_a_dataset_whose_class_names_differ(tmp_path):
    from stillroom.pipelines.teachers import save_checkpoint

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4, in_chans=1)
    path = tmp_path / "named.pt"
    save_checkpoint(path, "test_resnet", model, {"num_classes": 4, "in_chans": 1}, Preprocess(16, (0.5,), (0.25,), 1),
                    extra={}, class_names=("ant", "bee", "cat", "dog"))
    spec = f"test_resnet@{path}"
    assert load_teacher(spec, 4, class_names=("ant", "bee", "cat", "dog")).class_names == ("ant", "bee", "cat", "dog")
    with pytest.raises(UsageError, match="its class 2 is 'cat', the dataset's is 'dog' \\(names and order must match"):
        load_teacher(spec, 4, class_names=("ant", "bee", "dog", "cat"))  # the same names, another order
    with pytest.raises(UsageError, match="its class 0 is 'ant', the dataset's is 'Ant'"):
        load_teacher(spec, 4, class_names=("Ant", "bee", "cat", "dog"))
    # a map onto a named teacher: each mapped class must carry the dataset class's name
    assert load_teacher(spec, 2, class_names=("dog", "bee"), class_map=(3, 1)).num_classes == 2
    with pytest.raises(UsageError, match="class 0 \\('dog'\\) to teacher class 2, which the teacher's checkpoint "
                                         "names 'cat'"):
        load_teacher(spec, 2, class_names=("dog", "bee"), class_map=(2, 1))


def test_teacher_train_records_the_class_names(tmp_path):
    from image_data import CLASSES, write_image_folder

    from stillroom.pipelines.teachers import TeacherTrainConfig, train_teacher

    root = write_image_folder(tmp_path / "imgs", train=16, val=8)
    out = tmp_path / "t.pt"
    train_teacher(TeacherTrainConfig(dataset=f"imagefolder:{root}", model="test_resnet", out=str(out), epochs=1,
                                     batch_size=16, recipe="imagenet-rrc:size=16", bn_samples=0), progress=False)
    assert torch.load(out, weights_only=True)["class_names"] == list(CLASSES)
    assert load_teacher(f"test_resnet@{out}", 4, class_names=CLASSES).class_names == CLASSES


def test_preprocessing_comes_from_the_checkpoint_then_the_tagged_name_then_the_default_tag(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    plain = tmp_path / "plain.pth"
    torch.save(model.state_dict(), plain)
    # the default tag (resnet18.a1_in1k: bicubic, crop 0.95), and said to be a guess
    default = load_teacher(f"resnet18@{plain}", num_classes=10)
    assert (default.preprocess.interpolation, default.preprocess.crop_pct) == ("bicubic", 0.95)
    assert "default tag resnet18.a1_in1k (the checkpoint carries none" in default.preprocess_from
    # the tagged name's (torchvision's weights: bilinear, crop 0.875)
    tagged = load_teacher(f"resnet18.tv_in1k@{plain}", num_classes=10)
    assert (tagged.preprocess.interpolation, tagged.preprocess.crop_pct) == ("bilinear", 0.875)
    assert tagged.preprocess.mean == (0.485, 0.456, 0.406) and tagged.preprocess.resolution == 224
    assert tagged.preprocess_from == "timm pretrained_cfg of the tag resnet18.tv_in1k"
    assert tagged.weights_sha256 == default.weights_sha256 and tagged.describe() != default.describe()
    # a model.safetensors with the hub's config.json beside it: the checkpoint's own preprocessing
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, hub / "model.safetensors")
    cfg = {"input_size": [3, 176, 176], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear",
           "crop_pct": 0.9}
    (hub / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 10, "pretrained_cfg": cfg}))
    own = load_teacher(f"resnet18@{hub / 'model.safetensors'}", num_classes=10)
    assert own.preprocess == Preprocess(176, (0.5,) * 3, (0.25,) * 3, 3, "bilinear", 0.9)
    assert own.weights_sha256 == default.weights_sha256 and "config.json beside it" in own.preprocess_from
    # a training script's checkpoint (DeiT's: {"model": state_dict}) carrying a pretrained_cfg
    deit_style = tmp_path / "deit.pth"
    torch.save({"model": model.state_dict(), "pretrained_cfg": {"mean": [0.1, 0.2, 0.3]}}, deit_style)
    carried = load_teacher(f"resnet18@{deit_style}", num_classes=10)
    assert carried.preprocess.mean == (0.1, 0.2, 0.3) and carried.preprocess.std == (0.229, 0.224, 0.225)
    # options override any of them, and say so
    set_ = load_teacher(f"resnet18@{plain}", num_classes=10,
                        preprocess={"resolution": 96, "mean": (0.5, 0.5, 0.5), "interpolation": "bilinear",
                                    "std": None})
    assert (set_.preprocess.resolution, set_.preprocess.mean, set_.preprocess.std) == (96, (0.5,) * 3,
                                                                                       (0.229, 0.224, 0.225))
    assert set_.preprocess_from.startswith("options (interpolation, mean, resolution); the rest from timm's default")
    with pytest.raises(UsageError, match="teacher mean 0.5,0.5: expected 3 value"):
        load_teacher(f"resnet18@{plain}", num_classes=10, preprocess={"mean": (0.5, 0.5)})
    # a plain state dict of 10 classes for a data set of 4: refused by its classifier's size
    with pytest.raises(UsageError, match=r"predicts 10 classes \(its classifier's weights\); the dataset has 4"):
        load_teacher(f"resnet18@{plain}", num_classes=4)
    with pytest.raises(UsageError, match="Invalid pretrained tag"):
        load_teacher(f"resnet18.no_such_tag@{plain}", num_classes=10)


def test_an_old_checkpoint_without_the_new_preprocessing_fields_still_loads(tmp_path):
    spec = make_teacher(tmp_path / "t.pt")
    ckpt = torch.load(tmp_path / "t.pt", weights_only=True)
    for key in ("interpolation", "crop_pct"):
        del ckpt["preprocess"][key]
    del ckpt["class_names"]
    torch.save(ckpt, tmp_path / "t.pt")
    teacher = load_teacher(spec, 4, class_names=("a", "b", "c", "d"))  # no names recorded: nothing to compare
    assert teacher.preprocess == Preprocess(16, (0.5,), (0.25,), 1, "bilinear", None)
