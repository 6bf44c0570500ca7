"""Where a store (or a checkpoint) lives: a local path, or a URL of any installed fsspec protocol (``s3://``,
``gs://``, ``file://``, ...). ``Location`` is the handful of operations the label store needs, on either.

Why fsspec with s3fs (the ``[s3]`` extra) rather than obstore: zarr's ``FsspecStore`` takes the same URL, so
the arrays and the store's own files (manifest, markers, leases) go through one client and one set of
credentials; s3fs reads them from botocore's standard chain (environment, ``~/.aws`` config and credential
files, instance and pod roles, ``AWS_ENDPOINT_URL`` for an S3-compatible server), and it does the exclusive
create a lease needs (``PutObject`` with ``If-None-Match: *``). obstore is faster per request, but its own
credential chain does not read ``~/.aws`` profiles without boto3 beside it, and a label store's writes are a
few hundred whole-chunk objects a seed, far from a request-rate limit.

Credentials never travel in a URL: one with a user or password part (``s3://KEY:SECRET@bucket``) is refused,
and what this module prints of a URL is the URL itself, which then holds none.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from stillroom.pipelines.core.atomic import write_atomically
from stillroom.pipelines.core.errors import UsageError


def is_url(where: str | os.PathLike) -> bool:
    """``where`` names a location through an fsspec protocol other than the local disk."""
    text = os.fspath(where)
    return "://" in text and not text.startswith("file://")


def version_field(info: dict[str, Any]) -> Any:
    """What changes in an object's listing or ``info`` entry when it is rewritten: its ETag (S3), etag, MD5 or
    generation (GCS), else its modification time; None when the entry has none (then only its size tells)."""
    for key in ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified", "last_modified", "updated"):
        if info.get(key) is not None:
            return info[key]
    return None


def local_path(where: str | os.PathLike) -> Path:
    """A plain path or a ``file://`` URL as a local path."""
    text = os.fspath(where)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def check_url(url: str) -> str:
    """Refuse a URL that carries credentials; return it unchanged otherwise."""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise UsageError(f"{parts.scheme}://...: a URL must not hold credentials; give them through the standard "
                         "chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, an instance role)")
    return url


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem and its path for ``url``; a clear error when its protocol's package is missing.

    Listings are not cached: other processes and nodes write into the same prefixes."""
    import fsspec

    check_url(url)
    try:
        return fsspec.core.url_to_fs(url, use_listings_cache=False)
    except (ImportError, ValueError) as e:
        protocol = url.partition("://")[0]
        hint = " (pip install 'stillroom[s3]')" if protocol in ("s3", "s3a") else ""
        raise UsageError(f"cannot open {protocol}:// locations: {str(e).splitlines()[0][:200]}{hint}") from None


class Location:
    """A directory or file, local or under a URL. Local locations keep POSIX guarantees (``os.replace``,
    ``O_EXCL``); on object storage every write is one whole object (a PUT is seen whole or not at all)."""

    def __init__(self, where: str | os.PathLike, _fs: Any = None, _path: str | None = None):
        text = os.fspath(where)
        self.fs: Any = None
        self.local: Path | None = None
        if _fs is not None:
            self.fs, self._path = _fs, str(_path)
        elif is_url(text):
            self.fs, self._path = filesystem(text)
        else:
            self.local = local_path(text)
            self._path = str(self.local)

    def __truediv__(self, name: str | int) -> Location:
        if self.local is not None:
            return Location(self.local / str(name))
        return Location("", _fs=self.fs, _path=f"{self._path.rstrip('/')}/{name}")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    @property
    def url(self) -> str:
        """What zarr and users are given: the local path, or the full URL."""
        if self.local is not None:
            return str(self.local)
        return str(self.fs.unstrip_protocol(self._path))

    @property
    def name(self) -> str:
        return self._path.rstrip("/").rpartition("/")[2]

    def with_name(self, name: str) -> Location:
        """The location beside this one called ``name`` (``.../teacher.pt`` -> ``.../teacher.json``)."""
        if self.local is not None:
            return Location(self.local.with_name(name))
        return Location("", _fs=self.fs, _path=f"{self._path.rstrip('/').rpartition('/')[0]}/{name}")

    @property
    def where(self) -> Path | str:
        """A ``Path`` for a local location (what callers of the store have always had), the URL otherwise."""
        return self.local if self.local is not None else self.url

    # -- reading ------------------------------------------------------------------------------

    def exists(self) -> bool:
        if self.local is not None:
            return self.local.exists()
        return bool(self.fs.exists(self._path))

    def is_file(self) -> bool:
        if self.local is not None:
            return self.local.is_file()
        return bool(self.fs.isfile(self._path))

    def read_bytes(self) -> bytes:
        if self.local is not None:
            return self.local.read_bytes()
        return bytes(self.fs.cat_file(self._path))

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_json(self) -> Any:
        return json.loads(self.read_text())

    def children(self) -> list[str]:
        """The names directly under this directory (none if it does not exist)."""
        if self.local is not None:
            return sorted(p.name for p in self.local.iterdir()) if self.local.is_dir() else []
        try:
            entries = self.fs.ls(self._path, detail=False)
        except FileNotFoundError:
            return []
        return sorted({str(e).rstrip("/").rpartition("/")[2] for e in entries} - {""})

    def files(self) -> list[str]:
        """The paths of every file under this directory, relative to it (``tensorboard/events...``), sorted."""
        if self.local is not None:
            if not self.local.is_dir():
                return []
            return sorted(p.relative_to(self.local).as_posix() for p in self.local.rglob("*") if p.is_file())
        root = self._path.rstrip("/") + "/"
        try:
            found = self.fs.find(root)
        except FileNotFoundError:
            return []
        return sorted(str(f)[len(root):] for f in found if str(f).startswith(root))

    def size(self) -> int:
        """Bytes of every file under this directory (or of this file)."""
        if self.local is not None:
            if self.local.is_file():
                return self.local.stat().st_size
            return sum(p.stat().st_size for p in self.local.rglob("*") if p.is_file())
        try:
            return int(self.fs.du(self._path, total=True))
        except FileNotFoundError:
            return 0

    def modified(self) -> float:
        """Seconds since the epoch of the last write (the storage's clock)."""
        if self.local is not None:
            return self.local.stat().st_mtime
        return float(self.fs.modified(self._path).timestamp())

    def version(self) -> tuple[int, str]:
        """A file's size and what changes when it is rewritten: its ETag on object storage (its generation or
        modification time where the store has none), its modification time in nanoseconds on a disk. Asks the
        store afresh (no listing cache)."""
        if self.local is not None:
            st = self.local.stat()
            return st.st_size, str(st.st_mtime_ns)
        self.fs.invalidate_cache(self._path)
        info = self.fs.info(self._path)
        version = version_field(info)
        return int(info.get("size") or 0), "" if version is None else str(version)

    # -- writing ------------------------------------------------------------------------------

    def makedirs(self) -> None:
        """Make the directory (object storage has none to make: its prefixes exist once an object does)."""
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)

    def writable(self) -> bool:
        if self.local is not None:
            return os.access(self.local, os.W_OK)
        return True  # object storage answers a write it refuses with an error at that write

    def write_bytes(self, data: bytes) -> None:
        """Replace the file's content whole: an atomic rename locally, one PUT on object storage."""
        if self.local is not None:
            write_atomically(self.local, lambda tmp: tmp.write_bytes(data))
        else:
            self.fs.pipe_file(self._path, data)

    def write_json(self, obj: Any, indent: int | None = 2, sort_keys: bool = True) -> None:
        self.write_bytes(json.dumps(obj, indent=indent, sort_keys=sort_keys).encode())

    def upload(self, source: Path) -> None:
        """Copy the local file ``source`` here whole: an atomic replace locally; on object storage one PUT (a
        multipart upload for a large file, which the store shows only once it is complete)."""
        if self.local is not None:
            import shutil

            self.local.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.local, lambda tmp: shutil.copyfile(source, tmp))
        else:
            self.fs.put_file(str(source), self._path)

    def download(self, target: Path) -> None:
        """Copy this file to the local path ``target`` (its directory made as needed)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        if self.local is not None:
            import shutil

            shutil.copyfile(self.local, target)
        else:
            self.fs.get_file(self._path, str(target))

    def copy_to(self, target: Location) -> None:
        """Copy this file to ``target`` on the same storage: locally a whole-file atomic replace; on object storage
        the store copies it itself (S3's CopyObject): nothing is downloaded or uploaded."""
        if self.local is not None and target.local is not None:
            target.upload(self.local)
        elif self.local is None and target.local is None and self.fs is target.fs:
            self.fs.copy(self._path, target._path)
        else:
            raise ValueError(f"copy_to: {self.url} and {target.url} are on different storage")

    def arrow_filesystem(self) -> tuple[Any, str]:
        """This location as pyarrow sees it, ``(filesystem, path)``: for a URL, pyarrow's ``PyFileSystem`` over this
        very fsspec filesystem (the same endpoint and credentials chain; what Ray Train's ``storage_filesystem``
        takes, with the path stripped of its protocol), for a local path pyarrow's local filesystem."""
        import pyarrow.fs

        if self.local is not None:
            return pyarrow.fs.LocalFileSystem(), str(self.local)
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(self.fs)), self._path

    def create(self, data: bytes) -> bool:
        """Make the file with ``data`` unless it exists; True when this call made it.

        Locally the content goes to a temporary file first, which is then hard-linked to the name: ``link(2)``
        fails when the name exists, atomically, as ``open(O_CREAT | O_EXCL)`` does, without the instant in which
        an ``O_EXCL`` file is there but still empty (where hard links are not supported: ``O_EXCL`` itself). On
        S3 a ``PutObject`` with ``If-None-Match: *`` (AWS since 2024, MinIO, moto). Elsewhere fsspec's
        ``mode="create"`` checks and then writes, which two writers can both pass: the caller reads the file
        back and keeps it only if it holds its own ``data`` (``pipelines.store.SeedLease``)."""
        if self.local is not None:
            return _create_local(self.local, data)
        try:
            self.fs.pipe_file(self._path, data, mode="create")
        except FileExistsError:
            return False
        except OSError as e:  # a server that answers 412 in a form s3fs does not map to FileExistsError
            if e.errno == errno.EINVAL and "precondition" in str(e).lower():
                return False
            raise
        return True

    def remove(self, recursive: bool = False) -> None:
        """Remove the file (or, ``recursive``, the directory and everything under it); absent is fine."""
        if self.local is not None:
            import shutil

            if recursive and self.local.is_dir():
                shutil.rmtree(self.local, ignore_errors=True)
            else:
                self.local.unlink(missing_ok=True)
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path, recursive=recursive)


def _create_local(path: Path, data: bytes) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.new")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
        try:  # no hard links here
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def open_binary(where: str | os.PathLike) -> Any:
    """A readable binary file for a local path or a URL (a teacher checkpoint on ``s3://``)."""
    text = os.fspath(where)
    if not is_url(text):
        return open(local_path(text), "rb")  # noqa: SIM115 (the caller closes it)
    fs, path = filesystem(text)
    return fs.open(path, "rb")
