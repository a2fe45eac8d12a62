"""A throwaway ``redis-server`` for the tests of SPEC §14: started on a free port,
nothing kept on disk, stopped (and paused, and started again) by its own pid.

A server of the test's own, not the machine's: the tests stop it mid-run and
pause it to play a Redis that hangs, and nothing else may see that.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

# Starting takes a few ms; a busy machine gets this long before the test fails.
START_WITHIN_SECONDS = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError(
            "redis-server is not installed: the tests of SPEC §14 start their own "
            "(Debian: apt-get install redis-server)"
        )
    return found


@dataclass
class RedisServer:
    """One redis-server process on 127.0.0.1:``port``; ``folder`` holds its log."""

    folder: Path
    port: int = field(default_factory=_free_port)
    process: subprocess.Popen[bytes] | None = None
    # With a password (AUTH) and a Unix socket as well as the port, when set.
    password: str | None = None
    unix_socket: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, db: int = 0) -> redis.Redis:
        """A plain client for the test's own checks (keys, TTLs)."""
        return redis.Redis(
            port=self.port,
            db=db,
            password=self.password,
            socket_timeout=2,
            socket_connect_timeout=2,
        )

    def start(self) -> None:
        """Start (or start again, on the same port) and wait until it answers PING."""
        assert self.process is None or self.process.poll() is not None, "already running"
        log = (self.folder / f"redis-{self.port}.log").open("ab")
        self.process = subprocess.Popen(
            [
                redis_server_binary(),
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.folder)),
                *(("--requirepass", self.password) if self.password else ()),
                *(("--unixsocket", str(self.unix_socket)) if self.unix_socket else ()),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + START_WITHIN_SECONDS
        with self.client() as client:
            while True:
                assert self.process.poll() is None, self.log()
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                assert time.monotonic() < deadline, f"redis-server did not start\n{self.log()}"
                time.sleep(0.01)

    def stop(self) -> None:
        """Stop it (this process only) and wait for it to be gone."""
        if self.process is None or self.process.poll() is not None:
            return
        self.resume()
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def pause(self) -> None:
        """Freeze it: connections are accepted by the kernel, nothing is answered."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def log(self) -> str:
        path = self.folder / f"redis-{self.port}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""
