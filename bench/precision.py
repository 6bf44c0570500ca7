"""Teacher precision: how far bf16 autocast moves a teacher's soft targets from fp32's, on the CPU.

The labels a student learns from are ``softmax(t / T)``. For each teacher this runs the same views through it in
fp32 and under ``torch.autocast(dtype=torch.bfloat16)`` (what GPU labeling does; the CPU runs it too) and reports
the total variation ``TV = 0.5 * sum_c |p_c - q_c|`` between the two targets at T = 1 and T = 4: its mean,
99th percentile and maximum over the views.

No pretrained weights are reachable here, and a random network's logits are nearly uniform (a TV of ~0 that says
nothing). So, two kinds of teacher with a realistic logit scale:

- ``trained`` (with ``--trained``: slow, ``teacher train`` scores the whole test split): Fashion-MNIST teachers
  trained here by ``stillroom teacher train`` (``pipelines.teacher_train``) on
  the first ``--train-samples`` images for one epoch: a ``resnet50`` and a ViT (``vit_tiny_patch16_224`` with
  ``img_size=28, patch_size=4``), at the native 28 px, 10 classes; scored on ``--views`` test images.
- ``imagenet-shape``: ``resnet50`` and ``vit_base_patch16_224`` at 224 px with 1,000 classes, random weights, on
  Fashion-MNIST test images resized to 224 px (3 channels, ImageNet mean/std). The backbone runs once per dtype;
  the classifier's weights and bias are then scaled (one factor per model, from the fp32 logits) so that the mean
  over views of ``max logit - mean logit`` is ``--margin`` (default 15, 20), and the scaled head is run in each
  dtype on that dtype's features: the bf16 rounding of logits that size (about 0.06 at 20) is in the figures, and
  the error the backbone accumulated in bf16 is carried through. The logits' shape stays a random network's
  (no single dominant class), which the trained teachers have.

Prints one JSON line.

    python bench/precision.py [--imagenet-views N] [--margin 15 20] [--trained --views N --train-samples N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TEMPERATURES = (1.0, 4.0)


def total_variation(a: torch.Tensor, b: torch.Tensor, temperature: float) -> dict[str, float]:
    """Mean, 99th percentile and max over rows of ``0.5 * sum |softmax(a/T) - softmax(b/T)|``."""
    tv = 0.5 * ((a.float() / temperature).softmax(-1) - (b.float() / temperature).softmax(-1)).abs().sum(-1)
    return {"mean": round(float(tv.mean()), 6), "p99": round(float(tv.quantile(0.99)), 6),
            "max": round(float(tv.max()), 6)}


def compare(fp32: torch.Tensor, bf16: torch.Tensor) -> dict[str, object]:
    top = fp32.float().softmax(-1).max(-1).values
    return {"tv": {f"T={t:g}": total_variation(fp32, bf16, t) for t in TEMPERATURES},
            "max_abs_logit_diff": round(float((fp32.float() - bf16.float()).abs().max()), 4),
            "mean_top1_prob": round(float(top.mean()), 4),
            "top1_agree": round(float((fp32.argmax(-1) == bf16.argmax(-1)).float().mean()), 4)}


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def trained(args: argparse.Namespace, work: Path) -> dict[str, object]:
    from stillroom.pipelines.data import load_dataset
    from stillroom.pipelines.teachers import TeacherTrainConfig, load_teacher, train_teacher

    test = load_dataset("fashion-mnist", "test")
    ids = np.arange(min(args.views, len(test)))
    out: dict[str, object] = {}
    for model, kwargs in (("resnet50", {}), ("vit_tiny_patch16_224", {"img_size": 28, "patch_size": 4})):
        path = work / f"{model}.pt"
        t0 = time.perf_counter()
        result = train_teacher(TeacherTrainConfig(model=model, model_kwargs=kwargs, out=str(path), epochs=1,
                                                  train_samples=args.train_samples, batch_size=64,
                                                  bn_samples=min(2000, args.train_samples)), progress=False)
        teacher = load_teacher(f"{model}@{path}", 10)
        logits: dict[str, list[torch.Tensor]] = {"fp32": [], "bf16": []}
        with torch.inference_mode():
            for s in range(0, len(ids), 100):
                views = test.read(ids[s : s + 100]).float() / 255.0
                logits["fp32"].append(teacher.logits(views).float())
                with bf16():
                    logits["bf16"].append(teacher.logits(views).float())
        a, b = torch.cat(logits["fp32"]), torch.cat(logits["bf16"])
        out[model] = {**compare(a, b), "test_top1": result["top1"], "max_logit_mean": round(float(a.max(-1).values
                                                                                                   .mean()), 2),
                      "train_s": round(time.perf_counter() - t0, 1), "views": len(ids)}
    return out


def imagenet_shape(args: argparse.Namespace) -> dict[str, object]:
    import timm
    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer

    from stillroom.pipelines.data import load_dataset
    from stillroom.pipelines.views import eval_views

    test = load_dataset("fashion-mnist", "test")
    x = eval_views(test, np.arange(args.imagenet_views), 224).expand(-1, 3, -1, -1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (x - mean) / std
    out: dict[str, object] = {}
    for name in ("resnet50", "vit_base_patch16_224"):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=1000).eval()
        if not isinstance(model, ResNet | VisionTransformer):  # the two whose features and head this bench splits
            raise SystemExit(f"bench/precision.py: {name} is a {type(model).__name__}: no forward_head here")
        head = model.get_classifier()
        if not isinstance(head, torch.nn.Linear):
            raise SystemExit(f"bench/precision.py: {name}'s classifier is a {type(head).__name__}, not the Linear "
                             "whose weights this bench scales")
        with torch.inference_mode():
            feats = {"fp32": model.forward_features(x)}
            with bf16():
                feats["bf16"] = model.forward_features(x)
            base = model.forward_head(feats["fp32"])
            spread = float((base.max(-1).values - base.mean(-1)).mean())
            weight, bias = head.weight.clone(), head.bias.clone()
            rows = {}
            for margin in args.margin:
                head.weight.copy_(weight * (margin / spread))
                head.bias.copy_(bias * (margin / spread))
                a = model.forward_head(feats["fp32"])
                with bf16():
                    b = model.forward_head(feats["bf16"])
                rows[f"margin={margin:g}"] = compare(a, b)
        out[name] = {**rows, "views": args.imagenet_views}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trained", action="store_true", help="also train and score the Fashion-MNIST teachers")
    ap.add_argument("--views", type=int, default=2000, help="Fashion-MNIST test views scored by the trained teachers")
    ap.add_argument("--train-samples", type=int, default=6000, help="training images of the trained teachers")
    ap.add_argument("--imagenet-views", type=int, default=16, help="224 px views for the 1,000-class networks")
    ap.add_argument("--margin", type=float, nargs="+", default=[15.0, 20.0],
                    help="mean (max logit - mean logit) the 1,000-class heads are scaled to")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        result = {"bench": "precision", "device": "cpu", "threads": args.threads,
                  "imagenet_shape": imagenet_shape(args)}
        if args.trained:
            result["trained"] = trained(args, Path(work))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
