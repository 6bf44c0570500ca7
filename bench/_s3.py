"""A local S3 server for the benches: moto's, on 127.0.0.1, wrapped to count what it sends.

``python bench/_s3.py PORT`` serves moto's S3 as ``python -m moto.server`` does, plus ``GET /__stillroom_bytes__``:
the bytes of every response body the server has sent so far and the requests by method, as JSON (``POST`` to
the same path resets them). That is what the object store sent, whichever process (a loader worker, a Ray
actor) asked for it. ``S3Bench`` starts it, points the standard credential chain at it and ends it by its pid.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

COUNTS = "/__stillroom_bytes__"


def serve(port: int) -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple

    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()
    counts: dict[str, Any] = {"bytes": 0, "requests": {}}

    def counting(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") == COUNTS:
            with lock:
                body = json.dumps(counts).encode()
                if environ["REQUEST_METHOD"] == "POST":
                    counts.update(bytes=0, requests={})
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        method = environ["REQUEST_METHOD"]
        with lock:
            counts["requests"][method] = counts["requests"].get(method, 0) + 1
        return counted(app(environ, start_response))

    def counted(body: Any) -> Any:
        sent = 0
        for chunk in body:
            sent += len(chunk)
            yield chunk
        with lock:
            counts["bytes"] += sent

    run_simple("127.0.0.1", port, counting, threaded=True, request_handler=MotoRequestHandler)


class S3Bench:
    """The counting server in a process of its own; its endpoint and test credentials in ``os.environ`` (which
    the bench's Ray and loader processes inherit)."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, __file__, str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError("moto's S3 server did not start (pip install -e '.[s3]')") from None
                time.sleep(0.1)
        os.environ.update({"AWS_ACCESS_KEY_ID": "benchkey", "AWS_SECRET_ACCESS_KEY": "benchsecret",
                           "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"})

    def counts(self, reset: bool = False) -> dict[str, Any]:
        """The bytes sent and the requests by method since the last reset."""
        req = urllib.request.Request(self.endpoint + COUNTS, method="POST" if reset else "GET")
        with urllib.request.urlopen(req, timeout=10) as r:
            return dict(json.loads(r.read()))

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)  # in memory: nothing of it to keep
        self.proc.wait()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
