"""Real servers the tests start for themselves: ``prefect server start`` and
moto's S3 server (``moto.server.ThreadedMotoServer`` on 127.0.0.1)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from tests.faults.harness import free_port, tail


class PrefectServer:
    """``prefect server start`` in its own process group, on a free port, with its own home."""

    def __init__(self, home: Path):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DENOISE_"))}
        env.update(
            PREFECT_HOME=str(home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_API_URL=self.url,
            PREFECT_API_URL=self.url,
        )
        self.log = open(home / "server.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:  # noqa: S310 - local
                return r.status == 200
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"prefect server exited {self.proc.returncode}: "
                    f"{tail((self.home / 'server.log').read_text(errors='replace'))}"
                )
            if self.healthy():
                return self.url
            time.sleep(0.5)
        raise RuntimeError(f"prefect server on port {self.port} not healthy after {timeout:.0f} s")

    def kill(self) -> None:
        """SIGKILL to the server's whole process group, as a crash or an OOM kill would."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        self.kill()
        self.log.close()


def _atomic_writes(app):
    """The WSGI app with writes (PUT, POST, DELETE) one at a time. moto checks
    a conditional PUT's If-Match and stores the object without a lock, so
    racing writers can both win: 8 threads x 50 If-Match increments of one
    object ended at 399 after 400 successful PUTs (measured, moto 5.2.1). S3
    itself makes the check and the write one step; so does this."""
    lock = threading.Lock()

    def wrapped(environ, start_response):
        if environ.get("REQUEST_METHOD") in ("PUT", "POST", "DELETE"):
            with lock:
                return list(app(environ, start_response))
        return app(environ, start_response)

    return wrapped


class S3Server:
    """moto's S3 API on a free loopback port (in-process ``mock_aws`` breaks
    s3fs), with S3's atomic conditional writes; :meth:`reset` empties it
    between tests."""

    def __init__(self):
        from moto.moto_server.threaded_moto_server import ThreadedMotoServer
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        class AtomicMotoServer(ThreadedMotoServer):
            def _server_entry(self) -> None:
                app = _atomic_writes(DomainDispatcherApplication(create_backend_app))
                self._server = make_server(self._ip_address, self._port, app, True)
                self._server_ready_event.set()
                self._server.serve_forever()

        # one access-log line per request otherwise
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.server = AtomicMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def env(self) -> dict[str, str]:
        """What a client needs, from the usual places: fake credentials, the endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10):  # noqa: S310 - loopback
            pass

    def stop(self) -> None:
        self.server.stop()
