"""Service settings: one ``Settings`` object, from ``STILLROOM_*`` environment variables or flags."""

from __future__ import annotations

import os
import secrets
import sys
from functools import cached_property
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STILLROOM_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    state_dir: Path = Path(".stillroom")  # job directories, the token, the default SQLite file
    store_root: Path = Path("stores")
    data_root: Path = Path("/usr/share/datasets")
    db: str = ""  # any SQLAlchemy URL; default: sqlite:///<state_dir>/jobs.db
    ray_address: str = ""  # a Ray dashboard URL (http://host:8265); empty: start a local Ray head
    dashboard_port: int = 8265
    api_token: str = ""
    job_python: str = sys.executable  # the interpreter that runs job entry points on the Ray head
    poll_interval_s: float = 1.0
    max_body_bytes: int = 1 << 20

    def prepare(self) -> None:
        """Make the directories; resolve the roots so that path checks compare real paths."""
        for d in (self.state_dir, self.store_root, self.state_dir / "jobs", self.state_dir / "teachers"):
            d.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.state_dir.resolve()
        self.store_root = self.store_root.resolve()
        self.data_root = self.data_root.resolve()

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{self.state_dir / 'jobs.db'}"

    @property
    def allowed_roots(self) -> tuple[Path, ...]:
        return (self.data_root, self.store_root, self.state_dir)

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
