"""The tail a label store keeps (``tail_lse``), end to end: teacher logits -> ``topk_arrays`` -> a real store on
disk -> ``soft_targets_from_topk`` at T = 1, 2, 4, 8, held to the equal-tail approximation's own error."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from stillroom.pipelines.labeling import topk_arrays
from stillroom.pipelines.store import MANIFEST, LabelStore, StoreError, StoreSchema
from stillroom.pipelines.teachers import ensemble_log_probs
from stillroom.student.losses import soft_targets_from_topk

TOP_K = 5


def confident_teacher(num_classes: int, rows: int = 64) -> torch.Tensor:
    """float64 logits: random ones plus a top class ahead by margins from 4 to 20."""
    g = torch.Generator().manual_seed(num_classes)
    logits = torch.randn(rows, num_classes, generator=g, dtype=torch.float64)
    margin = torch.linspace(4.0, 20.0, rows, dtype=torch.float64)
    top = torch.randint(0, num_classes, (rows,), generator=g)
    logits[torch.arange(rows), top] = logits.max(1).values + margin
    return logits


def equal_tail(logits: torch.Tensor, k: int, T: float) -> torch.Tensor:
    """The equal-tail approximation in float64 from the full logits: the best a top-k + tail rebuild can be."""
    values, idx = logits.topk(k, dim=1)
    tail = torch.logsumexp(logits.scatter(1, idx, float("-inf")), 1, keepdim=True) - math.log(logits.shape[1] - k)
    return torch.softmax(tail.expand(-1, logits.shape[1]).scatter(1, idx, values) / T, 1)


def tv(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return 0.5 * (p - q).abs().sum(1)


@pytest.mark.parametrize("num_classes", [10, 1000])
def test_rebuilt_tempered_targets_are_within_the_equal_tail_error(tmp_path, num_classes):
    logits = confident_teacher(num_classes)
    rows = logits.shape[0]
    # format 2's float16 logits (format 3's codes: test_store_format3)
    schema = StoreSchema(num_samples=rows, num_classes=num_classes, top_k=TOP_K, chunk_rows=rows, format_version=2)
    store = LabelStore.create(tmp_path, {"test": "tail", "classes": num_classes}, schema)
    arrays = topk_arrays(logits.float(), TOP_K)
    arrays.update(view=np.zeros((rows, 17), np.float32))
    store.begin_seed(0)
    store.write_piece(0, 0, 0, arrays)
    store.commit_seed(0)
    held = LabelStore(store.path).load(0).arrays
    assert held["tail_lse"].dtype == np.float32 and held["topk_logit"].dtype == np.float16

    idx = torch.from_numpy(held["topk_idx"]).long()
    # float16 keeps a logit to within half a unit in the last place: the rebuild may be that much further off
    f16_error = (torch.from_numpy(held["topk_logit"]).double() - logits.gather(1, idx)).abs().max(1).values
    for T in (1.0, 2.0, 4.0, 8.0):
        exact = torch.softmax(logits / T, 1)
        rebuilt = soft_targets_from_topk(idx, torch.from_numpy(held["topk_logit"]), torch.from_numpy(held["tail_lse"]),
                                         num_classes, T=T).double()
        approx = equal_tail(logits, TOP_K, T)
        allowed = tv(approx, exact) + f16_error / T + 1e-6
        assert (tv(rebuilt, exact) <= allowed).all(), (T, float((tv(rebuilt, exact) - allowed).max()))
        # the tempered tail keeps its mass, however small the untempered one (e^-20 and less here): the part
        # that 1 - sum(p_top) from float16 logits rounds to 0 or to noise
        tail = lambda q: q.scatter(1, idx, 0.0).sum(1)  # noqa: E731
        torch.testing.assert_close(tail(rebuilt), tail(approx), rtol=3 * f16_error.max().item() / T + 1e-5, atol=1e-9)


def test_the_ensemble_tail_is_the_log_of_its_averaged_probabilities_tail():
    members = [torch.randn(8, 50, generator=torch.Generator().manual_seed(i), dtype=torch.float64) * 4
               for i in range(3)]
    mean = torch.stack([m.softmax(1) for m in members]).mean(0)
    arrays = topk_arrays(ensemble_log_probs([m.float() for m in members]), TOP_K)
    idx = torch.from_numpy(arrays["topk_idx"]).long()
    tail_mass = 1 - mean.gather(1, idx).sum(1)
    got = torch.from_numpy(arrays["tail_lse"]).double() - torch.from_numpy(arrays["lse"]).double()
    torch.testing.assert_close(got, tail_mass.log(), rtol=0, atol=1e-5)


def test_all_classes_in_the_top_k_leave_no_tail():
    arrays = topk_arrays(torch.randn(3, 4), 4)
    assert np.isneginf(arrays["tail_lse"]).all()


def test_a_store_of_the_old_format_is_refused_with_relabel(tmp_path):
    schema = StoreSchema(num_samples=8, num_classes=4, top_k=2, chunk_rows=8)
    store = LabelStore.create(tmp_path, {"test": "old"}, schema)
    manifest = json.loads((store.path / MANIFEST).read_text())
    manifest["format_version"] = 1
    (store.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="format version 1.*tail_lse.*relabel"):
        LabelStore(store.path)
