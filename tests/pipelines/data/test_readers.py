"""Data sets on disk: an image folder of 200 variable-size JPEGs and the same as Parquet shards.

Opening reads an index (no decoding), a second open reuses the cached index, fingerprints cover the encoded
bytes, bad files are named, and views are the same pixels in any process, batch size and worker count."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from image_data import CLASSES, jpeg_bytes, write_image_folder, write_parquet
from PIL import Image

from stillroom.pipelines.core import UsageError
from stillroom.pipelines.data import DataError, ImageFolder, ParquetShards, load_dataset
from stillroom.pipelines.data import probe as probe_module
from stillroom.pipelines.views import (
    COL,
    build_views,
    decode_view,
    draft_scale,
    draw_views,
    eval_views,
    get_recipe,
    mix_views,
    render_batch,
    render_views,
)

MIX = "fmnist-rrc-mix:size=32"  # crops, flips, mixup and cutmix, at 32 px


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory, folder) -> Path:
    return write_parquet(tmp_path_factory.mktemp("parquet"), folder)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".stillroom-index"))
    return dst


def test_open_reads_headers_not_pixels(folder, decodes):
    ds = ImageFolder(folder, "train")
    assert decodes[0] == 0
    assert len(ds) == 200 and ds.num_classes == 4 and ds.class_names == CLASSES
    assert np.bincount(ds.labels).tolist() == [50] * 4
    for i in (0, 57, 199):
        with Image.open(ds.path(i)) as img:
            assert tuple(ds.sizes[i]) == (img.height, img.width)
    assert len(set(map(tuple, ds.sizes.tolist()))) > 50  # variable sizes, each its own
    views, _ = build_views(ds, get_recipe("imagenet-rrc:size=32"), 0, np.arange(8))
    assert decodes[0] == 8 and views.shape == (8, 3, 32, 32) and views.dtype == torch.float32
    val = load_dataset(f"imagefolder:{folder}", "val")
    assert len(val) == 20 and load_dataset(f"imagefolder:{folder}", "test").fingerprint == val.fingerprint


def test_second_open_reads_the_cached_index(tmp_path, folder, monkeypatch):
    root = _copy(folder, tmp_path / "data")
    first = ImageFolder(root, "train")
    assert not first.index_reused and first.cache_path == root / ".stillroom-index" / "imagefolder-train.npz"
    probes = [0]
    probe = probe_module.probe

    def counting(data, where):
        probes[0] += 1
        return probe(data, where)

    monkeypatch.setattr(probe_module, "probe", counting)
    second = ImageFolder(root, "train")
    assert second.index_reused and probes[0] == 0
    assert second.fingerprint == first.fingerprint and np.array_equal(second.sizes, first.sizes)
    # the cache lives under $STILLROOM_CACHE when that is set
    monkeypatch.setenv("STILLROOM_CACHE", str(tmp_path / "cache"))
    third = ImageFolder(root, "train")
    assert third.cache_path.parent == tmp_path / "cache" / "index" and probes[0] == 200


def test_fingerprint_covers_bytes_not_place(tmp_path, folder, shards):
    a = _copy(folder, tmp_path / "a")
    before = ImageFolder(a, "train")
    moved = a.rename(tmp_path / "moved")
    after = ImageFolder(moved, "train")
    assert after.index_reused and after.fingerprint == before.fingerprint
    # the same bytes and labels in Parquet shards are the same data set
    assert ParquetShards(str(shards), "train").fingerprint == before.fingerprint
    victim = moved / "train" / "cat" / sorted(p.name for p in (moved / "train" / "cat").iterdir())[5]
    victim.write_bytes(jpeg_bytes(30, 40, seed=7))
    changed = ImageFolder(moved, "train")
    assert changed.fingerprint != before.fingerprint and not changed.index_reused
    assert np.array_equal(np.delete(changed.sizes, 105, 0), np.delete(before.sizes, 105, 0))
    assert tuple(changed.sizes[105]) == (30, 40)  # only that file was probed again


def test_bad_files_are_named_or_skipped(tmp_path, folder):
    root = _copy(folder, tmp_path / "bad")
    good = (root / "train" / "dog" / "train_0003.JPEG").read_bytes()
    (root / "train" / "dog" / "zz_truncated.JPEG").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"zz_truncated\.JPEG: truncated JPEG"):
        load_dataset(f"imagefolder:{root}")
    (root / "train" / "bee" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"bee/notes\.txt: not an image .*and 1 more"):
        ImageFolder(root)
    skipping = load_dataset(f"imagefolder:{root},bad=skip")
    assert len(skipping) == 200 and len(skipping.skipped) == 2
    assert any("zz_truncated.JPEG" in s for s in skipping.skipped)
    # a file cut after its header passes the index when its end is intact, then fails by name when decoded
    with pytest.raises(DataError, match="broken.JPEG: cannot decode"):
        decode_view(good[:200] + good[-2:], "broken.JPEG", np.array([0, 0, 1, 1, 0.0]), 16, False)


def test_structure_errors(tmp_path, folder, shards):
    root = _copy(folder, tmp_path / "s")
    shutil.rmtree(root / "val" / "dog")
    with pytest.raises(UsageError, match="lacks class folder 'dog'"):
        ImageFolder(root, "val")
    with pytest.raises(UsageError, match="no split folders .* so it has no val split"):
        ParquetShards(str(shards / "train"), "val")
    shutil.rmtree(root / "val")
    with pytest.raises(UsageError, match="has no test/ folder: it has train/"):
        ImageFolder(root, "test")
    for f in (root / "train" / "ant").iterdir():
        f.unlink()
    with pytest.raises(UsageError, match="class folder .*ant is empty"):
        ImageFolder(root, "train")
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "p" / "train").mkdir(parents=True)
    pq.write_table(pa.table({"img": [b"x"], "label": [0]}), tmp_path / "p" / "train" / "a.parquet")
    with pytest.raises(UsageError, match="has no 'image' column"):
        load_dataset(f"parquet:{tmp_path / 'p'}")
    with pytest.raises(UsageError, match="has no test split"):
        load_dataset(f"parquet:{shards}/train/*.parquet", "test")


def test_bad_parquet_rows_are_named_or_skipped(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = jpeg_bytes(30, 20)
    rows = [good, good[:300], b"", good]  # a truncated row, an empty one
    (tmp_path / "train").mkdir()
    table = pa.table({"image": [{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(rows)], "label": [0, 1, 1, 0]})
    pq.write_table(table, tmp_path / "train" / "a.parquet", row_group_size=2)
    with pytest.raises(DataError, match=r"a\.parquet row group 0 row 1: not an image .*and 1 more"):
        load_dataset(f"parquet:{tmp_path}")
    ds = load_dataset(f"parquet:{tmp_path},bad=skip")
    assert len(ds) == 2 and ds.num_classes == 2 and ds.labels.tolist() == [0, 0]
    assert "row group 1 row 0: empty file" in ds.skipped[1]
    assert [d for d, _ in ds.encoded(np.array([1]))] == [good]


def test_parquet_index_and_row_groups(shards, folder, decodes):
    ds = ParquetShards(str(shards), "train")
    assert decodes[0] == 0 and len(ds) == 200 and ds.class_names == CLASSES
    files = ImageFolder(folder, "train")
    assert np.array_equal(ds.sizes, files.sizes) and np.array_equal(ds.labels, files.labels)
    ids = np.array([199, 3, 150, 4])
    assert [d for d, _ in ds.encoded(ids)] == [d for d, _ in files.encoded(ids)]
    recipe = get_recipe(MIX)
    assert torch.equal(build_views(ds, recipe, 1, ids)[0], build_views(files, recipe, 1, ids)[0])
    assert ParquetShards(str(shards), "train").index_reused
    assert len(ParquetShards(f"{shards}/train/*.parquet", "train")) == 200


def test_views_are_per_image_and_bit_identical_everywhere(folder):
    ds = load_dataset(f"imagefolder:{folder}")
    recipe = get_recipe(MIX)
    ids = np.arange(0, 200, 5)
    whole, params = build_views(ds, recipe, 3, ids)
    assert (params[:, COL["mix_mode"]] > 0).any()
    for size in (1, 7, 40):
        parts = [build_views(ds, recipe, 3, ids[i : i + size])[0] for i in range(0, len(ids), size)]
        assert torch.equal(torch.cat(parts), whole)
    # the student's path: stored params, no drawing
    assert torch.equal(build_views(ds, recipe, 3, ids, params=params)[0], whole)
    # crop fractions refer to each image's own size: the aspect drawn is in [3/4, 4/3] in that image's pixels
    rrc = draw_views(get_recipe("imagenet-rrc"), 0, np.arange(200), 200, ds.sizes)
    aspect = (rrc[:, 3] * ds.sizes[:, 1]) / (rrc[:, 2] * ds.sizes[:, 0])
    fitted = (rrc[:, 2] < 1) & (rrc[:, 3] < 1)
    assert fitted.sum() > 150 and np.all((aspect[fitted] > 0.7) & (aspect[fitted] < 1.4))
    # worker processes (a DataLoader over render_batch) hand over uint8 views, mixed after
    loader = torch.utils.data.DataLoader(_Batches(ds, ids, params, 32), batch_size=None, num_workers=2)
    own, partner = (torch.cat(t) for t in zip(*[(o, p if p is not None else o) for o, p in loader], strict=True))
    assert own.dtype == torch.uint8 and torch.equal(mix_views(own, partner, params), whole)
    # another process
    code = ("import json, numpy as np; from stillroom.pipelines.data import load_dataset; "
            "from stillroom.pipelines.views import build_views, get_recipe; "
            f"v, _ = build_views(load_dataset('imagefolder:{folder}'), get_recipe({MIX!r}), 3, np.arange(0, 200, 5)); "
            "print(json.dumps((v * 255).round().flatten().tolist()))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out) == (whole * 255).round().flatten().tolist()


class _Batches(torch.utils.data.Dataset):
    """Batches of 9 ids rendered in a worker process."""

    def __init__(self, ds, ids, params, size):
        self.ds, self.ids, self.params, self.size = ds, ids, params, size

    def __len__(self):
        return -(-len(self.ids) // 9)

    def __getitem__(self, i):
        rows = slice(9 * i, 9 * i + 9)
        return render_batch(self.ds, self.ids[rows], self.params[rows], self.size, get_recipe(MIX).draft)


def test_odd_files_become_rgb_and_draft_decoding(folder):
    ds = load_dataset(f"imagefolder:{folder}")
    full = np.array([[0, 0, 1, 1, 0]] * 4, dtype=np.float32)
    odd = np.array([0, 50, 100, 150])  # grayscale, CMYK, PNG named .JPEG, a 320x480 JPEG: the first of each class
    views = eval_views(ds, odd, 32)
    assert views.shape == (4, 3, 32, 32)
    assert float(views[0, 0].sub(views[0, 1]).abs().max()) == 0  # gray stays gray in RGB
    big = [d for d, _ in ds.encoded(odd[3:])][0]
    assert tuple(ds.sizes[150]) == (320, 480) and draft_scale((1.0, 1.0), (320, 480), 32) == 8
    drafted = decode_view(big, "big", full[0], 32, draft=True).astype(np.int16)
    exact = decode_view(big, "big", full[0], 32, draft=False).astype(np.int16)
    assert 0 < np.abs(drafted - exact).mean() < 4  # a recorded, small change (recipe.draft)
    assert np.array_equal(decode_view(big, "big", full[0], 32, draft=True), drafted)


def test_views_of_one_image_share_its_decode_and_equal_each_view_alone(folder, monkeypatch):
    """FKD's multi-crop: a sample that appears K times in a batch is decoded once for each DCT scale its crops take
    and cropped K times; every view is bit-identical to rendering it alone."""
    from PIL import Image

    ds = load_dataset(f"imagefolder:{folder}")
    ids = np.array([150, 3, 150, 150, 3, 150])  # the 320x480 JPEG four times, a small one twice
    boxes = np.array([[0, 0, 1, 1, 0], [0.1, 0.2, 0.5, 0.5, 1], [0.25, 0.25, 0.5, 0.5, 1],
                      [0, 0, 0.1, 0.1, 0], [0, 0, 1, 1, 1], [0.5, 0.5, 0.5, 0.5, 0]], dtype=np.float32)
    assert [draft_scale((b[2], b[3]), (320, 480), 32) for b in boxes[[0, 2, 3, 5]]] == [8, 4, 1, 4]
    alone = np.stack([decode_view(d, w, b, 32, True) for (d, w), b in zip(ds.encoded(ids), boxes, strict=True)])
    opens = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opens.append(1) or real_open(*a, **k))
    together = render_views(ds, ids, boxes, 32, draft=True)
    assert np.array_equal(together.permute(0, 2, 3, 1).numpy(), alone)
    assert len(opens) == 3 + 1  # the big one at scales 8, 4 and 1; the small one once
    opens.clear()
    exact = render_views(ds, ids, boxes, 32, draft=False).permute(0, 2, 3, 1).numpy()
    assert len(opens) == 2  # without DCT scaling: one decode an image
    assert np.array_equal(exact, np.stack([decode_view(d, w, b, 32, False)
                                           for (d, w), b in zip(ds.encoded(ids), boxes, strict=True)]))


def test_recipes_carry_their_output_size(folder):
    ds = load_dataset(f"imagefolder:{folder}")
    assert get_recipe("imagenet-rrc").out_size == 224 and get_recipe("imagenet-rrc:size=112").out_size == 112
    assert get_recipe("imagenet-rrc:size=112").digest != get_recipe("imagenet-rrc").digest
    with pytest.raises(UsageError, match="fmnist-rrc has no output size .* fmnist-rrc:size=N"):
        build_views(ds, get_recipe("fmnist-rrc"), 0, np.arange(2))
    with pytest.raises(UsageError, match="bad recipe option 'px=3'"):
        get_recipe("imagenet-rrc:px=3")
    # eval: the centred square of 224/256 of the shorter side
    p = draw_views(get_recipe("imagenet-eval"), 0, np.arange(200), 200, ds.sizes)
    short = np.minimum(ds.sizes[:, 0], ds.sizes[:, 1])
    np.testing.assert_allclose(p[:, 2] * ds.sizes[:, 0], short * 0.875, atol=ds.sizes.max() / 2048)
    np.testing.assert_allclose(p[:, 0] + p[:, 2] / 2, 0.5, atol=1 / 2048)
