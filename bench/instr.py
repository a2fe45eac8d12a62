"""``make bench-instr``: instructions per request, service vs floor, under callgrind.

Seconds are noisy on a shared 2-core machine; instruction counts repeat. Each
target (the service as ``python -m service serve``, the floor) runs under
``valgrind --tool=callgrind --instr-atstart=no``: start-up runs uninstrumented
(and so only ~5x slower). After a warm-up, ``instrumentation on`` starts
counting; then two batches of the same N requests each, at low concurrency,
each closed by a dump (which also zeroes the counters), both sent through
``vgdb`` (what ``callgrind_control`` uses).
Instructions per request = a batch's total ÷ N; the two batches agreeing is
the check that start-up and warm-up effects are out.

Callgrind counts user-space instructions only: the kernel's share of a
``send()``/``recv()`` (large on this VM, see the py-spy profile) is not in
these numbers, so they understate what a round trip costs.

Writes ``bench/results/instr.json`` and ``bench/results/callgrind-<target>.txt``
(callgrind_annotate's top functions).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

import dataset
import harness
from harness import RESULTS, ROUTE, WORK, log


async def send_batch(url: str, pool: list[tuple[str, bytes]], concurrency: int) -> int:
    """Send every request of ``pool`` with at most ``concurrency`` in flight; count 201s."""
    ok = 0
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    for item in pool:
        queue.put_nowait(item)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def worker() -> None:
            nonlocal ok
            while not queue.empty():
                token, body = queue.get_nowait()
                async with session.post(
                    url + ROUTE,
                    data=body,
                    headers={
                        **harness.request_headers(token),
                        "User-Agent": "portal-gateway-bench/1",
                    },
                ) as resp:
                    await resp.read()
                    if resp.status == 201:
                        ok += 1
                    else:
                        log(f"{resp.status} from {url}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok


def vgdb(pid: int, env: dict[str, str] | None, *command: str) -> str:
    """A callgrind monitor command through vgdb (what callgrind_control wraps).

    Valgrind names its FIFOs after the USER/LOGNAME and HOST of the process's
    environment, and the service's HOST is its listen address: vgdb gets the
    same environment so that it finds them.
    """
    out = subprocess.run(
        ["vgdb", f"--pid={pid}", *command],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"vgdb {' '.join(command)}: {out.stdout} {out.stderr}")
    return out.stdout


def totals(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


async def measure(
    name: str,
    cmd: list[str],
    env: dict[str, str] | None,
    ready_path: str,
    port: int,
    pool: list[tuple[str, bytes]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    out_prefix = WORK / f"callgrind.{name}"
    for old in WORK.glob(f"callgrind.{name}*"):
        old.unlink()
    valgrind = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out_prefix}.%p",
    ]
    proc = harness.start(f"{name}-callgrind", valgrind + cmd, env)
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.perf_counter()
        await harness.wait_http(proc, url + ready_path, 300)
        log(f"{name}: up under valgrind in {time.perf_counter() - started:.0f} s; warming up")
        warm = await send_batch(url, pool[: args.warmup], args.concurrency)
        vgdb(proc.pid, env, "instrumentation", "on")
        state = vgdb(proc.pid, env, "instrumentation")
        if "instrumentation: on" not in state:
            raise RuntimeError(f"{name}: callgrind did not switch instrumentation on: {state}")
        batches = []
        for i in range(2):
            started = time.perf_counter()
            ok = await send_batch(url, pool[: args.requests], args.concurrency)
            vgdb(proc.pid, env, "dump")
            dump = Path(f"{out_prefix}.{proc.pid}.{i + 1}")
            for _ in range(50):
                if dump.exists() and "totals:" in dump.read_text():
                    break
                await asyncio.sleep(0.2)
            instructions = totals(dump)
            batches.append(
                {
                    "requests": args.requests,
                    "ok": ok,
                    "instructions": instructions,
                    "per_request": instructions / args.requests,
                    "seconds": time.perf_counter() - started,
                }
            )
            log(
                f"{name}: batch {i + 1}: {instructions / args.requests:,.0f} instructions/request"
                f" ({ok}/{args.requests} ok, {time.perf_counter() - started:.0f} s)"
            )
        annotate = shutil.which("callgrind_annotate")
        if annotate:
            text = subprocess.run(
                [annotate, "--inclusive=no", str(dump)],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            # CPython's build folder makes every line unreadable: shorten it.
            text = re.sub(r"\S*/python-build[^ ]*?/Python-[0-9.]+/(\./)?", "cpython:", text)
            (RESULTS / f"callgrind-{name}.txt").write_text("\n".join(text.splitlines()[:80]) + "\n")
    finally:
        proc.stop(grace=60)
    return {"warmup_ok": warm, "batches": batches}


async def main_async(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    data = await harness.prepare_data(
        database=args.database, users=args.users, jwts=1000, pool_size=2000, seed=args.seed
    )
    pool = dataset.read_requests(data.requests_path)
    standin_port = harness.free_port()
    standin = harness.start("standin-instr", harness.standin_cmd(standin_port, 0))
    results: dict[str, Any] = {}
    try:
        await harness.wait_http(standin, f"http://127.0.0.1:{standin_port}/_standin/health", 30)
        service_port, floor_port = harness.free_port(), harness.free_port()
        env = harness.service_env(data, service_port, standin_port)
        results["service"] = await measure(
            "service",
            [harness.PYTHON, "-m", "service", "serve"],
            env,
            "/readyz",
            service_port,
            pool,
            args,
        )
        results["floor"] = await measure(
            "floor",
            harness.floor_cmd(floor_port, standin_port),
            None,
            "/healthz",
            floor_port,
            pool,
            args,
        )
    finally:
        standin.stop()
    failed = any(b["ok"] != b["requests"] for r in results.values() for b in r["batches"])
    service = results["service"]["batches"][-1]["per_request"]
    floor = results["floor"]["batches"][-1]["per_request"]
    summary = {
        "commit": harness.git_commit(),
        "users": args.users,
        "requests_per_batch": args.requests,
        "concurrency": args.concurrency,
        "upstream_latency_ms": 0,
        "service_instructions_per_request": service,
        "floor_instructions_per_request": floor,
        "ratio": service / floor,
        "wall_seconds": time.perf_counter() - started,
        "targets": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "instr.json").write_text(json.dumps(summary, indent=2))
    print()
    print(
        f"instructions per request (callgrind, user space, {args.requests} requests per batch,"
        f" concurrency {args.concurrency}, upstream 0 ms):"
    )
    for name in ("service", "floor"):
        per = [b["per_request"] for b in results[name]["batches"]]
        print(f"  {name:<8} {per[-1]:>14,.0f}   (batches: {', '.join(f'{p:,.0f}' for p in per)})")
    print(f"  ratio    {service / floor:>14.2f}×")
    print(f"whole run: {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=300, help="requests per batch")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--database", default=harness.DEFAULT_DATABASE + "_instr")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
