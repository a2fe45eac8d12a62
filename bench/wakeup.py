"""What waking a process costs this machine: a loopback echo, back to back and paced.

Two plain Python processes (no service, no Postgres) exchange 100 bytes over
loopback TCP: the caller sends, the other echoes, the caller reads. Back to back,
both stay warm; paced 5 ms apart, as requests arrive in the open loop, each side
sleeps between exchanges and is woken for each. The on-CPU time of each side per
exchange (``/proc/PID/schedstat``) is what one wake-up costs here, whoever's code
runs: the open-loop phases pay it for every message between processes (the
service has two more per request than the floor, its two Postgres statements),
and on a VM it is several times the work itself. Medians of 3 alternations.
Prints one JSON line prefixed ``BENCH_JSON``.

    python bench/wakeup.py
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procstat

MESSAGE = b"x" * 100
PACE_S = 0.005


def echo(server: socket.socket) -> None:
    """The child: echo everything until the caller closes."""
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(4096):
        conn.sendall(data)


def exchanges(sock: socket.socket, count: int, pause: float) -> None:
    for _ in range(count):
        sock.sendall(MESSAGE)
        received = 0
        while received < len(MESSAGE):
            received += len(sock.recv(4096))
        if pause:
            time.sleep(pause)


def on_cpu_us_per_exchange(
    sock: socket.socket, child: int, count: int, pause: float
) -> tuple[float, float]:
    """(caller, echo) on-CPU µs per exchange."""
    me = os.getpid()
    a0, b0 = procstat.oncpu_ns(me), procstat.oncpu_ns(child)
    exchanges(sock, count, pause)
    a1, b1 = procstat.oncpu_ns(me), procstat.oncpu_ns(child)
    if a0 is None or a1 is None or b0 is None or b1 is None:
        raise RuntimeError("/proc/PID/schedstat is unreadable")
    return (a1 - a0) / count / 1000, (b1 - b0) / count / 1000


def measure(rounds: int = 3) -> dict[str, dict[str, float]]:
    server = socket.create_server(("127.0.0.1", 0))
    address = server.getsockname()
    child = os.fork()
    if child == 0:
        try:
            echo(server)
        finally:
            os._exit(0)
    server.close()
    samples: dict[str, list[tuple[float, float]]] = {"back_to_back": [], "paced_5ms": []}
    with socket.create_connection(address) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        exchanges(sock, 200, 0)  # warm up
        for _ in range(rounds):
            samples["back_to_back"].append(on_cpu_us_per_exchange(sock, child, 2000, 0))
            samples["paced_5ms"].append(on_cpu_us_per_exchange(sock, child, 200, PACE_S))
    os.waitpid(child, 0)
    return {
        name: {
            "caller_us": round(statistics.median(c for c, _ in values), 1),
            "echo_us": round(statistics.median(e for _, e in values), 1),
        }
        for name, values in samples.items()
    }


if __name__ == "__main__":
    print("BENCH_JSON " + json.dumps(measure()), flush=True)
