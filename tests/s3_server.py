"""A real S3-compatible server for the object-storage tests: moto's standalone server (``moto[server]``, in the
``s3`` extra that infra/setup.sh installs) on a free port of 127.0.0.1, started and ended by its pid.

Its credentials reach stillroom as a user's would, through the standard chain: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` and ``AWS_ENDPOINT_URL`` in the environment (which the subprocesses and a local Ray
started by them inherit). The secret key is random: tests grep what stillroom wrote and printed for it.
Skipped, with the reason, where moto or s3fs is not installed or the server does not start.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stillroom.services.launcher import free_port


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    secret: str
    pid: int
    log: str = ""  # the server's request log (werkzeug's access lines: method, path and query, status)

    def requests(self) -> list[str]:
        """The request lines the server has logged so far (``GET /bucket/key HTTP/1.1``), in order."""
        text = Path(self.log).read_text(errors="replace") if self.log else ""
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # werkzeug colours some statuses
        return [line.split('"')[1] for line in text.splitlines() if line.count('"') >= 2]

    def set_auth(self, on: bool) -> None:
        """Turn moto's IAM checks on (every request then needs an IAM user's key and a policy that allows it) or
        off again (any key may do anything: the default)."""
        import urllib.request

        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0" if on else b"inf",
                                     method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).read()

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(use_listings_cache=False)

    def everything(self) -> bytes:
        """Every object of the bucket, concatenated (to grep for what must never be stored)."""
        fs = self.fs()
        return b"".join(fs.cat_file(p) for p in fs.find(self.bucket))


def serve_s3() -> Iterator[S3Server]:
    """The server for the session (conftest's ``s3`` fixture); skips the test where it cannot start."""
    for module in ("moto", "s3fs"):
        try:
            __import__(module)
        except ImportError:
            pytest.skip(f"{module} is not installed (pip install -e '.[s3]'): no S3 server to test against")
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="stillroom-moto-", suffix=".log", delete=False)  # noqa: SIM115
    # its request log goes to a file: a pipe nobody reads fills up and the server blocks on it
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                err = Path(log.name).read_text()[-500:] if proc.returncode else "timed out"
                pytest.skip(f"moto's S3 server did not start on 127.0.0.1:{port}: {err}")
            time.sleep(0.1)
    env = {"AWS_ACCESS_KEY_ID": "stillroomtestkey", "AWS_SECRET_ACCESS_KEY": f"s3cr3t{secrets.token_hex(16)}",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1"}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = S3Server(env["AWS_ENDPOINT_URL"], "stillroom-test", env["AWS_SECRET_ACCESS_KEY"], proc.pid, log.name)
    try:
        server.fs().mkdir(server.bucket)
        yield server
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.kill(proc.pid, signal.SIGKILL)  # an in-memory server: nothing of it to keep
        proc.wait()
        log.close()
        Path(log.name).unlink(missing_ok=True)
