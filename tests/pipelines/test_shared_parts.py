"""The parts teachers, labeling, students and the service share, each defined once: the ensemble mean, ViT
tokens as a map, a layer's output captured by a hook, top-1/top-5, atomic JSON writes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from class_sorted import class_sorted_labels
from torch import nn

from stillroom.pipelines.core import UsageError, write_json
from stillroom.pipelines.teachers import as_feature_map, ensemble_log_probs, forward_capturing
from stillroom.pipelines.training import eval_subset, top1_top5


def test_ensemble_log_probs_is_the_log_of_the_mean_probability():
    members = [torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 3.0, 1.0]])]
    mean = (members[0].softmax(1) + members[1].softmax(1)) / 2
    torch.testing.assert_close(ensemble_log_probs(members), mean.log())
    torch.testing.assert_close(ensemble_log_probs(members[:1]), members[0])  # one member: its own logits
    far = [torch.tensor([[0.0, -200.0]]), torch.tensor([[0.0, -300.0]])]  # the tail stays finite in log space
    assert math.isfinite(float(ensemble_log_probs(far)[0, 1]))


def test_vit_tokens_become_the_patch_grid_and_maps_pass_through():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # a class token and 2x2 patches
    grid = as_feature_map(tokens)
    assert grid.shape == (2, 3, 2, 2)
    torch.testing.assert_close(grid[1, :, 0, 1], tokens[1, 2])  # row 0, column 1: the second patch token
    fmap = torch.randn(2, 3, 4, 4)
    assert as_feature_map(fmap) is fmap
    with pytest.raises(UsageError, match=r"expected \(B, C, H, W\)"):
        as_feature_map(torch.randn(2, 3))


def test_forward_capturing_returns_the_layer_output_and_removes_its_hook():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    out, hidden = forward_capturing(model[1], lambda: model(x))
    torch.testing.assert_close(out, model(x))
    torch.testing.assert_close(hidden, model[0](x).relu())
    assert not model[1]._forward_hooks
    with pytest.raises(UsageError, match="did not run"):
        forward_capturing(nn.Linear(1, 1), lambda: model(x))


def test_top1_top5_counts_over_batches():
    labels = np.array([0, 1, 2, 3, 4, 5, 0])
    ranks = [1, 1, 2, 5, 6, 1, 3]  # where each sample's class ranks among the 6 scores
    scores = torch.zeros(7, 6)
    for i, (y, rank) in enumerate(zip(labels, ranks, strict=True)):
        others = [c for c in range(6) if c != y]
        scores[i, others] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
        scores[i, y] = 5.5 - (rank - 1)
    top1, top5 = top1_top5(lambda ids: scores[ids], labels, 7, batch_size=3)
    assert (top1, top5) == (3 / 7, 6 / 7)
    assert top1_top5(lambda ids: scores[ids], labels, 3) == (2 / 3, 1.0)  # only the first n samples
    assert top1_top5(lambda ids: scores[ids, :2], labels % 2, 7) == (4 / 7, 1.0)  # 2 classes: top-5 is top-2
    assert top1_top5(lambda ids: scores[ids], labels, np.array([0, 4, 6]), batch_size=2) == (1 / 3, 2 / 3)


def test_eval_subset_is_class_balanced_and_fixed_on_a_class_sorted_split():
    val = np.repeat(np.arange(1000), 50)  # ImageNet val: 50,000 ids, 50 a class, sorted
    assert len(np.unique(val[:5000])) == 100  # what the first 5,000 were: a tenth of the classes
    for limit in (5000, 1500, 999):
        ids = eval_subset(val, limit)
        counts = np.bincount(val[ids], minlength=1000)
        assert len(ids) == limit and len(np.unique(ids)) == limit
        assert counts.max() - counts.min() <= 1, (limit, counts.min(), counts.max())
        np.testing.assert_array_equal(ids, eval_subset(val, limit))  # fixed: every run scores the same subset
    assert not np.array_equal(eval_subset(val, 5000), eval_subset(val, 5000, seed=1))
    # random within a class: class 7's five are not its first five
    assert set(eval_subset(val, 5000)[val[eval_subset(val, 5000)] == 7]) != set(range(350, 355))
    train = class_sorted_labels()  # 1,281,167 ids, classes of 732 to 1,300
    counts = np.bincount(train[eval_subset(train, 10_000)], minlength=1000)
    assert counts.min() == 10 and counts.max() == 10
    # a class with too few samples gives what it has; the others fill the subset
    uneven = np.repeat(np.arange(3), [2, 50, 50])
    assert np.bincount(uneven[eval_subset(uneven, 30)]).tolist() == [2, 14, 14]
    np.testing.assert_array_equal(eval_subset(uneven, 500), np.arange(102))


def test_write_json_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "record.json"
    write_json(path, {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1} and path.read_text().startswith('{\n  "a"')
    write_json(path, {"c": 3}, indent=None)
    assert path.read_text() == '{"c": 3}' and [p.name for p in tmp_path.iterdir()] == ["record.json"]
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert path.read_text() == '{"c": 3}' and [p.name for p in tmp_path.iterdir()] == ["record.json"]
