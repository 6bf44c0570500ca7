"""The views a label worker feeds its teacher, as a stream: built ahead of the teacher, off its thread.

For a data set on disk, a small pool of worker processes (a ``torch.utils.data.DataLoader`` with
``batch_size=None`` and persistent workers, kept for every piece the label worker labels; its sampler yields the
piece's ``(seed, ids)`` batches) reads each batch's encoded bytes, draws its view parameters, decodes and crops
(``pipelines.views.render_batch``) and hands over uint8 views in shared memory, ``prefetch`` batches ahead,
while the teacher's forward runs on the worker's own thread(s). The teacher's device receives uint8 (a quarter
of float32's bytes; pinned host memory on CUDA) and finishes the views there (``mix_views``, then the
teacher's ``Preprocess`` normalises). No process holds the data set: each holds its index (labels, sizes,
where the bytes are).

With ``decode="gpu"`` (only when asked: ``--decode gpu``) the worker processes only read the bytes; JPEGs are
decoded in batches by ``torchvision.io.decode_jpeg(list, device="cuda")`` and each crop is resized on the GPU
(``decode_views_torch``; on a CPU device the same calls run there). Those pixels differ slightly from the PIL views
students replay (no DCT-scaled decode, another resampling filter): the store's provenance records it, so it is
another cache key, and a student replaying such a store is told (``student.data.replay_note``).

An in-memory data set (Fashion-MNIST) has nothing to decode: its views are built in the worker's thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stillroom.pipelines.views import (
    COL,
    MIX_NONE,
    Recipe,
    apply_views,
    build_views,
    draw_views,
    output_size,
    partner_ids,
    render_batch_at,
)

PREFETCH = 2  # batches each worker process builds ahead


@dataclass
class ViewBatch:
    """One batch on its way to the teacher: ids, view parameters, and either float views (in memory) or uint8
    views and, where some row mixes, the partners' uint8 views (on disk), each by size: one per teacher input
    size, all rendered from the source image by the same stored boxes."""

    ids: np.ndarray
    params: np.ndarray
    views: dict[int, torch.Tensor] | None = None
    own: dict[int, torch.Tensor] | None = None
    partner: dict[int, torch.Tensor] | None = None
    encoded: list[tuple[bytes, str]] | None = None  # decode="gpu": the bytes, decoded on the device
    partner_encoded: list[tuple[bytes, str]] | None = None
    failed: dict[int, str] | None = None  # ``,bad=skip``: rows whose image (or mixing partner) failed to decode


class _ViewSource(torch.utils.data.Dataset):
    """Batches of views of a data set on disk, built in a worker process: an item is ``(seed, ids)``; it is drawn
    and rendered there (``render_batch``: decode, crop, uint8), or only read with ``decode="gpu"``."""

    def __init__(self, dataset, recipe: Recipe, decode: str, sizes: tuple[int, ...]):
        self.dataset, self.recipe, self.decode, self.sizes = dataset, recipe, decode, sizes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[tuple[int, ...], np.ndarray]) -> ViewBatch:  # type: ignore[override]
        seeds, ids = item  # the views of ids under each seed, seed after seed: each image read (and decoded) once
        params = np.concatenate([draw_views(self.recipe, seed, ids, len(self.dataset), self.dataset.sizes)
                                 for seed in seeds])
        ids = np.tile(ids, len(seeds))
        if self.decode == "gpu":
            mixing = params[:, COL["mix_mode"]] != MIX_NONE
            partners = self.dataset.encoded(partner_ids(params, ids)[mixing]) if mixing.any() else None
            return ViewBatch(ids, params, encoded=self.dataset.encoded(ids), partner_encoded=partners)
        failed: dict[int, str] | None = {} if getattr(self.dataset, "bad", "stop") == "skip" else None
        own, partner = render_batch_at(self.dataset, ids, params, self.sizes, self.recipe.draft, self.recipe, failed)
        return ViewBatch(ids, params, own=own, partner=partner, failed=failed or None)


class _Items(torch.utils.data.Sampler):
    """The loader's order: the ``(seeds, ids)`` batches of the piece at hand, replaced for each piece."""

    def __init__(self) -> None:
        self.items: list[tuple[tuple[int, ...], np.ndarray]] = []

    def __iter__(self) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def _keep(batch: Any) -> Any:
    """The DataLoader's collate for ``batch_size=None``: each item is a whole batch already."""
    return batch


def view_size(recipe: Recipe, dataset) -> int:
    """The side of the recipe's views: its output size, or the in-memory data set's own."""
    return int(output_size(recipe, dataset) or dataset.image_shape[1])


class ViewStream:
    """The views of one label worker, batch by batch, in order, at each of ``sizes`` (default: the recipe's view
    size). On disk: ``workers`` decode processes (kept for every piece this worker labels) build them
    ``PREFETCH`` batches ahead each; 0 builds them here. In memory: float views built here (nothing to decode)."""

    def __init__(self, dataset, recipe: Recipe, workers: int, decode: str = "cpu", pin_memory: bool = False,
                 sizes: tuple[int, ...] | None = None):
        self.dataset, self.recipe, self.workers, self.decode = dataset, recipe, workers, decode
        self.sizes = tuple(sorted(set(sizes))) if sizes else (view_size(recipe, dataset),)
        self.pin_memory = pin_memory
        self._items = _Items()
        self._loader: torch.utils.data.DataLoader | None = None

    def batches(self, seeds: int | tuple[int, ...], ids: np.ndarray, batch_size: int) -> Iterator[ViewBatch]:
        """Batches of about ``batch_size`` views: each holds the views of ``batch_size // len(seeds)`` ids under
        every seed, seed after seed (``ViewBatch.ids`` repeats them), so an image is decoded once for all its
        seeds."""
        seeds = (seeds,) if isinstance(seeds, int) else tuple(seeds)
        step = max(1, batch_size // len(seeds))
        chunks = [ids[s : s + step] for s in range(0, len(ids), step)]
        if self.dataset.in_memory:
            yield from (self._in_memory(seeds, batch) for batch in chunks)
            return
        if self.workers <= 0:
            source = _ViewSource(self.dataset, self.recipe, self.decode, self.sizes)
            yield from (source[(seeds, batch)] for batch in chunks)
            return
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(
                _ViewSource(self.dataset, self.recipe, self.decode, self.sizes), batch_size=None, sampler=self._items,
                num_workers=self.workers, prefetch_factor=PREFETCH, persistent_workers=True, collate_fn=_keep)
        self._items.items = [(seeds, batch) for batch in chunks]
        for batch in self._loader:
            if self.pin_memory and batch.own is not None:
                batch.own = {size: v.pin_memory() for size, v in batch.own.items()}
                if batch.partner is not None:
                    batch.partner = {size: v.pin_memory() for size, v in batch.partner.items()}
            yield batch

    def _in_memory(self, seeds: tuple[int, ...], ids: np.ndarray) -> ViewBatch:
        if len(seeds) > 1:
            parts = [self._in_memory((seed,), ids) for seed in seeds]
            return ViewBatch(np.tile(ids, len(seeds)), np.concatenate([b.params for b in parts]),
                             views={size: torch.cat([b.views[size] for b in parts])  # type: ignore[index]
                                    for size in self.sizes})
        views, params = build_views(self.dataset, self.recipe, seeds[0], ids)
        out = {}
        for size in self.sizes:  # another size: the same boxes applied to the source images at that size
            if size == views.shape[-1]:
                out[size] = views
            else:
                images = self.dataset.read(ids)
                partners = partner_ids(params, ids)
                out[size] = apply_views(images, params, size,
                                        images if np.array_equal(partners, ids) else self.dataset.read(partners),
                                        self.recipe)
        return ViewBatch(ids, params, views=out)

    def close(self) -> None:
        """End the decode processes."""
        if self._loader is not None and self._loader._iterator is not None:
            self._loader._iterator._shutdown_workers()  # type: ignore[attr-defined]
        self._loader = None


def decode_views_torch(encoded: list[tuple[bytes, str]], boxes: np.ndarray, out_size: int,
                       device: torch.device | str) -> torch.Tensor:
    """uint8 ``(B, 3, S, S)`` views on ``device`` from encoded images: JPEGs decoded together by
    ``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG on CUDA), other formats one by one on the CPU; each
    crop ``(y0, x0, h, w, flip)`` resampled to ``S x S`` by ``roi_align`` (bilinear samples averaged over each
    output pixel's footprint, i.e. antialiased when shrinking), then flipped."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    from torchvision.ops import roi_align

    from stillroom.pipelines.data import DataError

    device = torch.device(device)
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b, _ in encoded]
    is_jpeg = [b[:3] == b"\xff\xd8\xff" for b, _ in encoded]
    images: dict[int, torch.Tensor] = {}
    jpegs = [i for i, j in enumerate(is_jpeg) if j]
    if jpegs:
        try:
            decoded = decode_jpeg([data[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
            images.update(zip(jpegs, decoded, strict=True))
        except RuntimeError:  # one odd file (e.g. CMYK on nvJPEG) fails the batch: those are decoded one by one
            pass
    for i in range(len(encoded)):
        if i in images:
            continue
        try:
            images[i] = decode_image(data[i], mode=ImageReadMode.RGB).to(device)
        except RuntimeError as e:
            raise DataError(f"{encoded[i][1]}: cannot decode ({str(e).splitlines()[0][:120]})") from None
    out = torch.empty((len(encoded), 3, out_size, out_size), dtype=torch.uint8, device=device)
    for row in range(len(encoded)):
        img = images[row]
        H, W = img.shape[1:]
        y0, x0, h, w, flip = (float(v) for v in boxes[row][:5])
        box = torch.tensor([[0.0, x0 * W, y0 * H, (x0 + w) * W, (y0 + h) * H]], device=device)
        view = roi_align(img[None].float(), box, output_size=out_size, spatial_scale=1.0, sampling_ratio=-1,
                         aligned=True)[0]
        out[row] = (view.flip(-1) if flip else view).round_().clamp_(0, 255).to(torch.uint8)
    return out
