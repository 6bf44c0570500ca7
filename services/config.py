"""Service settings: one ``Settings`` object, from ``STILLROOM_*`` environment variables or flags."""

from __future__ import annotations

import os
import secrets
import sys
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from stillroom.pipelines.core import Location, is_url, local_path

if TYPE_CHECKING:
    from stillroom.services.specs import Root


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STILLROOM_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    state_dir: Path = Path(".stillroom")  # the token, the default SQLite file, the local Ray head's log
    # the job directories (jobs/<id>: spec, progress, result, a train job's run) and the teachers the service
    # trains (teachers/<key>.pt): a path or a URL (s3://bucket/prefix: no volume shared with the Ray nodes);
    # default: the state dir
    work_root: str = ""
    # the store and data roots: a path, or a URL of any installed fsspec protocol (s3://bucket/prefix)
    store_root: str = "stores"
    data_root: str = "/usr/share/datasets"
    db: str = ""  # any SQLAlchemy URL; default: sqlite:///<state_dir>/jobs.db
    ray_address: str = ""  # a Ray dashboard URL (http://host:8265); empty: start a local Ray head
    dashboard_port: int = 8265
    api_token: str = ""
    job_python: str = sys.executable  # the interpreter that runs job entry points on the Ray head
    poll_interval_s: float = 1.0
    max_body_bytes: int = 1 << 20

    @field_validator("store_root", "data_root", "work_root", mode="before")
    @classmethod
    def _path_as_text(cls, v: Any) -> Any:
        return os.fspath(v) if isinstance(v, os.PathLike) else v

    def prepare(self) -> None:
        """Make the directories; resolve the local roots so that path checks compare real paths, and check
        the URL roots (no credentials, query or fragment, no '..')."""
        from stillroom.services.specs import root_of

        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.state_dir.resolve()
        self.work_root = self.work_root or str(self.state_dir)
        if not is_url(self.work_root):
            for d in ("jobs", "teachers"):
                (local_path(self.work_root) / d).mkdir(parents=True, exist_ok=True)
        self.work_root = str(root_of(self.work_root, "work root"))
        if not is_url(self.store_root):
            Path(local_path(self.store_root)).mkdir(parents=True, exist_ok=True)
        self.store_root = str(root_of(self.store_root, "store root"))
        self.data_root = str(root_of(self.data_root, "data root"))

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{self.state_dir / 'jobs.db'}"

    @property
    def allowed_roots(self) -> tuple[Root, ...]:
        from stillroom.services.specs import root_of

        # the work root holds the teachers the service trained, which label specs name
        roots = (self.data_root, self.store_root, self.work_root or self.state_dir)
        return tuple(root_of(str(r), "root") for r in roots)

    def store_of(self, cache_key: str) -> Location:
        """Where the store ``cache_key`` lives under the store root (a path or a URL)."""
        return Location(self.store_root) / cache_key

    @property
    def work(self) -> Location:
        """The work root (a path or a URL): ``jobs/<id>`` and ``teachers/<key>.pt`` are under it."""
        return Location(self.work_root or self.state_dir)

    @cached_property
    def token(self) -> str:
        """The bearer token: ``STILLROOM_API_TOKEN``, or the one saved in the state dir, or a new one (0600)."""
        if self.api_token:
            return self.api_token
        path = self.state_dir / "api_token"
        if path.exists():
            return path.read_text().strip()
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        print(f"stillroom: made a new API token in {path} (mode 0600)", file=sys.stderr)
        return token

    @property
    def token_source(self) -> str:
        """Where the token is, for people (never the token itself)."""
        return "STILLROOM_API_TOKEN" if self.api_token else f"{self.state_dir / 'api_token'} (mode 0600)"
