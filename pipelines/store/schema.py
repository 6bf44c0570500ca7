"""What a store holds (``StoreSchema``: the arrays of every seed and their chunking) and the store's cache key
(``cache_key``: a hash of the provenance and the schema, the name of its directory under the store root).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from stillroom.pipelines.core import UsageError
from stillroom.pipelines.store.codec import topk_columns
from stillroom.pipelines.views import NUM_VIEW_PARAMS, VIEW_GENERATOR

# 2: tail_lse (the top-k's complement), label quality in COMPLETE. 3: no view parameters unless asked (a digest a
# chunk, redrawn on read), hard derived from topk_idx, the top-k logits in 8 bits a value (``codec``). 4: the
# second class's code in 16 bits, the k-th gap and the level in float16 (within 0.002 of format 2's targets)
FORMAT_VERSION = 4
READABLE_VERSIONS = (2, 3, 4)  # a label job writes 4 or 2 (--store-format); 3 is read and converted


@dataclass(frozen=True)
class StoreSchema:
    """The arrays of every seed of a store, and how they are chunked."""

    num_samples: int
    num_classes: int
    top_k: int
    sampled: int = 0
    feature_shape: tuple[int, int, int] | None = None  # (C, h, w)
    per_teacher: int = 0  # teachers whose own top-k is kept beside the ensemble's (0: none)
    chunk_rows: int = 8192
    view_params: int = NUM_VIEW_PARAMS  # P: the recipe's view columns (more than 17 with photometric ops)
    store_views: bool = False  # format 3: keep the view parameters themselves (format 2 always does)
    format_version: int = FORMAT_VERSION  # the manifest's, not the schema dict's

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_classes:
            raise UsageError(f"top-k {self.top_k} must be between 1 and the class count {self.num_classes}")
        if self.sampled < 0 or self.chunk_rows < 1 or self.num_samples < 1:
            raise UsageError("sampled must be >= 0, chunk_rows and num_samples >= 1")
        if self.format_version not in READABLE_VERSIONS:
            raise UsageError(f"store format {self.format_version}: this stillroom reads {READABLE_VERSIONS}")

    @property
    def views_stored(self) -> bool:
        """Whether a seed holds the view parameters (else a digest a chunk; a reader redraws them)."""
        return self.format_version < 3 or self.store_views

    @property
    def index_dtype(self) -> str:
        return "int16" if self.num_classes <= np.iinfo(np.int16).max else "int32"

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """What a seed reads as (and what a writer hands ``write_piece``, with ``view`` always): name -> (shape,
        dtype). Format 3 decodes its stored arrays (``stored``) to these: ``topk_logit`` in float32, ``hard``;
        ``view`` only where the parameters are stored."""
        out = self.format2_arrays()
        if self.format_version >= 3:
            for name in [n for n in out if n.endswith("topk_logit")]:
                out[name] = (out[name][0], "float32")
            if not self.store_views:
                del out["view"]
        return out

    def stored(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """The arrays on disk of each seed: name -> (shape, dtype)."""
        if self.format_version < 3:
            return self.format2_arrays()
        n, out = self.num_samples, self.format2_arrays()
        if not self.store_views:
            del out["view"]
        del out["hard"]
        for prefix in ["", *(f"teacher{t}_" for t in range(self.per_teacher))]:
            for name in ("topk_logit", "lse", "tail_lse"):
                del out[prefix + name]
            out.update({name: ((n, *row), dtype) for name, (row, dtype) in topk_columns(self.top_k, prefix,
                                                                                     self.format_version).items()})
        return out

    def format2_arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        n, idx = self.num_samples, self.index_dtype
        out = {
            "view": ((n, self.view_params), "float32"),
            "topk_idx": ((n, self.top_k), idx),
            "topk_logit": ((n, self.top_k), "float16"),
            "lse": ((n,), "float32"),
            "tail_lse": ((n,), "float32"),
            "hard": ((n,), idx),
        }
        if self.sampled:
            out["sampled"] = ((n, self.sampled), idx)
        if self.feature_shape:
            out["features"] = ((n, *self.feature_shape), "float16")
        for t in range(self.per_teacher):
            out[f"teacher{t}_topk_idx"] = ((n, self.top_k), idx)
            out[f"teacher{t}_topk_logit"] = ((n, self.top_k), "float16")
            out[f"teacher{t}_lse"] = ((n,), "float32")
            out[f"teacher{t}_tail_lse"] = ((n,), "float32")
        return out

    def pieces(self, rows_per_piece: int | None = None) -> list[tuple[int, int]]:
        """``[start, stop)`` row ranges made of whole chunks: the unit one writer owns."""
        step = rows_per_piece or self.chunk_rows
        if step % self.chunk_rows:
            raise UsageError(f"a piece of {step} rows is not a whole number of {self.chunk_rows}-row chunks")
        return [(s, min(s + step, self.num_samples)) for s in range(0, self.num_samples, step)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["feature_shape"] = list(self.feature_shape) if self.feature_shape else None
        if self.view_params == NUM_VIEW_PARAMS:  # older stores' schemas (and cache keys) have no such field
            del d["view_params"]
        del d["format_version"]  # the manifest's own field
        if self.format_version < 3:  # format 2's schemas (and cache keys) have no such field
            del d["store_views"]
        else:  # the generator that redraws the views is part of what a format-3 store's digests mean
            d["view_generator"] = VIEW_GENERATOR
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], format_version: int = FORMAT_VERSION) -> StoreSchema:
        d = dict(d)
        d.pop("view_generator", None)  # checked by the reader against this stillroom's (``view_digest``)
        d["feature_shape"] = tuple(d["feature_shape"]) if d.get("feature_shape") else None
        return cls(**d, format_version=format_version)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def cache_key(provenance: dict[str, Any], schema: StoreSchema) -> str:
    """Hash of everything that changes the labels.

    ``provenance`` holds the dataset fingerprint and split, the recipe (with its version and digest), the
    teachers' names and weight digests, their preprocessing, top-k, sampled count and feature spec. The
    schema adds the dtypes (through the class count) and the format version. Seeds are not in the key:
    they are added to a store over time. Chunking is not either: it does not change a label.
    """
    labels = {k: v for k, v in schema.to_dict().items() if k != "chunk_rows"}
    blob = _canonical({"provenance": provenance, "schema": labels, "format_version": schema.format_version,
                       "dtypes": {k: v[1] for k, v in schema.arrays().items()}})
    return hashlib.sha256(blob).hexdigest()[:24]
