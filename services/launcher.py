"""Jobs run as Ray jobs through the Ray Jobs API, so they show in the Ray dashboard.

The entry point is always ``<python> -m services.job_entry <job dir>``: the job dir is made by the service
from a generated job id, and the spec travels as a file in it, never through a shell or a runtime_env.

Without ``--ray-address`` the service starts its own Ray head (``LocalRayHead``) as a child process
(``ray start --head --block``), not by ``ray.init``: the service is then no Ray driver, so Ray's job table
never records the service's command line (which may hold a database password), and the head starts from
an environment without the service's secrets, so no job inherits them.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from stillroom.pipelines.core import StillroomError, UsageError
from stillroom.services.db import JobState

RAY_TO_STATE = {"PENDING": JobState.PENDING, "RUNNING": JobState.RUNNING, "SUCCEEDED": JobState.SUCCEEDED,
                "FAILED": JobState.FAILED, "STOPPED": JobState.CANCELLED}
SECRET_ENV = ("STILLROOM_API_TOKEN", "STILLROOM_DB")  # what the service holds and no Ray process may see


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it; bind it soon, another process may take it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRayHead:
    """A single-node Ray head on 127.0.0.1 that this process starts and stops (its own process group).

    Every port it listens on is chosen free here, so it never shares a port with another Ray on the machine.
    """

    def __init__(self, dashboard_port: int, num_cpus: int | None = None, log_path: Path | None = None):
        if not port_free("127.0.0.1", dashboard_port):
            raise UsageError(f"port {dashboard_port} (the Ray dashboard) is in use: another `stillroom serve` or "
                             "Ray cluster has it; pass --dashboard-port with a free port, or --ray-address to use "
                             "that cluster")
        self.dashboard_port = dashboard_port
        self.num_cpus = num_cpus or os.cpu_count() or 1
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        # Ray's session files (and the address file through which `ray.init()` finds "the" local cluster) go
        # to a directory of this head's own; a short path: Ray's Unix sockets live under it
        self.temp_dir = Path(tempfile.mkdtemp(prefix="stillroom-ray-"))

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout_s: float = 120.0) -> str:
        ray_cli = Path(sys.executable).with_name("ray")
        cmd = [str(ray_cli)] if ray_cli.exists() else [sys.executable, "-m", "ray.scripts.scripts"]
        cmd += ["start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
                f"--num-cpus={self.num_cpus}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        _token_auth_as_ray_init_does()
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            # a session of its own: Ctrl-C in the terminal reaches the service, which stops jobs, then the head
            self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # type: ignore[union-attr]
        self._wait_ready(timeout_s)
        return self.dashboard_url

    def _wait_ready(self, timeout_s: float) -> None:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                where = f" (its log: {self.log_path})" if self.log_path else ""
                raise StillroomError(f"the local Ray head exited with code {self.proc.returncode}{where}")
            try:
                JobSubmissionClient(self.dashboard_url)  # it asks the dashboard for its version
                return
            except Exception:  # ConnectionError while the dashboard starts
                time.sleep(0.5)
        self.stop()
        raise StillroomError(f"the local Ray head did not answer at {self.dashboard_url} within {timeout_s:.0f} s")

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the head (it stops the Ray processes it started), SIGKILL to its group if it lingers;
        then whatever of its group outlived it (the dashboard's forkserver can, for a moment) is ended too."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc is not None:
            end_group(self.proc.pid)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def end_group(pgid: int, grace_s: float = 5.0) -> None:
    """SIGTERM to every process left in the group, SIGKILL to those still there after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return  # the group is empty
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def _token_auth_as_ray_init_does() -> None:
    """Ray's default for a local cluster that ``ray.init`` starts: token authentication, with a token made
    in ~/.ray/auth_token when there is none (``RAY_AUTH_MODE``, when set, decides). It is set in this
    process's environment, so the head (a child) and this process's job client agree."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            enable_token_auth_by_default,
            ensure_token_if_auth_enabled,
        )
    except ImportError:  # a Ray without token authentication
        return
    if enable_token_auth_by_default():
        ensure_token_if_auth_enabled(None, create_token_if_missing=True)


# what a Ray job's metadata says of it (``ray job list``, the dashboard's job page), when its spec has it
METADATA_FIELDS = ("dataset", "split", "teachers", "recipe", "seeds", "top_k", "student", "loss", "epochs", "model")
_CREDENTIALS = re.compile(r"(\w+://)[^/@\s]*@")  # scheme://user:password@host
_QUERY = re.compile(r"\?[^,\s]*")  # a signed URL's signature


def without_secrets(text: str) -> str:
    """``text`` with any URL's credentials and query removed (specs refuse them; said twice, never leaked)."""
    return _QUERY.sub("", _CREDENTIALS.sub(r"\1", text))


def job_metadata(job_id: str, kind: str, resolved: dict[str, Any], store_key: str | None) -> dict[str, str]:
    """The Ray job's metadata (strings only): the service's job id, its kind, the store's key and what the spec
    names of ``METADATA_FIELDS`` (lists joined by commas, each value at most 500 characters), without secrets."""
    meta = {"stillroom_job_id": job_id, "kind": kind, "store": store_key or ""}
    for name in METADATA_FIELDS:
        value = resolved.get(name)
        if value is not None:
            text = ",".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)
            meta[name] = without_secrets(text)[:500]
    return meta


def _token_auth_when_a_token_is_there() -> None:
    """A cluster of Ray's token mode (``RAY_AUTH_MODE=token`` on its head) answers 401 to a client without the
    token. When ``RAY_AUTH_MODE`` is unset here and a token is at hand (``RAY_AUTH_TOKEN``, the file at
    ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``), the job client sends it, as Ray's own CLI does."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


class RayJobs:
    """A thin wrapper of ``JobSubmissionClient`` that speaks in service states."""

    def __init__(self, dashboard_url: str):
        from ray.job_submission import JobSubmissionClient

        _token_auth_when_a_token_is_there()
        self.dashboard_url = dashboard_url if dashboard_url.startswith("http") else f"http://{dashboard_url}"
        try:
            self.client = JobSubmissionClient(self.dashboard_url)
        except Exception as e:
            if type(e).__name__ != "AuthenticationError":
                raise
            raise UsageError(f"the Ray dashboard at {self.dashboard_url} refused us ({str(e).splitlines()[0]}): give "
                             "this process the cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                             "~/.ray/auth_token; `ray get-auth-token` on the head prints it)") from None

    def submit(self, submission_id: str, job_dir: str, python: str, metadata: dict[str, str],
               num_cpus: float = 0.0, num_gpus: float = 0.0, agent_wait_s: float = 60.0) -> str:
        """Submit; the entry point starts on a node with ``num_cpus`` and ``num_gpus`` free and holds them
        (Ray's entry-point resources). While the cluster's job agent is still starting (a fresh head), wait."""
        entrypoint = " ".join(shlex.quote(a) for a in (python, "-m", "stillroom.services.job_entry", job_dir))
        deadline = time.monotonic() + agent_wait_s
        while True:
            try:
                return self.client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                                              metadata=metadata, entrypoint_num_cpus=num_cpus,
                                              entrypoint_num_gpus=num_gpus)
            except Exception as e:  # the SDK raises RuntimeError; other errors come from requests
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def status(self, submission_id: str) -> tuple[JobState, str] | None:
        """``(state, message)``, or None when Ray has no such job (e.g. the cluster was restarted)."""
        try:
            info = self.client.get_job_info(submission_id)
        except RuntimeError as e:
            if "does not exist" in str(e) or "404" in str(e) or "not found" in str(e).lower():
                return None
            raise
        return RAY_TO_STATE.get(str(info.status.value), JobState.RUNNING), info.message or ""

    def stop(self, submission_id: str) -> bool:
        try:
            return bool(self.client.stop_job(submission_id))
        except RuntimeError:
            return False

    def logs(self, submission_id: str) -> str:
        try:
            return self.client.get_job_logs(submission_id)
        except RuntimeError:
            return ""

    async def tail(self, submission_id: str) -> AsyncIterator[str]:
        async for chunk in self.client.tail_job_logs(submission_id):
            yield chunk

    def job_link(self, submission_id: str) -> str:
        return f"{self.dashboard_url}/#/jobs/{submission_id}"

    def info(self) -> dict[str, Any]:
        return {"dashboard": self.dashboard_url}
