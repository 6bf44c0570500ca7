"""``convert_store``: a format-2 or format-3 store's copy in today's format (4), without a teacher (``stillroom
store convert``).

Every complete seed is read piece by piece and written again through ``LabelStore.write_piece``, which encodes it
(``codec``) and keeps a digest of each chunk's view parameters in place of them. The copy drops the parameters
only because a reader draws them again: so a format-2 piece's stored parameters are first compared with what this
stillroom draws for them (``draw_views``: recipe, seed, ids, the images' sizes), and a store whose views this
version would not redraw is refused in one line, naming the first row that differs. A format-3 store holds their
digests instead: the parameters are drawn and checked against them, chunk by chunk. With ``store_views`` the
parameters are kept (a format-2 store's as stored, a format-3 store's as drawn and checked).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np

from stillroom.pipelines.core import StoreError, UsageError
from stillroom.pipelines.store.label_store import LabelStore
from stillroom.pipelines.store.lease import SeedLease
from stillroom.pipelines.store.schema import FORMAT_VERSION
from stillroom.pipelines.store.view_digest import view_digests
from stillroom.pipelines.views import Recipe, draw_views


def convert_store(src: LabelStore, dst_root: str | os.PathLike, recipe: Recipe, sizes: Any,
                  store_views: bool = False, poll_s: float = 2.0) -> LabelStore:
    """Write ``src`` (format 2 or 3) as a store of today's format under ``dst_root``; return it. ``sizes``: what the
    labeler handed ``draw_views`` (an in-memory data set's ``(H, W)``, else each image's, ``dataset.sizes``). A seed the
    copy has already is kept; one begun is finished (its written pieces kept). Each seed is written under its lease
    (``SeedLease``), as a label job writes it: a seed another convert (or label job) is writing is waited for
    (every ``poll_s`` seconds), one whose writer died is taken over."""
    if src.schema.format_version >= FORMAT_VERSION:
        raise UsageError(f"{src.path} is store format {src.schema.format_version} already: nothing to convert")
    schema = replace(src.schema, format_version=FORMAT_VERSION, store_views=store_views)
    sources = {**src.manifest.get("sources", {}), "converted_from": {"cache_key": src.cache_key,
                                                                     "format_version": src.schema.format_version}}
    dst = LabelStore.create(dst_root, src.provenance, schema, sources=sources)
    for seed in src.seeds():
        if dst.is_complete(seed):
            continue
        lease = dst.lease(seed)  # as a label job writes a seed: one writer at a time, a dead one's pieces kept
        told = False
        while not lease.acquire():
            if dst.is_complete(seed):
                break
            if not told:
                print(f"seed {seed} of {dst.path} is being written by {lease.describe()}: waiting for it",
                      file=sys.stderr)
                told = True
            time.sleep(poll_s)
        else:
            try:
                if not dst.is_complete(seed):  # unless committed by the holder before
                    _convert_seed(src, dst, seed, recipe, sizes, store_views, lease)
            finally:
                lease.release(final=dst.is_complete(seed))
    return dst


def _convert_seed(src: LabelStore, dst: LabelStore, seed: int, recipe: Recipe, sizes: Any, store_views: bool,
                  lease: SeedLease) -> None:
    """Write one seed of ``src`` into ``dst`` under ``lease`` (its generation fences every piece); commit it."""
    schema, n = dst.schema, dst.schema.num_samples
    dst.begin_seed(seed)
    done = dst.done_pieces(seed)
    for piece, (start, stop) in enumerate(schema.pieces()):
        if piece in done:
            continue
        rows = src.load(seed, rows=(start, stop)).arrays
        if "view" not in rows:  # format 3: the digests of what the labeler drew
            rows["view"] = draw_views(recipe, seed, np.arange(start, stop), n, sizes)
            want = src.view_record(seed)["views"]["chunk_sha256"][start // schema.chunk_rows:]
            for c, got in enumerate(view_digests(rows["view"], schema.chunk_rows)["chunk_sha256"]):
                if got != want[c]:
                    raise StoreError(f"{src.path} seed {seed} chunk {start // schema.chunk_rows + c}: the view "
                                     f"parameters this stillroom draws for recipe {recipe.name} differ from those "
                                     "labeled (digest mismatch): convert it with the stillroom that wrote it")
        elif not store_views:
            drawn = draw_views(recipe, seed, np.arange(start, stop), n, sizes)
            differ = np.flatnonzero((drawn != rows["view"]).any(1))
            if differ.size:
                raise StoreError(f"{src.path} seed {seed} row {start + int(differ[0])}: the stored view parameters "
                                 f"differ from those this stillroom draws for recipe {recipe.name}: they cannot be "
                                 "dropped (convert with --store-views keeps them)")
        dst.write_piece(seed, piece, start, rows, generation=lease.generation)
    dst.commit_seed(seed, lease=lease, quality=src.quality(seed))


__all__ = ["convert_store"]
