"""The Parquet reader (``parquet:``): Hugging Face ``datasets`` shards (an ``image`` column of ``{bytes, path}``
and an integer ``label``), on disk or on a URL, indexed per row group and read back a row group's image column
at a time (one ranged GET on a URL; open shards and their footers kept per process).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from stillroom.pipelines.core import DataError, UsageError, filesystem, is_url, local_path
from stillroom.pipelines.data.file_dataset import FileDataset, MissingSplit, check_split
from stillroom.pipelines.data.holdout import _mix64, holdout_part, string_hashes
from stillroom.pipelines.data.index_cache import (
    CachedIndex,
    cache_file,
    dump_errors,
    load_cache,
    load_errors,
    load_url_cache,
    save_cache,
    save_url_cache,
    url_cache_places,
)
from stillroom.pipelines.data.listing import _ListedTree, _open_root, _size_mtime, _unlisted_skipped, _version_tag
from stillroom.pipelines.data.probe import HASH_BYTES, PARALLEL_FROM, _parallel, _probe_many
from stillroom.pipelines.data.stage import ShardStage, image_bytes
from stillroom.pipelines.data.strings import pack_strings, unpack_string

ROW_GROUP_CACHE = 4  # row groups of encoded bytes a Parquet reader keeps (per process)


def _probe_row_group(path: str, row_group: int, column: str) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    data = read_row_group_bytes(path, row_group, column)
    return _probe_many([(b if b is not None else b"", f"{path} row group {row_group} row {i}")
                        for i, b in enumerate(data)])


OPEN_SHARDS = 64  # Parquet shards on URLs a process keeps open (their footers parsed): no footer GET per read
_OPEN: OrderedDict[str, Any] = OrderedDict()
_OPEN_PID = [0]
_OPEN_LOCK = threading.Lock()


def open_parquet(where: str) -> Any:
    """A ``pyarrow.parquet.ParquetFile`` of a shard: a local path, or a URL read with ranged GETs.

    On a URL the shard is an fsspec file with ``cache_type="none"``: pyarrow's reads (the footer once, then one
    column chunk of one row group at a time, each in one ``ReadAt``) are each one ranged GET of exactly those
    bytes, and nothing is read ahead (fsspec's default read-ahead block is 5-50 MB). fsspec rather than pyarrow's
    own ``S3FileSystem``: the same URL, client and credential chain as the label store (``pipelines.storage``),
    ``gs://`` and every other installed protocol alike. Opened files are kept per process (the last
    ``OPEN_SHARDS``) and never cross a process: a forked child opens its own."""
    import pyarrow.parquet as pq

    if not is_url(where):
        return pq.ParquetFile(local_path(where))
    with _OPEN_LOCK:
        if _OPEN_PID[0] != os.getpid():  # inherited by fork: the parent's clients are not ours to use
            _OPEN.clear()
            _OPEN_PID[0] = os.getpid()
        pf = _OPEN.get(where)
        if pf is not None:
            _OPEN.move_to_end(where)
            return pf
    fs, path = filesystem(where)
    pf = pq.ParquetFile(fs.open(path, "rb", cache_type="none"))
    with _OPEN_LOCK:
        _OPEN[where] = pf
        while len(_OPEN) > OPEN_SHARDS:
            _OPEN.popitem(last=False)[1].close()
    return pf


def read_row_group_bytes(path: str, row_group: int, column: str) -> list[bytes | None]:
    """The encoded image bytes of one row group (``column`` is a ``{bytes, path}`` struct or binary)."""
    return image_bytes(open_parquet(path).read_row_group(row_group, columns=[column]).column(0)).to_pylist()


class ParquetShards(FileDataset):
    """Hugging Face ``datasets`` Parquet shards: ``<dir>/<split>/*.parquet`` (``test`` falls back to ``val``),
    ``<dir>/*.parquet`` or a glob (one train split), on disk or under a URL (``s3://bucket/prefix``: listed once,
    each shard read by row group with ranged GETs, ``open_parquet``). Columns: ``image`` (``{bytes, path}`` or
    binary) and an integer ``label``; class names from the schema's ``huggingface`` metadata where present, else
    the class count is one more than the largest train label. Rows are read by row group, on demand.
    """

    kind = "parquet"

    def __init__(self, where: str, split: str = "train", bad: str = "stop", workers: int | None = None,
                 spec: str | None = None, holdout: float | None = None, index_cache: str | os.PathLike | None = None):
        check_split(split)
        self.spec, self.split, self.bad = spec or f"parquet:{where}", split, bad
        self.index_cache = index_cache
        src = _parquet_source(where, split, holdout)
        files_split, side = src.files_split, src.side
        self.files, self.root, rel, stat = src.files, src.root, src.rel, src.stat
        places: list[str] = []
        if isinstance(src.root, Path):
            self.cache_path = cache_file(src.root, src.name)
            cached = load_cache(self.cache_path)
        else:
            places = url_cache_places(src.root, src.name, index_cache)
            cached = load_url_cache(_unlisted_skipped(places, src.tree, src.name))
        parts = _parquet_parts(cached, rel, stat)  # per shard: None (to probe) or its cached arrays
        schema = _cached_schema(cached) if all(p is not None for p in parts) else None
        names, label_col, image_col = schema or _parquet_schema(self.files)
        self.image_column = image_col
        tasks = []
        for s, part in enumerate(parts):
            if part is None:
                tasks += [(self.files[s], g, image_col) for g in range(open_parquet(self.files[s]).num_row_groups)]
        if tasks:
            total_rows = sum(open_parquet(f).metadata.num_rows for f in self.files)
            results = iter(_parallel(_probe_row_group, tasks, workers if total_rows >= PARALLEL_FROM else 1))
        shards = []
        for s, part in enumerate(parts):
            if part is None:
                part = _probe_shard(self.files[s], s, results, label_col)
            shards.append(part)
        if tasks:
            blob, offsets = pack_strings(rel)
            arrays = {
                "paths": blob, "offsets": offsets, "stat": stat,
                "rows": np.array([len(p["label"]) for p in shards], dtype=np.int64),
                **{k: np.concatenate([p[k] for p in shards]) for k in ("label", "hw", "hash", "loc")},
                "errors": dump_errors(_shard_errors(shards)),
                "schema": np.array(json.dumps({"names": names, "label": label_col, "image": image_col})),
            }
            if places:
                self.cache_path = save_url_cache(places, arrays)
            else:
                save_cache(cast(Path, self.cache_path), arrays)
        elif places and cached is not None:
            self.cache_path = cached.where
        self.index_reused = not tasks
        labels = np.concatenate([p["label"] for p in shards]).astype(np.int64)
        errors = _shard_errors(shards)
        loc = np.concatenate([p["loc"] for p in shards])
        hw = np.concatenate([p["hw"] for p in shards])
        hashes = np.concatenate([p["hash"] for p in shards])
        if names is None and len(labels):
            names = self._class_names_from_train(where, files_split, labels, bad, workers)
        self.class_names = tuple(names or ())
        self.num_classes = len(self.class_names)
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise UsageError(f"{self.spec} {split}: label {int(labels.max())} out of range for "
                             f"{self.num_classes} classes")
        keep = self._keep(errors, len(labels), bad)
        if holdout is not None and side != "test":  # keyed on (the shard's path, the row's index in it)
            shard_keys = string_hashes(*pack_strings(rel))
            starts = np.concatenate([[0], np.cumsum([len(p["label"]) for p in shards])])
            row_in_shard = (np.arange(len(labels)) - starts[loc[:, 0]]).astype(np.uint64)
            with np.errstate(over="ignore"):
                keys = _mix64(shard_keys[loc[:, 0]] ^ _mix64(row_in_shard + np.uint64(1)))
            keep = keep[self._hold_out(keys[keep], labels[keep], holdout, side)]
        self.labels, self.sizes, self._loc = labels[keep], np.ascontiguousarray(hw[keep]), loc[keep]
        if not len(self.labels):
            raise UsageError(f"{self.spec} {split} has no readable rows")
        self._set_fingerprint(hashes[keep])
        self._groups: OrderedDict[tuple[int, int], list[bytes | None]] = OrderedDict()
        self._stage = ShardStage(self.files, [tuple(s) for s in stat.tolist()], image_col)

    def _class_names_from_train(self, where: str, split: str, labels: np.ndarray, bad: str,
                                workers: int | None) -> list[str]:
        top = int(labels.max())
        if split != "train":
            top = max(top, int(ParquetShards(where, "train", bad, workers, index_cache=self.index_cache).labels.max()))
        return [str(c) for c in range(top + 1)]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_groups": OrderedDict()}

    def encoded(self, ids: np.ndarray) -> list[tuple[bytes, str]]:
        """The rows of a shard staged on the node's disk (``stage.py``: shards read at random) are
        read from its copy, each its own bytes; the others by row group, each group the batch touches once (its
        image column only), the last few kept."""
        loc = self._loc[self._check_ids(ids)]
        out: list[tuple[bytes, str]] = [(b"", "")] * len(loc)
        by_group: dict[tuple[int, int], list[int]] = {}
        for pos, (shard, group, _) in enumerate(loc.tolist()):
            by_group.setdefault((shard, group), []).append(pos)
        for (shard, group), positions in by_group.items():
            rows = [int(loc[pos, 2]) for pos in positions]
            data = self._stage.read(shard, group, rows)
            if data is None:  # not staged (yet): by row group
                group_bytes = self._row_group(shard, group)
                data = [group_bytes[r] for r in rows]
            for pos, row, b in zip(positions, rows, data, strict=True):
                out[pos] = (b or b"", f"{self.files[shard]} row group {group} row {row}")
        return out

    def _row_group(self, shard: int, group: int) -> list[bytes | None]:
        key = (shard, group)
        if key not in self._groups:
            self._groups[key] = read_row_group_bytes(self.files[shard], group, self.image_column)
            self._stage.read_in_place(shard, group)  # a group read again (a shuffle) starts staging
            while len(self._groups) > ROW_GROUP_CACHE:
                self._groups.popitem(last=False)
        self._groups.move_to_end(key)
        return self._groups[key]


@dataclass
class _ParquetSource:
    """The shards of one split: paths or URLs, their ``(size, mtime or version tag)``, paths relative to the
    root the cache belongs to, the cache's name, and the split whose files they are with its side of ``,val=F``."""

    files: list[str]
    stat: np.ndarray
    rel: list[str]
    root: Path | str  # a Path on disk, the URL otherwise
    name: str
    files_split: str
    side: str
    tree: _ListedTree | None = None  # the listing of a URL folder (None for a glob or a local folder)


def _parquet_source(where: str, split: str, holdout: float | None) -> _ParquetSource:
    is_glob = any(ch in where for ch in "*?[")
    root: Path | str
    if is_glob:  # a glob: one train split, which ,val=F may split
        files_split, side = ("train", holdout_part(split, False)) if holdout is not None else (split, "test")
        if files_split != "train":
            raise MissingSplit(f"parquet:{where} is a glob of one train split: it has no {files_split} split")
        name = "parquet-" + hashlib.sha256(where.encode()).hexdigest()[:12]
        if not is_url(where):
            paths = sorted(glob.glob(os.fspath(local_path(where))))
            if not paths:
                raise UsageError(f"no Parquet files match {where}")
            top = Path(os.path.commonpath([os.path.dirname(p) for p in paths]))
            return _ParquetSource(paths, _local_stat(paths), [os.path.relpath(p, top) for p in paths], top, name,
                                  files_split, side)
        fs, pattern = filesystem(where)
        found = fs.glob(pattern, detail=True)
        keys = sorted(k for k, v in found.items() if v.get("type", "file") != "directory")
        if not keys:
            raise UsageError(f"no Parquet files match {where}")
        base = os.path.commonpath([k.rpartition("/")[0] for k in keys])
        url_root = str(fs.unstrip_protocol(base))
        return _ParquetSource([str(fs.unstrip_protocol(k)) for k in keys],
                              np.array([(int(found[k].get("size") or 0), _version_tag(found[k])) for k in keys],
                                       dtype=np.int64).reshape(-1, 2),
                              [k[len(base) + 1:] for k in keys], url_root, name, files_split, side)
    tree, files_split, side, split_dir = _open_root(where, split, holdout, "Parquet folder")
    folder = split_dir or ""
    name = f"parquet-{split_dir or 'train'}"
    if isinstance(tree, _ListedTree):
        names = [n for n in tree.files(folder) if n.endswith(".parquet")]
        rel = [f"{folder}/{n}" if folder else n for n in names]
        stat = np.array([tree.listing[r] for r in rel], dtype=np.int64).reshape(-1, 2)
        files, root = [tree.show(r) for r in rel], tree.show("")
    else:
        paths = sorted(str(p) for p in (tree.root / folder).glob("*.parquet"))
        files, root, stat = paths, tree.root, _local_stat(paths)
        rel = [os.path.relpath(p, root) for p in paths]
    if not files:
        raise UsageError(f"no *.parquet files in {tree.show(folder)}")
    return _ParquetSource(files, stat, rel, root, name, files_split, side,
                          tree if isinstance(tree, _ListedTree) else None)


def _local_stat(paths: list[str]) -> np.ndarray:
    return np.array([_size_mtime(p) for p in paths], dtype=np.int64).reshape(-1, 2)


def _cached_schema(cached: CachedIndex | None) -> tuple[list[str] | None, str, str] | None:
    """What ``_parquet_schema`` found when the cache was written (caches from before it kept none: None)."""
    if cached is None:
        return None
    try:
        got = json.loads(str(cached["schema"]))
    except (KeyError, ValueError):
        return None
    return got["names"], got["label"], got["image"]


def _parquet_schema(files: list[str]) -> tuple[list[str] | None, str, str]:
    """Class names (from the ``huggingface`` schema metadata, when present), the label and image columns."""
    import pyarrow as pa

    names: list[str] | None = None
    for f in files:
        try:
            schema = open_parquet(f).schema_arrow
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"{f}: not a Parquet file ({str(e).splitlines()[0][:120]})") from None
        if "image" not in schema.names:
            raise UsageError(f"{f} has no 'image' column (columns: {', '.join(schema.names)}): expected an image "
                             "column of {bytes, path} and an integer label column")
        img = schema.field("image").type
        if not (pa.types.is_binary(img) or pa.types.is_large_binary(img)
                or (pa.types.is_struct(img) and img.get_field_index("bytes") >= 0)):
            raise UsageError(f"{f}: column 'image' is {img}: expected a struct {{bytes, path}} or binary")
        if "label" not in schema.names or not pa.types.is_integer(schema.field("label").type):
            raise UsageError(f"{f} has no integer 'label' column (columns: {', '.join(schema.names)})")
        meta = (schema.metadata or {}).get(b"huggingface")
        if meta and names is None:
            try:
                feature = json.loads(meta)["info"]["features"]["label"]
                names = [str(n) for n in feature["names"]] if feature.get("names") else None
            except (KeyError, TypeError, ValueError):
                names = None
    return names, "label", "image"


def _parquet_parts(cached: CachedIndex | None, rel: list[str], stat: np.ndarray
                   ) -> list[dict[str, Any] | None]:
    """Per shard, its rows from the cache when its path, size and mtime match, else None."""
    parts: list[dict[str, Any] | None] = [None] * len(rel)
    if cached is None:
        return parts
    old = {unpack_string(cached["paths"], cached["offsets"], j): j for j in range(len(cached["offsets"]) - 1)}
    starts = np.concatenate([[0], np.cumsum(cached["rows"])])
    errors = load_errors(cached["errors"])
    for s, r in enumerate(rel):
        j = old.get(r)
        if j is None or not np.array_equal(cached["stat"][j], stat[s]):
            continue
        a, b = int(starts[j]), int(starts[j + 1])
        loc = cached["loc"][a:b].copy()
        loc[:, 0] = s
        parts[s] = {"label": cached["label"][a:b], "hw": cached["hw"][a:b], "hash": cached["hash"][a:b],
                    "loc": loc, "errors": {k - a: v for k, v in errors.items() if a <= k < b}}
    return parts


def _probe_shard(path: str, shard: int, results: Any, label_col: str) -> dict[str, Any]:
    pf = open_parquet(path)
    labels = pf.read(columns=[label_col]).column(0).to_numpy(zero_copy_only=False)
    if len(labels) and labels.min() < 0:
        raise UsageError(f"{path}: negative label {int(labels.min())}")
    hws = [np.zeros((0, 2), dtype=np.int32)]
    hashes = [np.zeros((0, HASH_BYTES), dtype=np.uint8)]
    locs = [np.zeros((0, 3), dtype=np.int32)]
    errors: dict[int, str] = {}
    done = 0  # rows of this shard before this row group
    for g in range(pf.num_row_groups):
        hw, h, err = next(results)
        n = len(hw)
        hws.append(hw)
        hashes.append(h)
        errors.update({done + j: e for j, e in err.items()})
        done += n
        locs.append(np.stack([np.full(n, shard), np.full(n, g), np.arange(n)], axis=1).astype(np.int32))
    return {"label": labels.astype(np.int64), "hw": np.concatenate(hws), "hash": np.concatenate(hashes),
            "loc": np.concatenate(locs), "errors": errors}


def _shard_errors(shards: list[dict[str, Any]]) -> dict[int, str]:
    """The shards' errors by row of the whole split."""
    out: dict[int, str] = {}
    start = 0
    for p in shards:
        out.update({start + k: v for k, v in p["errors"].items()})
        start += len(p["label"])
    return out
