"""
A real C{redis-server} (Debian's C{redis-server} package; C{.ci/run} installs it) for the tests:
started on a free 127.0.0.1 port with no persistence, stopped by its pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Any

import hiredis

from tests.support import freePort

REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
)


def skipReason() -> str | None:
    """
    Why the Redis tests cannot run here, or C{None}. Under CI (C{CI} set) a missing server is
    not a reason: C{.ci/run} must have installed it, so the tests run and fail loudly.
    """
    if REDIS_SERVER is None and not os.environ.get("CI"):
        return "redis-server is not installed (Debian: apt-get install redis-server)"
    return None


class RedisServer:
    """
    One C{redis-server} process.

    @ivar port: its TCP port on 127.0.0.1 (kept across L{stop} and L{start}).
    """

    def __init__(self, directory: str, port: int | None = None, *args: str) -> None:
        self.directory = directory
        self.port = port or freePort()
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert REDIS_SERVER is not None, "redis-server is not installed"
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self.directory,
                "--loglevel", "warning",
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.command("PING") == b"PONG":
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL), by pid."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGCONT)  # in case it was paused
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections but answers nothing."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def command(self, *args: str | bytes) -> Any:
        """One command on a fresh connection (blocking; for checks from the test)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(hiredis.pack_command(args))  # type: ignore[arg-type]
            reader = hiredis.Reader()
            while True:
                data = s.recv(65536)
                if not data:
                    raise OSError("connection closed")
                reader.feed(data)
                reply = reader.gets()
                if reply is not False:
                    return reply
