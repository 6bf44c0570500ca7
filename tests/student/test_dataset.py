"""The public API (``import stillroom``): cheap to import, and a ``ReplayDataset`` that gives the trainer's own views
and labels under a plain DataLoader with workers and a shuffle, a DistributedSampler and a sampler of one's own;
soft targets, mixing and normalisation as the trainer computes them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_teacher
from torch.utils.data import DataLoader, DistributedSampler, Sampler

import stillroom
from stillroom.pipelines.core import UsageError
from stillroom.pipelines.labeling import LabelConfig, run_labeling
from stillroom.pipelines.store import LabelStore
from stillroom.student.data import StoreStream
from stillroom.student.losses import teacher_targets

DATA = "synthetic:n=48,classes=4,size=16"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> LabelStore:
    """Mixing views (partners and lambdas) of in-memory data, two seeds."""
    root = tmp_path_factory.mktemp("stores")
    teacher = make_teacher(tmp_path_factory.mktemp("teacher") / "t.pt")
    config = LabelConfig(dataset=DATA, teachers=(teacher,), recipe="fmnist-rrc-mix", seeds=(0, 1), top_k=3,
                         store_root=str(root), batch_size=48)
    return LabelStore(run_labeling(config, backend="local", progress=False)["store"])


def test_import_stillroom_imports_neither_torch_nor_ray_until_a_name_is_used():
    code = ("import sys, stillroom\n"
            "assert not {'torch', 'ray', 'timm', 'zarr'} & set(sys.modules), sorted(sys.modules)\n"
            "assert set(stillroom.__all__) <= set(dir(stillroom))\n"
            "stillroom.ReplayDataset\n"
            "assert 'torch' in sys.modules and 'ray' not in sys.modules\n"
            "print(stillroom.__version__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert set(stillroom.__all__) == {"__version__", *stillroom._PUBLIC}
    assert all(getattr(stillroom, name) is not None for name in stillroom.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        stillroom.nothing  # noqa: B018


def _trainer_batch(store: LabelStore, ds: stillroom.ReplayDataset, ids: np.ndarray, epoch: int) -> stillroom.Batch:
    stream = StoreStream(store, ds.dataset, ds.recipe, 8, loader_workers=0)
    return stream.make_batch(stream.labels_for_epoch(epoch), ids, epoch)


def test_a_plain_dataloader_with_workers_and_a_shuffle_gives_the_trainers_batches(store):
    ds = stillroom.ReplayDataset(store.path, epoch=1)
    loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=2, collate_fn=stillroom.collate,
                        generator=torch.Generator().manual_seed(0))
    seen = []
    for parts in loader:
        assert parts.pixels.dtype == torch.uint8  # uint8 until the device
        batch = stillroom.finish(parts, torch.device("cpu"))
        own = _trainer_batch(store, ds, batch.ids, 1)
        assert torch.equal(batch.views, own.views) and torch.equal(batch.targets, own.targets)
        assert all(torch.equal(batch.teacher[k], own.teacher[k]) for k in own.teacher)
        seen += batch.ids.tolist()
    assert sorted(seen) == list(range(48)) and seen != sorted(seen)  # every view once, shuffled


class Backwards(Sampler[int]):
    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        return iter(range(self.n - 1, -1, -1))

    def __len__(self) -> int:
        return self.n


def test_distributed_sampler_ranks_are_disjoint_and_a_sampler_of_ones_own_works(store):
    ds = stillroom.ReplayDataset(str(store.path))
    shares = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        shares.append([i for parts in DataLoader(ds, batch_size=6, sampler=sampler, collate_fn=stillroom.collate)
                       for i in parts.ids.tolist()])
    assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == list(range(48))
    ids = [i for parts in DataLoader(ds, batch_size=16, sampler=Backwards(len(ds)), collate_fn=stillroom.collate)
           for i in parts.ids.tolist()]
    assert ids == list(range(47, -1, -1))
    own = ds.batch_sampler(16, rank=1, world_size=2)  # the trainer's order: rank 1's share
    assert sum(len(b) for b in own) == 24 and len(DataLoader(ds, batch_sampler=own, collate_fn=stillroom.collate)) == 2


def test_soft_targets_mixing_and_normalisation_are_the_trainers(store):
    ds = stillroom.ReplayDataset(store.path)
    batch = stillroom.finish(ds.__getitems__(np.arange(48)), torch.device("cpu"))
    for T in (1.0, 4.0):
        p = stillroom.soft_targets(batch, T)
        assert torch.equal(p, teacher_targets(batch.teacher, 4, T)) and torch.allclose(p.sum(1), torch.ones(48))
    assert not torch.equal(stillroom.soft_targets(batch, 1.0), stillroom.soft_targets(batch, 4.0))
    m = stillroom.mixing(batch)
    assert m.mixed.any() and not m.mixed.all()  # the recipe mixes some views
    labels = torch.from_numpy(ds.dataset.labels)
    y, y_partner = labels[batch.ids], labels[m.partner]
    expected = m.lam[:, None] * torch.nn.functional.one_hot(y, 4) + (1 - m.lam[:, None]) * \
        torch.nn.functional.one_hot(y_partner, 4)
    assert torch.allclose(m.targets, expected) and torch.all(m.lam[~m.mixed] == 1)
    assert torch.all((m.lam[m.mixed] > 0) & (m.lam[m.mixed] < 1))
    assert (m.partner[~m.mixed.numpy()] == batch.ids[~m.mixed.numpy()]).all()
    import timm

    model = timm.create_model("test_resnet", num_classes=4, in_chans=1)
    config = stillroom.input_config(model, 1)
    assert torch.allclose(config.normalize(batch.views), (batch.views - config.mean[0]) / config.std[0])


def test_epochs_replay_their_seeds_and_k_views_an_image(store):
    ds = stillroom.ReplayDataset(store.path)
    first = stillroom.finish(ds[5], torch.device("cpu"))
    ds.set_epoch(1)
    second = stillroom.finish(ds[5], torch.device("cpu"))
    assert not torch.equal(first.views, second.views)  # seed 1's view, not seed 0's
    assert torch.equal(second.views, _trainer_batch(store, ds, np.array([5]), 1).views)
    two = stillroom.ReplayDataset(store.path, views_per_image=2)
    assert len(two) == 96
    parts = two.__getitems__([10, 11])  # sample 5's two views: seeds 0 and 1
    assert parts.ids.tolist() == [5, 5] and parts.row_seeds.tolist() == [0, 1]
    with pytest.raises(IndexError, match="out of range"):
        two.__getitems__([96])


def test_a_store_opens_by_its_key_under_a_root_and_a_wrong_one_is_refused(store):
    root, key = Path(store.path).parent, Path(store.path).name
    assert stillroom.open_store(key, str(root)).cache_key == store.cache_key
    with pytest.raises(UsageError, match="neither a label store directory nor the cache key"):
        stillroom.open_store("nokey", str(root))
    with pytest.raises(TypeError, match="expected the BatchParts"):
        stillroom.collate([1, 2])
