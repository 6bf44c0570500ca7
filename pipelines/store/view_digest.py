"""Digests of a seed's view parameters, chunk by chunk: what lets a format-3 store drop the parameters and still say
what each view was.

A writer hands ``write_piece`` the parameters it drew; the store keeps, per chunk, the sha256 of their float32
bytes (``chunk_sha256``) and of the first ``PROBE_ROWS`` rows' (``probe_sha256``). A reader redraws the parameters
(``pipelines.views.draw_views``: a pure function of recipe, seed, sample id and the image's size) and compares.
``check_views`` compares the probes at a seed's load (a few thousand redraws for ImageNet, about 20 ms: a generator
that draws otherwise differs on every row; a random-order epoch of S seeds shares the chunks among them, each
seed checking the first chunk and every S-th), ``full=True`` every row (``stillroom store convert``, a
slow check of a whole seed).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stillroom.pipelines.core import StoreError
from stillroom.pipelines.store.checksums import _sha256
from stillroom.pipelines.views import VIEW_GENERATOR, Recipe, draw_views

PROBE_ROWS = 16  # rows at the start of each chunk whose parameters a reader redraws at load


def view_digests(params: np.ndarray, chunk_rows: int) -> dict[str, list[str]]:
    """The digests of each ``chunk_rows``-row chunk of a block's float32 parameters (starting at a chunk)."""
    params = np.ascontiguousarray(params, dtype=np.float32)
    starts = range(0, len(params), chunk_rows)
    return {"chunk_sha256": [_sha256(params[s : s + chunk_rows]) for s in starts],
            "probe_sha256": [_sha256(params[s : min(s + PROBE_ROWS, s + chunk_rows, len(params))]) for s in starts]}


def check_views(record: dict[str, Any], where: str, recipe: Recipe, seed: int, num_samples: int, chunk_rows: int,
                sizes: Any, full: bool = False, share: tuple[int, int] | None = None) -> int:
    """Redraw the parameters of a seed's probe rows (``full``: of every row) and compare them with the digests in
    its ``COMPLETE`` ``record``; a difference is refused in one line. ``share=(i, S)``: the seed is the i-th of S
    read together, which share the chunks: it checks the first chunk and those ``i`` modulo S (the S seeds every
    chunk between them). Returns the rows redrawn."""
    views = record.get("views")
    if not views:
        raise StoreError(f"{where} seed {seed}: no view digests recorded (written before store format 3?)")
    if views.get("generator") != VIEW_GENERATOR:
        raise StoreError(f"{where} seed {seed}: its views were drawn by view generator {views.get('generator')}; "
                         f"this stillroom draws with {VIEW_GENERATOR}: use the stillroom that labeled it, or relabel")
    key = "chunk_sha256" if full else "probe_sha256"
    which = range(len(views[key])) if share is None else sorted({0, *range(share[0] % share[1], len(views[key]),
                                                                           share[1])})
    spans = [(c * chunk_rows, min(c * chunk_rows + (chunk_rows if full else min(PROBE_ROWS, chunk_rows)), num_samples))
             for c in which]
    if not spans:
        return 0
    # the probe rows of every chunk drawn in one call (each row's parameters depend on its id alone)
    together = None if full else draw_views(recipe, seed, np.concatenate([np.arange(a, b) for a, b in spans]),
                                            num_samples, sizes)
    drawn = 0
    for c, (start, stop) in zip(which, spans, strict=True):
        want = views[key][c]
        params = (draw_views(recipe, seed, np.arange(start, stop), num_samples, sizes) if together is None
                  else together[drawn : drawn + stop - start])
        drawn += stop - start
        if _sha256(np.ascontiguousarray(params, dtype=np.float32)) != want:
            raise StoreError(f"{where} seed {seed} chunk {c}: the view parameters this stillroom draws for recipe "
                             f"{recipe.name} differ from those labeled (digest mismatch): the drawing changed; "
                             "relabel, or read it with the stillroom that wrote it")
    return drawn


__all__ = ["PROBE_ROWS", "check_views", "view_digests"]
