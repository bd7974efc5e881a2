"""A redis-server of the tests' own: started on 127.0.0.1 at a free port, stopped by PID.

When ``redis-server`` is not installed the Redis tests are skipped, except under CI
(``CI`` set), where a missing server is a failure: CI installs it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

READY_WITHIN = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_or_skip() -> str:
    path = shutil.which("redis-server")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (CI installs it: see .ci/run)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return path


class RedisServer:
    """One redis-server process; ``url`` reaches it."""

    def __init__(
        self,
        directory: Path,
        *extra: str,
        password: str | None = None,
        tls_ca: Path | None = None,
    ) -> None:
        self.directory = directory
        self.extra = list(extra)
        self.password = password
        self.tls_ca = tls_ca  # (given: the server listens with TLS only, at ``port``)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = redis_server_or_skip()
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--daemonize",
            "no",
            *self.extra,
        ]
        if self.password:
            args += ["--requirepass", self.password]
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 (closed in stop)
        self._log = log
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_WITHIN
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.process.returncode}: "
                    f"{(self.directory / 'redis.log').read_text()[-2000:]}"
                )
            try:
                with contextlib.ExitStack() as closing:
                    s = closing.enter_context(
                        socket.create_connection(("127.0.0.1", self.port), timeout=1)
                    )
                    if self.tls_ca is not None:
                        context = ssl.create_default_context(cafile=str(self.tls_ca))
                        s = closing.enter_context(
                            context.wrap_socket(s, server_hostname="127.0.0.1")
                        )
                    if self.password:
                        s.sendall(f"AUTH {self.password}\r\n".encode())
                        s.recv(64)
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer within {READY_WITHIN} s")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, sig)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
        self._log.close()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)
