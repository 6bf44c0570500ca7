"""The label store: what the teacher said about every view, written once, read by every student run.

Layout (one directory per cache key under a store root)::

    <root>/<cache_key>/
      manifest.json              provenance, schema, seeds done, format version
      seeds/<seed>/              a zarr v3 group per augmentation seed
        view       (N, P) f32    view parameters (pipelines.views.view_columns of the recipe: 17, or more with
                                 photometric ops; the schema's view_params)
        topk_idx   (N, k) i16    class indices, best first (i32 past 32,767 classes)
        topk_logit (N, k) f16    teacher (ensemble) logits of those classes
        lse        (N,)   f32    log-sum-exp over all classes: exp(logit - lse) is the exact probability
        tail_lse   (N,)   f32    log-sum-exp over the classes outside the top-k (-inf when k = C)
        hard       (N,)   i16    teacher argmax
        sampled    (N, m) i16    optional: classes drawn from the teacher's distribution
        features   (N, C, h, w) f16  optional: a pooled teacher feature map (sharded: 16-row inner chunks)
        teacher<i>_topk_idx, _topk_logit, _lse, _tail_lse   optional: each ensemble member's own
        pieces/<i>.done          a piece (a run of whole chunks) that a writer finished
        COMPLETE                 written last, atomically, with a sha256 per chunk of every array
      leases/<seed>/<g>.json     the seed's writer (``SeedLease``): host, pid, start, last renewal

A seed without ``COMPLETE`` does not exist for a reader. Writers write whole chunks only (zarr's local
store writes each chunk file atomically), and one writer owns each piece, so a killed writer leaves
either finished pieces, which a restarted run keeps, or nothing a reader takes. One run writes a seed at a
time: it holds the seed's lease (``SeedLease``) from ``begin_seed`` to ``commit_seed``; another run waits for the
seed and reuses it, or takes the lease over when its holder died or went silent.

The root may be a URL (``s3://bucket/prefix``, any installed fsspec protocol: ``pipelines.storage``): zarr
writes each chunk as one object through its ``FsspecStore``, and every marker is one whole object, so the
same guarantees hold on object storage.

Checksums are taken as the chunks are written (``checksums.py``); ``verify`` recomputes them chunk by chunk and
names the chunk that differs.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, TransposeCodec

from stillroom.pipelines.core import Location, StoreError, UsageError, is_url, write_atomically
from stillroom.pipelines.store.checksums import _sha256, chunk_checksums, combine_checksums
from stillroom.pipelines.store.codec import decode_rows, encode_rows, stored_names
from stillroom.pipelines.store.lease import LEASE_TIMEOUT_S, SeedLease, fence_open
from stillroom.pipelines.store.quality import QualitySums, add_quality, quality_report
from stillroom.pipelines.store.schema import READABLE_VERSIONS, StoreSchema, cache_key
from stillroom.pipelines.store.view_digest import view_digests
from stillroom.pipelines.views import VIEW_GENERATOR

FEATURE_READ_ROWS = 16  # rows of a feature map decoded together (an inner chunk of its shards): see _layout
MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _compressor(dtype: str, level: int = 5) -> BloscCodec:
    # byte shuffle groups the high bytes (mostly equal) of neighbouring values; zstd does the rest (bench/store.py:
    # bitshuffle and delta-coding gave no fewer bytes on any array; zstd level 9 takes 0.4 byte a view off topk_idx)
    return BloscCodec(cname="zstd", clevel=level, shuffle="shuffle", typesize=np.dtype(dtype).itemsize)


def _layout(name: str, shape: tuple[int, ...], chunk_rows: int
            ) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """``(chunks, shards)``: how an array is cut. ``chunk_rows`` rows a file, written whole. ``features``
    (kilobytes a sample, read by the batch's rows in a shuffled epoch) is sharded: each file holds ``chunk_rows``
    rows as inner chunks of ``FEATURE_READ_ROWS`` rows, so reading one sample decodes its inner chunk alone, not
    its whole chunk."""
    rows = (chunk_rows, *shape[1:])
    if name != "features":
        return rows, None
    return (math.gcd(chunk_rows, FEATURE_READ_ROWS), *shape[1:]), rows


def read_rows(array: zarr.Array, layout: DirectLayout | None, start: int, stop: int, take: np.ndarray | None = None
              ) -> np.ndarray:
    """Rows ``[start, stop)`` of a stored array, or of them only the rows ``take`` (offsets from ``start``).

    On a local disk an array laid out as ``LabelStore`` writes it (whole chunks of rows, maybe transposed, then
    little-endian bytes and Blosc, no sharding) is read chunk file by chunk file and decoded by numcodecs' Blosc
    into one buffer, of which only the rows wanted are copied: zarr's read of the same chunks costs several times
    the CPU here (its asyncio pipeline a chunk, and every row of the range), which an epoch of ``--view-order
    random`` pays on every chunk of every seed for 1/S of its rows (``bench/view_order.py``). A chunk zarr did not
    write (fill values only) reads as the fill value. Anything else (object storage, another layout): zarr.
    ``layout``: ``direct_layout(array)``, which a caller reading an array often keeps."""
    if layout is None:
        rows_read = np.asarray(array[start:stop])
        return rows_read if take is None else rows_read[take]
    from numcodecs.blosc import decompress

    rows, chunk, dtype = layout.chunk[0], layout.chunk, layout.dtype
    wanted = np.arange(start, stop) if take is None else start + np.asarray(take, dtype=np.int64)
    order = None
    if take is not None and len(wanted) > 1 and (np.diff(wanted) < 0).any():
        order = np.argsort(wanted, kind="stable")
        wanted = wanted[order]
    out = np.empty((len(wanted), *array.shape[1:]), dtype=dtype)
    buffer = np.empty(int(np.prod(chunk)) * dtype.itemsize, dtype=np.uint8)
    most = buffer.nbytes + 16  # Blosc's largest frame of that many bytes (its MAX_OVERHEAD)
    shape = chunk if layout.order is None else tuple(chunk[i] for i in layout.order)
    back = None if layout.order is None else tuple(int(i) for i in np.argsort(layout.order))
    first = start // rows
    edges = np.searchsorted(wanted, np.arange(first, -(-stop // rows) + 1) * rows).tolist()
    for c in range(first, -(-stop // rows)):
        a, b = edges[c - first], edges[c - first + 1]
        if a == b:
            continue
        try:
            fd = os.open(layout.path(c), os.O_RDONLY)
        except FileNotFoundError:
            out[a:b] = layout.fill
            continue
        try:
            data = os.read(fd, most + 1)
        finally:
            os.close(fd)
        held = int.from_bytes(data[4:8], "little")  # Blosc's header: the bytes it decompresses to
        if len(data) < 16 or len(data) > most or held != buffer.nbytes:
            raise ValueError(f"chunk {c}: {len(data)} bytes holding {held}, not a chunk's {buffer.nbytes}")
        decompress(data, buffer)
        block = buffer.view(dtype).reshape(shape)
        if back is not None:
            block = block.transpose(back)
        out[a:b] = block[wanted[a:b] - c * rows]
    if order is not None:
        out[order] = out.copy()
    return out


@dataclass(frozen=True)
class DirectLayout:
    """How ``read_rows`` reads an array's chunk files itself (``direct_layout``)."""

    folder: str
    dtype: np.dtype
    chunk: tuple[int, ...]
    order: tuple[int, ...] | None  # the chunk's axes as stored (a TransposeCodec), None: as they are
    encoding: Any  # the array's chunk key encoding (the same in every seed: its keys are worked out once)
    fill: Any

    def path(self, c: int) -> str:
        """The file of chunk ``c``."""
        return self.folder + os.sep + _chunk_key(self.encoding, c, len(self.chunk))


@functools.lru_cache(maxsize=1 << 16)
def _chunk_key(encoding: Any, c: int, ndim: int) -> str:
    return str(encoding.encode_chunk_key((c, *([0] * (ndim - 1)))))


def direct_layout(array: zarr.Array) -> DirectLayout | None:
    """How ``read_rows`` reads ``array`` itself, or None (zarr reads it)."""
    from zarr.codecs import BytesCodec
    from zarr.core.chunk_grids import RegularChunkGrid
    from zarr.core.metadata import ArrayV3Metadata
    from zarr.storage import LocalStore

    store, meta = array.store_path.store, array.metadata
    if not isinstance(store, LocalStore) or not isinstance(meta, ArrayV3Metadata):
        return None
    codecs, grid, order = list(meta.codecs), meta.chunk_grid, None
    first = codecs[0] if codecs else None
    if isinstance(first, TransposeCodec):
        order = tuple(int(i) for i in first.order)
        codecs.pop(0)
    little = (BytesCodec(endian="little"), BytesCodec(endian=None))  # None: one-byte values (no order)
    if not (len(codecs) == 2 and codecs[0] in little and isinstance(codecs[1], BloscCodec)
            and isinstance(grid, RegularChunkGrid) and tuple(grid.chunk_shape[1:]) == tuple(array.shape[1:])):
        return None
    return DirectLayout(os.path.join(store.root, array.store_path.path), np.dtype(array.dtype).newbyteorder("<"),
                        tuple(grid.chunk_shape), order, meta.chunk_key_encoding, meta.fill_value)


def _array(group: zarr.Group, name: str) -> zarr.Array:
    array = group[name]
    if not isinstance(array, zarr.Array):
        raise StoreError(f"{name} in {group.store} is not an array")
    return array


@dataclass
class SeedLabels:
    """One seed's arrays, in memory. ``gather(ids)`` is plain numpy fancy indexing."""

    seed: int
    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.arrays["hard"].shape[0])

    def gather(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return {name: np.take(a, ids, axis=0) for name, a in self.arrays.items()}


class LabelStore:
    """A store directory ``<root>/<cache_key>``: open it with ``LabelStore(path)``, make it with ``create``."""

    def __init__(self, path: str | os.PathLike | Location):
        self.loc = path if isinstance(path, Location) else Location(path)
        self.path: Path | str = self.loc.where  # a Path for a local store, its URL otherwise
        manifest = self.loc / MANIFEST
        if not manifest.exists():
            raise StoreError(f"{self.path} is not a label store: {MANIFEST} is missing")
        try:
            self.manifest: dict[str, Any] = manifest.read_json()
        except json.JSONDecodeError as e:
            raise StoreError(f"{manifest} is not valid JSON: {e}") from None
        version = self.manifest.get("format_version")
        if version not in READABLE_VERSIONS:
            old = isinstance(version, int) and version < min(READABLE_VERSIONS)
            raise StoreError(f"{self.path} has store format version {version}: this stillroom reads "
                             f"{', '.join(map(str, READABLE_VERSIONS))}"
                             + ("; it lacks tail_lse, without which soft labels at T > 1 are wrong: relabel it "
                                "(stillroom label ... with the same teachers and seeds writes a new store)"
                                if old else ""))
        self.schema = StoreSchema.from_dict(self.manifest["schema"], version)

    # -- making and writing -------------------------------------------------------------------

    @classmethod
    def create(cls, root: str | os.PathLike, provenance: dict[str, Any], schema: StoreSchema,
               sources: dict[str, Any] | None = None) -> LabelStore:
        """Open the store for ``provenance`` under ``root``, making it if it does not exist yet.

        ``sources`` (e.g. teacher checkpoint paths) is kept in the manifest but not hashed into the key.
        """
        key = cache_key(provenance, schema)
        path = Location(root) / key
        try:
            path.makedirs()
            if not path.writable():
                raise StoreError(f"store root {root} is not writable")
            if not (path / MANIFEST).exists():
                # two runs may make the same store at once: the first manifest stays (both are the same but
                # for created_at)
                (path / MANIFEST).create(json.dumps({
                    "format_version": schema.format_version, "cache_key": key, "provenance": provenance,
                    "schema": schema.to_dict(), "sources": sources or {}, "seeds": [], "created_at": time.time(),
                }, indent=2, sort_keys=True).encode())
        except OSError as e:
            raise StoreError(f"cannot write to store root {root}: {e.strerror or type(e).__name__}") from None
        return cls(path)

    @property
    def cache_key(self) -> str:
        return str(self.manifest["cache_key"])

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.manifest["provenance"])

    def seed_dir(self, seed: int) -> Path | str:
        """The seed's zarr group: a Path for a local store, its URL otherwise."""
        return self._seed(seed).where

    def _seed(self, seed: int) -> Location:
        return self.loc / "seeds" / str(int(seed))

    def lease(self, seed: int, timeout_s: float | None = None) -> SeedLease:
        """The seed's writer lease (not taken yet: ``SeedLease.acquire``)."""
        return SeedLease(self.loc / "leases" / str(int(seed)), LEASE_TIMEOUT_S if timeout_s is None else timeout_s)

    def begin_seed(self, seed: int) -> None:
        """Make the seed's empty arrays (once; a restarted run keeps what is there). The caller holds the
        seed's lease (``lease``), so no other run writes it meanwhile."""
        d = self._seed(seed)
        if (d / COMPLETE).exists():
            raise StoreError(f"seed {seed} of {self.path} is complete already")
        group = zarr.open_group(store=d.url, mode="a", zarr_format=3)
        with warnings.catch_warnings():  # on object storage zarr lists pieces/ too, and says it is not zarr's
            warnings.filterwarnings("ignore", message="Object at pieces is not recognized")
            existing = set(group.array_keys())
        for name, (shape, dtype) in self.schema.stored().items():
            if name in existing:
                continue
            chunks, shards = _layout(name, shape, self.schema.chunk_rows)
            # the view parameters column by column: each column's values (a crop fraction, an op index) together;
            # the top-k's codes too (bench/store.py: 7.1 bytes a row of 9 codes column by column, 8.6 row by row)
            filters = [TransposeCodec(order=(1, 0))] if name in ("view", "topk_q") else None
            group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, shards=shards, filters=filters,
                               compressors=_compressor(dtype, 5 if self.schema.format_version < 3 else 9),
                               fill_value=0)
        (d / "pieces").makedirs()

    def done_pieces(self, seed: int) -> set[int]:
        names = (self._seed(seed) / "pieces").children()
        return {int(n[: -len(".done")]) for n in names if n.endswith(".done") and n[: -len(".done")].isdigit()}

    def write_piece(self, seed: int, piece: int, start: int, arrays: dict[str, np.ndarray],
                    quality: QualitySums | None = None, generation: int | None = None,
                    skipped: dict[int, str] | None = None) -> None:
        """Write rows ``[start, start + n)`` of every array, then mark the piece done (its ``.done`` marker
        keeps the piece's label-quality sums, which ``commit_seed`` adds up). ``generation``: the seed's lease
        generation the writer holds; a superseded one (taken over, released) is refused before each array and
        before the marker (``fence_open``), and a complete seed always.

        The rows must be whole chunks (the last chunk of the split may be short), and one writer owns
        each piece: zarr does not make concurrent partial writes into one chunk safe. ``skipped``: the piece's
        sample ids left out under ``,bad=skip`` (their rows blanked) and why, kept in the marker for ``commit_seed``.
        """
        schema = self.schema
        given = {**schema.arrays(), "view": schema.format2_arrays()["view"]}  # the parameters: stored, or their digest
        if not schema.views_stored and "view" not in arrays:  # no parameters given: no digest, no replayed views
            given.pop("view")
        if set(arrays) != set(given):
            raise StoreError(f"piece arrays {sorted(arrays)} do not match the schema's {sorted(given)}")
        n = len(arrays["hard"])
        chunk = self.schema.chunk_rows
        if start % chunk or (n % chunk and start + n != self.schema.num_samples):
            raise StoreError(f"rows [{start}, {start + n}) are not whole {chunk}-row chunks")
        def fence() -> None:
            if generation is not None and not fence_open(self.loc / "leases" / str(int(seed)), generation):
                raise StoreError(f"seed {seed}: lease generation {generation} was superseded (taken over or "
                                 "released): this writer stops, piece not written")

        if (self._seed(seed) / COMPLETE).exists():
            raise StoreError(f"seed {seed} of {self.path} is complete already: piece {piece} not written")
        for name, data in arrays.items():
            if data.shape != (n, *given[name][0][1:]):
                raise StoreError(f"array {name}: got shape {data.shape}, expected {(n, *given[name][0][1:])}")
        views = view_digests(arrays["view"], chunk) if schema.format_version >= 3 and "view" in arrays else None
        if schema.format_version >= 3:
            arrays = encode_rows(arrays, schema.top_k, set(schema.stored()), schema.format_version)
        expected = schema.stored()
        group = zarr.open_group(store=self._seed(seed).url, mode="r+", zarr_format=3)
        checksums = {}
        for name, data in arrays.items():
            shape, dtype = expected[name]
            if data.shape != (n, *shape[1:]):
                raise StoreError(f"array {name}: got shape {data.shape}, expected {(n, *shape[1:])}")
            data = np.ascontiguousarray(data.astype(dtype, copy=False))
            fence()
            _array(group, name)[start : start + n] = data
            checksums[name] = chunk_checksums(data, chunk)  # of the bytes just written: nothing is read back
        fence()
        (self._seed(seed) / "pieces" / f"{piece}.done").write_json(
            {"start": start, "stop": start + n, "quality": quality or {}, "chunk_sha256": checksums,
             "skipped": {str(int(i)): why for i, why in sorted((skipped or {}).items())},
             **({"views": views} if views is not None else {}),
             **({"generation": generation} if generation is not None else {})})

    def commit_seed(self, seed: int, lease: SeedLease | None = None, quality: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
        """Check every piece is done, gather the chunk checksums its writers recorded (no array is read),
        write ``COMPLETE`` last; return its record. With ``lease``, refuse if it was taken over meanwhile.
        ``quality``: the seed's label-quality report as it is (a converted store's), not the pieces' sums'."""
        if (self._seed(seed) / COMPLETE).exists():
            raise StoreError(f"seed {seed} of {self.path} is complete already")
        if lease is not None:
            lease.check()
        pieces = self.schema.pieces()
        missing = set(range(len(pieces))) - self.done_pieces(seed)
        if missing:
            raise StoreError(f"seed {seed}: pieces {sorted(missing)[:5]} are not written yet")
        arrays = self.schema.stored()
        sums: QualitySums = {}
        chunks: dict[str, list[str]] = {name: [] for name in arrays}
        skipped: dict[str, str] = {}
        views: dict[str, list[str]] = {"chunk_sha256": [], "probe_sha256": []}
        digested = self.schema.format_version >= 3
        for i in range(len(pieces)):
            done = (self._seed(seed) / "pieces" / f"{i}.done").read_json()
            sums = add_quality(sums, done.get("quality") or {})
            skipped.update(done.get("skipped") or {})
            if done.get("views") is None:  # a writer that gave no parameters: the seed's views cannot be checked
                digested = False
            else:
                for key in views:
                    views[key] += done["views"][key]
            for name in arrays:
                if name not in (done.get("chunk_sha256") or {}):
                    raise StoreError(f"seed {seed} piece {i}: no checksum recorded for {name}; label the seed again")
                chunks[name] += done["chunk_sha256"][name]
        record = {
            "seed": int(seed), "written_at": time.time(), "checksum": "sha256 of chunk sha256s",
            "arrays": {name: {"sha256": combine_checksums(chunks[name]), "chunk_sha256": chunks[name],
                              "shape": list(shape), "dtype": dtype} for name, (shape, dtype) in arrays.items()},
            "quality": quality if quality is not None else quality_report(sums),
            # ,bad=skip: the ids whose view failed to decode, their rows blanked (no label); readers leave them out
            "skipped": dict(sorted(skipped.items(), key=lambda kv: int(kv[0]))),
        }
        if digested:  # format 3 (a reader refuses to replay a seed without them: ``view_digest.check_views``)
            record["views"] = {"generator": VIEW_GENERATOR, "columns": self.schema.view_params,
                               "sha256": combine_checksums(views["chunk_sha256"]), **views}
        if lease is not None:
            lease.check()  # again, last: a holder paused while it gathered may have been taken over meanwhile
        (self._seed(seed) / COMPLETE).write_json(record)
        (self._seed(seed) / "pieces").remove(recursive=True)
        self._refresh_manifest_seeds()
        return record

    def _refresh_manifest_seeds(self) -> None:
        """The manifest's seed list and each seed's skipped ids (``,bad=skip``), for people reading it (readers go
        by the ``COMPLETE`` markers). Both are derived from the ``COMPLETE`` markers, not added to what the manifest
        said: two runs committing at once each write what is committed, and each looks again after its write and
        writes again if a seed was committed meanwhile, so the last write names every complete seed."""
        written: list[int] | None = None
        while True:
            seeds = self.seeds()
            if seeds == written:
                return
            manifest = (self.loc / MANIFEST).read_json()
            manifest["seeds"] = seeds
            lost = {str(s): ids for s in seeds if (ids := sorted(self.skipped(s)))}
            if lost:
                manifest["skipped"] = lost
            else:
                manifest.pop("skipped", None)
            manifest["updated_at"] = time.time()
            (self.loc / MANIFEST).write_json(manifest)
            self.manifest = manifest
            written = seeds

    # -- reading --------------------------------------------------------------------------------

    def _begun(self) -> list[int]:
        return sorted(int(n) for n in (self.loc / "seeds").children() if n.isdigit())

    def seeds(self) -> list[int]:
        """The complete seeds: those with a ``COMPLETE`` marker."""
        return [s for s in self._begun() if (self._seed(s) / COMPLETE).exists()]

    def is_complete(self, seed: int) -> bool:
        return (self._seed(seed) / COMPLETE).exists()

    def partial_seeds(self) -> dict[int, tuple[int, int]]:
        """Seeds a writer began but did not commit (a killed or running job): seed -> (pieces done, pieces)."""
        total = len(self.schema.pieces())
        begun = [s for s in self._begun() if not (self._seed(s) / COMPLETE).exists()]
        return {seed: (len(self.done_pieces(seed)), total) for seed in begun}

    def quality(self, seed: int) -> dict[str, dict[str, float]]:
        """The label quality recorded for a complete seed at labeling (``quality_report``); reads no arrays."""
        record = (self._seed(seed) / COMPLETE).read_json()
        return dict(record.get("quality") or {})

    def skipped(self, seed: int) -> dict[int, str]:
        """A complete seed's sample ids left out under ``,bad=skip`` (their image, or a mixing partner's, failed to
        decode; their rows hold no label: ``pipelines.labeling.blank_rows``) and why; reads no arrays."""
        record = (self._seed(seed) / COMPLETE).read_json()
        return {int(i): str(why) for i, why in (record.get("skipped") or {}).items()}

    def _read_arrays(self, seed: int, names: Iterable[str] | None = None, rows: tuple[int, int] | None = None
                     ) -> dict[str, np.ndarray]:
        group = zarr.open_group(store=self._seed(seed).url, mode="r", zarr_format=3)
        wanted = list(self.schema.arrays() if names is None else names)
        unknown = sorted(set(wanted) - set(self.schema.arrays()))
        if unknown:
            raise StoreError(f"store {self.cache_key} has no arrays {unknown}")
        out = {}
        for name in self.stored_names(wanted):
            try:
                array = _array(group, name)
                out[name] = read_rows(array, direct_layout(array), *(rows or (0, array.shape[0])))
            except Exception as e:  # a truncated or edited chunk fails to decode
                raise StoreError(f"seed {seed} array {name}: cannot be read ({type(e).__name__}: {e})") from None
        return self.decode(out, wanted)

    def stored_names(self, names: list[str]) -> list[str]:
        """The arrays on disk that reading ``names`` (of ``schema.arrays()``) takes."""
        if self.schema.format_version < 3:
            return names
        return stored_names(names, self.schema.top_k, self.schema.format_version)

    def decode(self, stored: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        """The arrays ``names`` (of ``schema.arrays()``) from rows of the stored ones (``stored_names``)."""
        if self.schema.format_version < 3:
            return {name: stored[name] for name in names}
        return decode_rows(stored, names, self.schema.top_k, self.schema.format_version)

    def as_read(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A labeler's arrays (format 2's names and dtypes) as a reader of this store gets them back: through its
        format's codes (3, 4), else as they are (the online run that stands for a cached one: ``--online-targets
        encoded``)."""
        if self.schema.format_version < 3:
            return arrays
        stored = encode_rows(arrays, self.schema.top_k, set(self.schema.stored()), self.schema.format_version)
        return {**arrays, **self.decode(stored, [name for name in arrays if name != "view"])}

    def view_record(self, seed: int) -> dict[str, Any]:
        """The ``COMPLETE`` record of a seed (its view digests under ``views`` in format 3)."""
        return dict((self._seed(seed) / COMPLETE).read_json())

    def load(self, seed: int, names: Iterable[str] | None = None, rows: tuple[int, int] | None = None
             ) -> SeedLabels:
        """Load one complete seed into memory: every array, or those in ``names`` (of ``schema.arrays()``); only
        rows ``[start, stop)`` with ``rows``."""
        if seed not in self.seeds():
            raise StoreError(f"seed {seed} is not in {self.path}: complete seeds are {self.seeds() or 'none'}")
        return SeedLabels(int(seed), self._read_arrays(seed, names, rows))

    def verify(self, seeds: Iterable[int] | None = None) -> list[str]:
        """Recompute every checksum; return one line per problem (empty: the store is sound)."""
        problems = []
        for seed in seeds if seeds is not None else self.seeds():
            record = (self._seed(seed) / COMPLETE).read_json()
            group = zarr.open_group(store=self._seed(seed).url, mode="r", zarr_format=3)
            for name, want in record["arrays"].items():
                problem = self._verify_array(_array(group, name), want)
                if problem:
                    problems.append(f"seed {seed} array {name}: {problem}")
        return problems

    def _verify_array(self, array: zarr.Array, want: dict[str, Any]) -> str | None:
        """What is wrong with one array against its ``COMPLETE`` record (None: nothing), read chunk by chunk."""
        rows = self.schema.chunk_rows
        if "chunk_sha256" not in want:  # a seed committed before chunk checksums: one sha256 of the whole array
            try:
                whole = _sha256(np.asarray(array[...]))
            except Exception as e:
                return f"cannot be read ({type(e).__name__})"
            return None if whole == want["sha256"] else "checksum mismatch"
        for c, expected in enumerate(want["chunk_sha256"]):
            try:
                got = _sha256(np.asarray(array[c * rows : (c + 1) * rows]))
            except Exception as e:
                return f"chunk {c} cannot be read ({type(e).__name__})"
            if got != expected:
                return f"chunk {c}: checksum mismatch"
        if combine_checksums(want["chunk_sha256"]) != want["sha256"]:
            return "checksum record does not match its chunks"
        return None

    def check(self, expected: dict[str, Any]) -> None:
        """Refuse a store made for something else. ``expected`` maps dotted provenance/schema fields
        (e.g. ``dataset.fingerprint``, ``recipe.name``, ``schema.num_classes``) to the values the caller needs."""
        have = _flatten({"schema": self.manifest["schema"], **self.manifest["provenance"]})
        for field, want in expected.items():
            got = have.get(field, "<absent>")
            if got != want:
                raise StoreError(f"store {self.cache_key} was made for {field}={got!r}; this run needs {want!r}")

    def size_on_disk(self, seed: int | None = None) -> int:
        return (self._seed(seed) if seed is not None else self.loc).size()

    def describe(self) -> dict[str, Any]:
        """What ``stillroom store inspect`` shows."""
        n = self.schema.num_samples
        seeds = {}
        for seed in self.seeds():
            d = self._seed(seed)
            per_array = {name: (d / name).size() for name in self.schema.stored()}
            total = sum(per_array.values())
            seeds[str(seed)] = {"bytes": total, "bytes_per_sample": round(total / n, 2),
                                "bytes_per_sample_by_array": {k: round(v / n, 2) for k, v in per_array.items()},
                                "quality": self.quality(seed), "views_skipped": len(self.skipped(seed))}
        return {
            "path": str(self.path), "cache_key": self.cache_key, "format_version": self.schema.format_version,
            "provenance": self.manifest["provenance"], "schema": self.manifest["schema"],
            "samples": n, "top_k": self.schema.top_k, "seeds": self.seeds(), "per_seed": seeds,
            "size_on_disk": self.size_on_disk(),
        }

    def export_parquet(self, seed: int, out: str | os.PathLike) -> int:
        """Write one seed as a Parquet table (one row per sample); return the row count."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        labels = self.load(seed)
        cols: dict[str, Any] = {"sample_id": pa.array(np.arange(len(labels), dtype=np.int64))}
        for name, a in labels.arrays.items():
            a = a.astype(np.float32) if a.dtype == np.float16 else a
            if a.ndim == 1:
                cols[name] = pa.array(a)
            else:
                flat = a.reshape(len(a), -1)
                cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
        table = pa.table(cols).replace_schema_metadata({
            "stillroom.cache_key": self.cache_key, "stillroom.seed": str(seed),
            "stillroom.manifest": json.dumps(self.manifest),
        })
        if is_url(os.fspath(out)):  # one PUT: the object appears whole or not at all
            import io

            buf = io.BytesIO()
            pq.write_table(table, buf, compression="zstd")
            Location(out).write_bytes(buf.getvalue())
        else:
            write_atomically(out, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
        return len(labels)


def list_stores(root: str | os.PathLike) -> list[LabelStore]:
    """Every readable store directly under ``root`` (a directory or a URL)."""
    loc = Location(root)
    if loc.local is not None and not loc.local.is_dir():
        raise UsageError(f"store root {root} does not exist")
    out = []
    for name in loc.children():
        if (loc / name / MANIFEST).exists():
            try:
                out.append(LabelStore(loc / name))
            except StoreError:
                continue
    return out
