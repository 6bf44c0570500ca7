"""Job records: the table (``Job``), what the API shows of one (``JobPublic``), and the queries (``Database``).

SQLAlchemy over a SQLite file by default, or PostgreSQL (``pip install -e '.[postgres]'``,
``--db postgresql+psycopg://USER@HOST/DB``). The database, not Ray, is the record of every job: Ray's job
table has no paging and dies with the cluster.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import threading
import time
import uuid
from collections.abc import Iterator
from enum import StrEnum
from typing import Any

from pydantic import BaseModel
from sqlalchemy import JSON, Engine, Float, Index, String, Text, create_engine, event, insert, inspect, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


class JobState(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


ACTIVE = (JobState.PENDING, JobState.RUNNING)


class JobKind(StrEnum):
    teacher = "teacher"
    label = "label"
    train = "train"


class Base(DeclarativeBase):
    pass


class Job(Base):
    """One job's record (the table)."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True, default=JobState.PENDING.value)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    spec_hash: Mapped[str] = mapped_column(String(64), index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True, nullable=True)
    cache_key: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    cache_hit: Mapped[bool] = mapped_column(default=False)
    ray_job_id: Mapped[str | None] = mapped_column(String(80), index=True, nullable=True)
    attached_to: Mapped[str | None] = mapped_column(String(40), nullable=True)  # shares that job's Ray run
    job_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # the earlier attempts of a resumed job: each one's Ray job id, state, error, times and progress
    attempts: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)

    __table_args__ = (Index("ix_jobs_created_id", "created_at", "id"),)


class JobPublic(BaseModel):
    """A job as the API shows it (no job directory, no spec hash)."""

    id: str
    kind: JobKind
    state: JobState
    spec: dict[str, Any]
    cache_key: str | None
    cache_hit: bool
    ray_job_id: str | None
    attached_to: str | None
    progress: dict[str, Any] | None
    result: dict[str, Any] | None
    error: str | None
    created_at: float
    started_at: float | None
    ended_at: float | None
    dashboard_url: str | None
    attempts: list[dict[str, Any]] = []

    @classmethod
    def of(cls, job: Job, dashboard_url: str | None) -> JobPublic:
        return cls(id=job.id, kind=JobKind(job.kind), state=JobState(job.state), spec=job.spec,
                   cache_key=job.cache_key, cache_hit=job.cache_hit, ray_job_id=job.ray_job_id,
                   attached_to=job.attached_to, progress=job.progress, result=job.result, error=job.error,
                   created_at=job.created_at, started_at=job.started_at, ended_at=job.ended_at,
                   dashboard_url=dashboard_url, attempts=job.attempts or [])


class JobList(BaseModel):
    jobs: list[JobPublic]
    next_page_token: str | None


def _add_new_columns(engine: Any) -> None:
    """A database made by an earlier version gains the columns added since (nullable, so old rows stay valid):
    ``create_all`` makes missing tables only."""
    have = {c["name"] for c in inspect(engine).get_columns(Job.__tablename__)}
    with engine.begin() as conn:
        for column in Job.__table__.columns:
            if column.name not in have and column.nullable:
                kind = column.type.compile(dialect=engine.dialect)
                conn.execute(text(f"ALTER TABLE {Job.__tablename__} ADD COLUMN {column.name} {kind}"))


def new_job_id() -> str:
    return f"job_{uuid.uuid4().hex[:16]}"


@dataclasses.dataclass
class _Pending:
    """A record waiting for its group's INSERT."""

    values: dict[str, Any]
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: Exception | None = None


def _insert_group(engine: Engine, group: list[_Pending]) -> None:
    """The group's records in one transaction (one INSERT per set of columns given); if that fails, each in
    a transaction of its own, so that a bad record fails only its own submission."""
    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for p in group:
        by_columns.setdefault(tuple(p.values), []).append(p.values)
    try:
        with engine.begin() as conn:
            for rows in by_columns.values():
                conn.execute(insert(Job), rows)
    except Exception as e:
        if len(group) == 1:
            group[0].error = e
        else:
            for p in group:
                try:
                    with engine.begin() as conn:
                        conn.execute(insert(Job), p.values)
                except Exception as one:
                    p.error = one
    finally:
        for p in group:
            p.done.set()


class Database:
    def __init__(self, url: str):
        kwargs: dict[str, Any] = {}
        sqlite = url.startswith("sqlite")
        if sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True  # a server restart drops pooled connections
        self.engine = create_engine(url, **kwargs)
        if sqlite:
            @event.listens_for(self.engine, "connect")
            def _sqlite_pragmas(conn, _record):  # concurrent readers while one writes; durable enough
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()
        Base.metadata.create_all(self.engine)
        _add_new_columns(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite has one writer at a time and makes the others sleep and retry (1, 2, 5, 10, ... ms): under
        # concurrent submissions that backoff was the tail of the latency. This process is the only writer,
        # so its writes queue on a lock instead and each starts as soon as the one before commits; new
        # records that queue meanwhile are inserted together, in one transaction (``add``).
        self.sqlite = sqlite
        self.write_lock: threading.Lock | contextlib.nullcontext[None] = (
            threading.Lock() if sqlite else contextlib.nullcontext())
        self._pending: list[_Pending] = []
        self._pending_lock = threading.Lock()

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on any error: nothing half-recorded."""
        with self.sessions() as s, s.begin():
            yield s

    def close(self) -> None:
        self.engine.dispose()

    # -- queries ---------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)

    def by_idempotency_key(self, key: str) -> Job | None:
        with self.session() as s:
            return s.scalars(select(Job).where(Job.idempotency_key == key)).first()

    def active_primaries(self, kind: JobKind, cache_key: str) -> list[Job]:
        """The running (or pending) jobs of ``kind`` that compute ``cache_key`` themselves."""
        with self.session() as s:
            q = select(Job).where(Job.kind == kind.value, Job.cache_key == cache_key,
                                  Job.state.in_([s.value for s in ACTIVE]),
                                  Job.attached_to.is_(None), Job.ray_job_id.is_not(None))
            return list(s.scalars(q))

    def active(self) -> list[Job]:
        with self.session() as s:
            return list(s.scalars(select(Job).where(Job.state.in_([st.value for st in ACTIVE]))))

    def list(self, state: JobState | None, kind: JobKind | None, limit: int,
             page_token: str | None) -> tuple[list[Job], str | None]:
        """Newest first; ``page_token`` is where the previous page ended."""
        q = select(Job)
        if state:
            q = q.where(Job.state == state.value)
        if kind:
            q = q.where(Job.kind == kind.value)
        if page_token:
            created, job_id = decode_token(page_token)
            q = q.where((Job.created_at < created) | ((Job.created_at == created) & (Job.id < job_id)))
        q = q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
        with self.session() as s:
            rows = list(s.scalars(q))
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, encode_token(rows[-1].created_at, rows[-1].id) if more and rows else None

    def counts(self) -> dict[str, Any]:
        with self.session() as s:
            jobs = list(s.execute(select(Job.state, Job.kind, Job.cache_hit, Job.result, Job.attached_to)))
        by_state = {st.value: 0 for st in JobState}
        hits = labels = 0
        for state, kind, hit, result, attached_to in jobs:
            by_state[state] = by_state.get(state, 0) + 1
            hits += int(bool(hit))
            if kind == JobKind.label and state == JobState.SUCCEEDED and result and not hit and attached_to is None:
                labels += int(result.get("views", result.get("samples", 0)))  # "samples": an older record
        return {"by_state": by_state, "cache_hits": hits, "labels_written": labels}

    def add(self, job: Job) -> Job:
        """Insert a new record (one INSERT, without the ORM's unit of work: submissions are the hot path)."""
        for c in Job.__table__.columns:  # the column defaults, on the object too (the ORM would refresh it)
            if getattr(job, c.key) is None and c.default is not None and c.default.is_scalar:
                setattr(job, c.key, c.default.arg)
        values = {c.key: v for c in Job.__table__.columns if (v := getattr(job, c.key)) is not None}
        if not self.sqlite:  # a server database: writers run side by side
            with self.engine.begin() as conn:
                conn.execute(insert(Job), values)
            return job
        # group commit: whoever holds the write lock inserts every record queued by then in one transaction;
        # a caller whose record went in with an earlier group returns as soon as it gets the lock
        mine = _Pending(values)
        with self._pending_lock:
            self._pending.append(mine)
        with self.write_lock:
            if not mine.done.is_set():
                with self._pending_lock:
                    group, self._pending = self._pending, []
                _insert_group(self.engine, group)
        if mine.error is not None:
            raise mine.error
        return job

    def update(self, job_id: str, **fields: Any) -> Job | None:
        with self.write_lock, self.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                return None
            for k, v in fields.items():
                setattr(job, k, v.value if isinstance(v, StrEnum) else v)
            return job


def encode_token(created_at: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at!r}|{job_id}".encode()).decode()


def decode_token(token: str) -> tuple[float, str]:
    try:
        created, job_id = base64.urlsafe_b64decode(token.encode()).decode().split("|", 1)
        return float(created), job_id
    except (ValueError, UnicodeDecodeError):
        raise ValueError("page_token is not one this service gave out") from None


def now() -> float:
    return time.time()
