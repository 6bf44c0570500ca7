"""``convert_store``: a format-2 store's format-3 copy, without a teacher (``stillroom store convert``).

Every complete seed is read piece by piece and written again through ``LabelStore.write_piece``, which encodes it
(``codec``) and keeps a digest of each chunk's view parameters in place of them. A format-3 store drops the
parameters only because a reader draws them again: so each piece's stored parameters are first compared with what
this stillroom draws for them (``draw_views``: recipe, seed, ids, the images' sizes), and a store whose views this
version would not redraw is refused in one line, naming the first row that differs. With ``store_views`` the
parameters are kept and not compared (nothing is redrawn from such a store).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import numpy as np

from stillroom.pipelines.core import StoreError, UsageError
from stillroom.pipelines.store.label_store import LabelStore
from stillroom.pipelines.store.schema import FORMAT_VERSION
from stillroom.pipelines.views import Recipe, draw_views


def convert_store(src: LabelStore, dst_root: str | os.PathLike, recipe: Recipe, sizes: Any,
                  store_views: bool = False) -> LabelStore:
    """Write ``src`` (format 2) as a format-3 store under ``dst_root``; return it. ``sizes``: what the labeler
    handed ``draw_views`` (an in-memory data set's ``(H, W)``, else each image's, ``dataset.sizes``). A seed the
    copy has already is kept; one begun is finished (its written pieces kept)."""
    if src.schema.format_version >= FORMAT_VERSION:
        raise UsageError(f"{src.path} is store format {src.schema.format_version} already: nothing to convert")
    schema = replace(src.schema, format_version=FORMAT_VERSION, store_views=store_views)
    sources = {**src.manifest.get("sources", {}), "converted_from": {"cache_key": src.cache_key,
                                                                     "format_version": src.schema.format_version}}
    dst = LabelStore.create(dst_root, src.provenance, schema, sources=sources)
    n = schema.num_samples
    for seed in src.seeds():
        if dst.is_complete(seed):
            continue
        dst.begin_seed(seed)
        done = dst.done_pieces(seed)
        for piece, (start, stop) in enumerate(schema.pieces()):
            if piece in done:
                continue
            rows = src.load(seed, rows=(start, stop)).arrays
            if not store_views:
                drawn = draw_views(recipe, seed, np.arange(start, stop), n, sizes)
                differ = np.flatnonzero((drawn != rows["view"]).any(1))
                if differ.size:
                    raise StoreError(f"{src.path} seed {seed} row {start + int(differ[0])}: the stored view parameters "
                                     f"differ from those this stillroom draws for recipe {recipe.name}: they cannot be "
                                     "dropped (convert with --store-views keeps them)")
            dst.write_piece(seed, piece, start, rows)
        dst.commit_seed(seed, quality=src.quality(seed))
    return dst


__all__ = ["convert_store"]
