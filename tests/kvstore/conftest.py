"""A real ``redis-server`` (Debian package) per test, on 127.0.0.1 at a free port, in a temp dir.

Tests that need it skip only when the binary is missing and ``CI`` is unset; under CI they fail,
because ``.ci/run`` installs it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from sparsex.kvstore import StoreMetrics

_START_TIMEOUT_S = 5.0


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    """A free port <= 55535 whose +10000 is free too (a cluster node's bus port)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port <= 55535 and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for redis-server")


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; ``start``/``kill``/``pause`` act on its PID only."""

    def __init__(self, binary: str, workdir: Path, args: list[str]) -> None:
        self.binary = binary
        self.workdir = workdir
        self.args = args
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not running"
        return self.proc.pid

    def start(self) -> None:
        """Start on ``self.port`` (the same port after a kill) and wait until it answers PING."""
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
               "--save", "", "--appendonly", "no", "--daemonize", "no", *self.args]
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 (lives as long as the process)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not _answers_ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                text = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{text}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL by PID, as a crash would; wait until it is gone."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM by PID (SIGKILL if it lingers)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # in case a test paused it
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the server accepts connections (kernel backlog) but never answers: a slow store."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


@pytest.fixture
def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        if "CI" in os.environ:
            pytest.fail("redis-server is not installed (CI must install it: see .ci/run)")
        pytest.skip("redis-server not installed (apt-get install redis-server)")
    return binary


@pytest.fixture
def redis_factory(redis_binary: str, tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Factory: extra redis-server args -> a started server; every server is stopped at teardown."""
    servers: list[RedisServer] = []

    def make(*args: str) -> RedisServer:
        workdir = tmp_path / f"redis{len(servers)}"
        workdir.mkdir()
        server = RedisServer(redis_binary, workdir, list(args))
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    return redis_factory()


@pytest.fixture
def registry() -> CollectorRegistry:
    """A private metrics registry: each test reads its own counts."""
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> StoreMetrics:
    return StoreMetrics(registry)
