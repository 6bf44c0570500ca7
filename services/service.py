"""What the routes do: submit jobs (with dedup, idempotency and the label cache), follow them on Ray into
the database, cancel them, and stop them all when the service stops its own Ray cluster."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError

from stillroom.pipelines.core import Location, is_url
from stillroom.services.config import Settings
from stillroom.services.db import ACTIVE, Database, Job, JobKind, JobPublic, JobState, new_job_id, now
from stillroom.services.launcher import RayJobs, job_metadata
from stillroom.services.specs import REST_ONLY, BadLocation, PathOutsideRoots, _Spec, confined_spec
from stillroom.services.store_index import StoreIndex

STORE_RESCAN_S = 10.0  # how often the background thread rereads the store root for stores made elsewhere


def entry_resources(kind: str, resolved: dict[str, Any]) -> dict[str, float]:
    """What a job's own process asks Ray for: a teacher job and a single-worker train job train in it (their
    spec's ``resources``); a label job and a multi-worker train job only coordinate workers that ask for theirs."""
    if kind == JobKind.teacher or (kind == JobKind.train and resolved.get("workers", 1) == 1):
        r = resolved["resources"]
        return {"num_cpus": float(r["cpus"]), "num_gpus": float(r["gpus"])}
    return {"num_cpus": 0.0, "num_gpus": 0.0}


def invalid(field: str, message: str) -> RequestValidationError:
    """A 422 in FastAPI's documented validation-error shape, naming the body field that is wrong."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message}])


class Service:
    """What the routes share: settings, database, Ray jobs, the store index, and the lock that makes dedup
    decisions atomic. ``owns_cluster``: the service started its Ray cluster, so stopping it stops the jobs."""

    def __init__(self, settings: Settings, jobs: RayJobs, owns_cluster: bool = False):
        self.settings, self.jobs, self.owns_cluster = settings, jobs, owns_cluster
        self.db = Database(settings.db_url)
        self.stores = StoreIndex(settings.store_root)
        self.submit_lock = threading.Lock()
        self.key_lock = threading.Lock()
        self.label_keys: dict[str, str] = {}  # label spec fingerprint -> cache key
        self.teacher_versions: dict[str, tuple[int, str]] = {}  # a URL teacher checkpoint -> (size, ETag) last seen
        self.stop = threading.Event()

    def public(self, job: Job) -> JobPublic:
        return JobPublic.of(job, self.jobs.job_link(job.ray_job_id) if job.ray_job_id else None)

    # -- submitting ------------------------------------------------------------------------

    def submit(self, kind: JobKind, spec: _Spec, idempotency_key: str | None) -> tuple[Job, int]:
        """The job for ``spec`` and the status to answer: 202 for a new record, 200 for an idempotent replay."""
        digest = spec.digest()
        if idempotency_key:
            existing = self.db.by_idempotency_key(idempotency_key)
            if existing is not None:
                return self._same_or_conflict(existing, kind, digest)
        try:
            resolved = confined_spec(kind, spec, self.settings.allowed_roots, self.settings.state_dir)
        except PathOutsideRoots as e:
            raise HTTPException(403, str(e)) from None
        except BadLocation as e:
            raise invalid(e.field, str(e)) from None
        if kind == JobKind.train:
            resolved["dataset"] = self._train_dataset(spec, resolved)
        job = Job(id=new_job_id(), kind=kind.value, state=JobState.PENDING.value, spec=spec.model_dump(mode="json"),
                  spec_hash=digest, idempotency_key=idempotency_key, created_at=now())
        if kind == JobKind.train:
            job.spec = {**job.spec, "dataset": resolved["dataset"]}  # the record says what the job reads
        if kind == JobKind.label:
            self.check_teachers(resolved["teachers"])  # a checkpoint rewritten at its URL is another teacher
            job.cache_key = self._label_cache_key(resolved)
            if self.stores.has_seeds(job.cache_key, resolved["seeds"]) and not idempotency_key:
                return self._cache_hit_label(job, resolved), 202  # an insert, no file read: no lock needed
        with self.submit_lock:  # dedup and idempotency decisions are made one at a time
            if idempotency_key and (existing := self.db.by_idempotency_key(idempotency_key)) is not None:
                return self._same_or_conflict(existing, kind, digest)
            if kind == JobKind.teacher:
                return self._submit_teacher(job, resolved, spec.digest(exclude=tuple(REST_ONLY["teacher"]))), 202
            if kind == JobKind.label:
                return self._submit_label(job, resolved), 202
            return self._launch(job, resolved, {"out": (self._job_dir(job) / "run").url}), 202

    def _same_or_conflict(self, existing: Job, kind: JobKind, digest: str) -> tuple[Job, int]:
        if existing.kind != kind or existing.spec_hash != digest:
            raise HTTPException(409, "this Idempotency-Key was used with another request body")
        return existing, 200

    def _train_dataset(self, spec: _Spec, resolved: dict[str, Any]) -> str:
        """The data set a train job reads: the store's, unless the spec names one (of the store's kind)."""
        key = resolved["store"]
        entry = self.stores.get(key) or self.stores.reload(key)
        if entry is None:
            raise invalid("store", f"no store {key} under the store root")
        if resolved["dataset"] is None:  # not named (or null): the store's
            if entry.dataset is None:
                raise invalid("dataset", f"store {key} does not record its data set: name it in the spec")
            return entry.dataset
        given = str(resolved["dataset"])
        # the kind is checked here; the trainer checks the rest against the store's data set fingerprint
        if entry.dataset is not None and given.partition(":")[0] != entry.dataset.partition(":")[0]:
            raise invalid("dataset", f"store {key} was labeled on {entry.dataset!r}, not {given!r}; "
                                     "leave dataset out to use the store's")
        return given

    def _job_dir(self, job: Job) -> Location:
        """The job's directory under the work root: a path, or a URL the job entry point reads and writes."""
        return self.settings.work / "jobs" / job.id

    def _submit_teacher(self, job: Job, resolved: dict[str, Any], key: str) -> Job:
        """A cache hit when the checkpoint is there; attached to the job training it now, if one is; else run."""
        job.cache_key = key[:24]  # the teacher's checkpoint: what it computes, not where it runs
        out = self.settings.work / "teachers" / f"{job.cache_key}.pt"
        summary = out.with_name(f"{job.cache_key}.json")  # the teacher job writes it after the checkpoint
        if out.exists() and summary.exists():
            job.state, job.cache_hit, job.ended_at = JobState.SUCCEEDED.value, True, now()
            job.result = {**summary.read_json(), "cache_hit": True}
            return self.db.add(job)
        for primary in self.db.active_primaries(JobKind.teacher, job.cache_key):
            return self._attach(job, primary)
        return self._launch(job, resolved, {"out": out.url})

    def _cache_hit_label(self, job: Job, resolved: dict[str, Any]) -> Job:
        job.state, job.cache_hit, job.ended_at = JobState.SUCCEEDED.value, True, now()
        entry = self.stores.get(str(job.cache_key))
        job.result = {"cache_key": job.cache_key, "store": self.settings.store_of(str(job.cache_key)).url,
                      "seeds_computed": [], "seeds_reused": sorted(resolved["seeds"]), "views": 0,
                      "images": entry.samples if entry else None, "cache_hit": True}
        return self.db.add(job)

    def _submit_label(self, job: Job, resolved: dict[str, Any]) -> Job:
        key, seeds = str(job.cache_key), resolved["seeds"]
        if not self.stores.has_seeds(key, seeds):
            self.stores.reload(key)  # the index may be behind a store another process wrote
        if self.stores.has_seeds(key, seeds):
            return self._cache_hit_label(job, resolved)
        entry = self.stores.get(key)
        have = set(entry.seeds) if entry else set()
        for primary in self.db.active_primaries(JobKind.label, key):
            if set(seeds) <= set(primary.spec["seeds"]) | have:
                return self._attach(job, primary)
        # seeds that only overlap a running job's ([0, 1] and [1, 2]): a run of its own, which labels the seeds
        # nobody holds and waits for the shared one under its lease (pipelines.store.SeedLease), then reuses it
        return self._launch(job, resolved, {})

    def _attach(self, job: Job, primary: Job) -> Job:
        """Record ``job`` as sharing ``primary``'s run: it follows that run's state (``_mirror``)."""
        job.attached_to, job.ray_job_id, job.state = primary.id, primary.ray_job_id, primary.state
        job.started_at = primary.started_at
        return self.db.add(job)

    def cached_label(self, spec: _Spec) -> Job | None:
        """The answer to a label spec when it is a cache hit the service already knows: a spec whose key was
        computed before and whose seeds the store index holds. No file is read and Ray is not asked (the
        teacher paths are resolved and stat-ed); one INSERT. None: not known to be a hit (``submit`` decides)."""
        try:
            resolved = confined_spec(JobKind.label, spec, self.settings.allowed_roots, self.settings.state_dir)
        except (PathOutsideRoots, BadLocation):
            return None  # `submit` answers it
        key = self.label_keys.get(self._label_fingerprint(resolved))
        if key is None or not self.stores.has_seeds(key, resolved["seeds"]):
            return None
        job = Job(id=new_job_id(), kind=JobKind.label.value, state=JobState.PENDING.value,
                  spec=spec.model_dump(mode="json"), spec_hash=spec.digest(), cache_key=key, created_at=now())
        return self._cache_hit_label(job, resolved)

    def _label_fingerprint(self, resolved: dict[str, Any]) -> str:
        """What makes a label spec's store key: its fields but the seeds and the way it runs, and the teacher
        checkpoints' size and modification time (a checkpoint rewritten in place is another teacher). A
        checkpoint on a URL counts by its size and ETag as last seen (``check_teachers``: by every ``submit``,
        and by the background thread every ``STORE_RESCAN_S``), so a cache hit never waits on the object store;
        one rewritten at its URL is seen by the next submission that is not answered from the cache, and by all
        within ``STORE_RESCAN_S``."""
        stats: list[tuple[Any, ...]] = []
        for t in resolved["teachers"]:
            where = t.partition("@")[2]
            if is_url(where):
                stats.append((t, *self.teacher_versions.get(where, (-1, "not seen"))))
                continue
            path = Path(where)
            try:
                st = path.stat()
                stats.append((str(path), st.st_mtime_ns, st.st_size))
            except OSError:
                stats.append((t,))
        fields = {k: v for k, v in resolved.items() if k not in ("seeds", "batch_size", "num_workers",
                                                                 "gpus_per_worker")}
        return json.dumps([fields, stats], sort_keys=True)

    def check_teachers(self, teachers: list[str] | None = None) -> None:
        """Ask the object store for the size and ETag of each URL teacher checkpoint (default: every one seen so
        far) and remember them; a checkpoint that cannot be asked about keeps what was seen last."""
        if teachers is None:
            urls = list(self.teacher_versions.copy())  # a copy: request threads may add meanwhile
        else:
            urls = [where for t in teachers if is_url(where := t.partition("@")[2])]
        for url in urls:
            with contextlib.suppress(OSError):  # not there (the label job says so), or the store is down
                self.teacher_versions[url] = Location(url).version()

    def _label_cache_key(self, resolved: dict[str, Any]) -> str:
        """The store key of a label spec; computed once (it loads the dataset and teachers), then remembered."""
        from stillroom.pipelines.core import StillroomError
        from stillroom.pipelines.labeling import LabelConfig, prepare_store

        fingerprint = self._label_fingerprint(resolved)
        if fingerprint not in self.label_keys:
            with self.key_lock:  # the first submission of a spec computes it; the others wait for it
                if fingerprint not in self.label_keys:
                    config = LabelConfig(**{**resolved, "teachers": tuple(resolved["teachers"]),
                                            "seeds": tuple(resolved["seeds"]),
                                            "store_root": self.settings.store_root})
                    try:
                        key = prepare_store(config).cache_key
                    except StillroomError as e:
                        raise invalid("teachers", str(e)) from None
                    self.stores.reload(key)
                    self.label_keys[fingerprint] = key
        return self.label_keys[fingerprint]

    def _launch(self, job: Job, resolved: dict[str, Any], extra: dict[str, Any]) -> Job:
        job_dir = self._job_dir(job)
        job.job_dir = job_dir.url
        job.ray_job_id = job.id  # the Ray job's submission id is the job's id
        try:  # one whole object on object storage, an atomic replace locally
            job_dir.makedirs()
            (job_dir / "spec.json").write_json({
                "job_id": job.id, "kind": job.kind, "spec": resolved, "store_root": self.settings.store_root,
                **extra}, indent=None, sort_keys=False)
        except OSError as e:
            job.state, job.ended_at = JobState.FAILED.value, now()
            job.error = f"could not write the job's spec under the work root: {type(e).__name__}: {e}"
            return self.db.add(job)
        self.db.add(job)  # recorded first: the database is the record even if Ray refuses the job
        try:
            self.jobs.submit(job.ray_job_id, job_dir.url, self.settings.job_python,
                             job_metadata(job.id, job.kind, resolved, job.cache_key or resolved.get("store")),
                             **entry_resources(job.kind, resolved))
        except Exception as e:
            return self.db.update(job.id, state=JobState.FAILED, error=f"Ray refused the job: {e}",
                                  ended_at=now()) or job
        return job

    def resume(self, job: Job) -> Job:
        """Run a cancelled or failed (or lost) train job again from its ``last.pt``, as a new attempt of the same
        job: a Ray job ``<id>-<attempt>``, the attempt before recorded in ``attempts``."""
        if job.kind != JobKind.train:
            raise HTTPException(409, f"job {job.id} is a {job.kind} job: only train jobs resume (a label job "
                                     "submitted again keeps the pieces and seeds already written)")
        if job.state not in (JobState.CANCELLED, JobState.FAILED):
            raise HTTPException(409, f"job {job.id} is {job.state}: only a cancelled or failed train job resumes")
        if job.attached_to is not None or not job.job_dir or not job.ray_job_id:
            raise HTTPException(409, f"job {job.id} never ran on Ray: submit it again")
        status = self.jobs.status(job.ray_job_id)
        if status is not None and status[0] in ACTIVE:
            raise HTTPException(409, f"job {job.id}: its Ray job {job.ray_job_id} is still stopping; try again soon")
        job_dir = Location(job.job_dir)
        entry = (job_dir / "spec.json").read_json()
        if not (Location(entry["out"]) / "last.pt").exists():
            raise HTTPException(409, f"job {job.id} saved no last.pt (it ended before its first epoch): "
                                     "submit it again")
        attempts = [*(job.attempts or []), {"ray_job_id": job.ray_job_id, "state": job.state, "error": job.error,
                                            "started_at": job.started_at, "ended_at": job.ended_at,
                                            "progress": job.progress}]
        ray_job_id = f"{job.id}-{len(attempts) + 1}"
        with contextlib.suppress(OSError):  # the last attempt's outcome is not this one's
            (job_dir / "result.json").remove()
        (job_dir / "spec.json").write_json({**entry, "resume": True}, indent=None, sort_keys=False)
        resumed = self.db.update(job.id, state=JobState.PENDING, ray_job_id=ray_job_id, error=None, started_at=None,
                                 ended_at=None, attempts=attempts) or job
        try:
            self.jobs.submit(ray_job_id, job_dir.url, self.settings.job_python,
                             {**job_metadata(job.id, job.kind, entry["spec"], entry["spec"].get("store")),
                              "attempt": str(len(attempts) + 1)}, **entry_resources(job.kind, entry["spec"]))
        except Exception as e:
            return self.db.update(job.id, state=JobState.FAILED, error=f"Ray refused the job: {e}",
                                  ended_at=now()) or resumed
        return resumed

    # -- following -------------------------------------------------------------------------

    def refresh(self, reconcile: bool = False) -> None:
        """Bring every active record up to date with Ray; ``reconcile``: at start, fail those Ray lost."""
        primaries = [j for j in self.db.active() if j.attached_to is None and j.ray_job_id]
        for job in primaries:
            status = self.jobs.status(job.ray_job_id or "")
            if status is None:
                if reconcile or job.state == JobState.RUNNING or now() - job.created_at > 60:
                    self._finish(job, JobState.FAILED, error=f"Ray job {job.ray_job_id} no longer exists "
                                                             "(the Ray cluster was restarted or the job was lost)")
                continue
            state, message = status
            fields: dict[str, Any] = {}
            progress = self._read_json(job, "progress.json")
            if progress and progress != job.progress:
                fields["progress"] = progress
            if state == JobState.RUNNING and job.state == JobState.PENDING:
                fields.update(state=JobState.RUNNING, started_at=now())
            if fields:
                self.db.update(job.id, **fields)
                self._mirror(job.id, fields)
            if state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
                outcome = self._read_json(job, "result.json") or {}
                if state == JobState.SUCCEEDED and not outcome.get("ok", False):
                    state = JobState.FAILED
                error = outcome.get("error") or (message if state == JobState.FAILED else None)
                self._finish(job, state, result=outcome.get("result"), error=error)

    def _finish(self, job: Job, state: JobState, result: dict[str, Any] | None = None,
                error: str | None = None) -> None:
        fields: dict[str, Any] = {"state": state, "ended_at": now(), "error": error}
        if result is not None:
            fields["result"] = result
            if result.get("cache_key"):
                fields["cache_key"] = result["cache_key"]
        key = fields.get("cache_key") or job.cache_key
        if job.kind == JobKind.label and key:  # first: whoever sees the job ended finds its seeds in the index
            self.stores.reload(key)
        self.db.update(job.id, **fields)
        self._mirror(job.id, fields)

    def _mirror(self, primary_id: str, fields: dict[str, Any]) -> None:
        """Records attached to a primary follow its state."""
        for job in self.db.active():
            if job.attached_to == primary_id:
                self.db.update(job.id, **fields)

    def _read_json(self, job: Job, name: str) -> dict[str, Any] | None:
        """``name`` in the job's directory (a path or a URL); None while the job has not written it."""
        if not job.job_dir:
            return None
        try:
            found = (Location(job.job_dir) / name).read_json()
        except (OSError, ValueError):  # not there (yet), or not JSON
            return None
        return found if isinstance(found, dict) else None

    def follow(self) -> None:
        """The background thread: refresh active jobs every poll interval, rescan the stores now and then."""
        last_scan = time.monotonic()
        while not self.stop.wait(self.settings.poll_interval_s):
            try:
                self.refresh()
                if time.monotonic() - last_scan > STORE_RESCAN_S:
                    self.stores.scan()
                    self.check_teachers()
                    last_scan = time.monotonic()
            except Exception as e:  # a passing Ray or database hiccup: try again next round
                print(f"stillroom: job refresh failed: {type(e).__name__}: {e}", flush=True)

    def cancel(self, job: Job, reason: str = "cancelled by request") -> Job:
        if job.state not in ACTIVE:
            raise HTTPException(409, f"job {job.id} has ended already ({job.state})")
        if job.attached_to is None and job.ray_job_id:
            others = [j for j in self.db.active() if j.attached_to == job.id]
            if not others:
                self.jobs.stop(job.ray_job_id)
            else:  # the run goes on for the others: the first of them follows it now, the rest follow that one
                heir = others[0]
                self.db.update(heir.id, attached_to=None, job_dir=job.job_dir)
                for other in others[1:]:
                    self.db.update(other.id, attached_to=heir.id)
        return self.db.update(job.id, state=JobState.CANCELLED, ended_at=now(), error=reason) or job

    def cancel_all(self, reason: str, wait_s: float = 60.0) -> list[str]:
        """Stop every active job on Ray, wait until Ray says each has ended, record them CANCELLED with
        ``reason``; return the ids of the jobs it cancelled."""
        active = self.db.active()
        running = [j for j in active if j.attached_to is None and j.ray_job_id]
        for job in running:
            self.jobs.stop(job.ray_job_id or "")
        deadline = time.monotonic() + wait_s
        pending = list(running)
        while pending and time.monotonic() < deadline:
            pending = [j for j in pending if (s := self.jobs.status(j.ray_job_id or "")) is not None and s[0] in ACTIVE]
            if pending:
                time.sleep(0.2)
        for job in active:
            still = " (Ray had not ended it yet)" if job in pending else ""
            self.db.update(job.id, state=JobState.CANCELLED, ended_at=now(), error=reason + still)
        return [j.id for j in active]
