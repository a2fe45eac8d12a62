"""Open-loop load at a fixed rate, in its own process (wrk is closed-loop only).

Request ``i`` is *scheduled* at ``start + i / rate`` and sent then, whatever
happened to the earlier ones; its latency is measured from the scheduled time,
not from when it actually left, so a stalled server (or a late generator)
shows up in the percentiles instead of silently lowering the offered load
(no coordinated omission).

Requests come from the run's request pool (see ``dataset.py``), drawn at
random with a fixed seed. Prints one JSON line prefixed ``BENCH_JSON``.

    python bench/openloop.py URL requests.tsv --rate 200 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stats import percentile


def read_pool(path: Path) -> list[tuple[str, bytes]]:
    pool = []
    for line in path.read_text(encoding="utf-8").splitlines():
        token, _, body = line.partition("\t")
        pool.append((f"Bearer {token}", body.encode()))
    return pool


async def run(args: argparse.Namespace) -> dict[str, object]:
    pool = read_pool(Path(args.requests))
    rng = random.Random(args.seed)
    total = int(args.rate * args.duration)
    url = args.url.rstrip("/") + "/v1/portal-sessions"
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(scheduled: float, auth: str, body: bytes) -> None:
            try:
                async with session.post(
                    url,
                    data=body,
                    headers={
                        "Authorization": auth,
                        "Content-Type": "application/json",
                        "User-Agent": "portal-gateway-bench/1",
                    },
                ) as resp:
                    await resp.read()
                    key = str(resp.status)
                    statuses[key] = statuses.get(key, 0) + 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                name = type(exc).__name__
                errors[name] = errors.get(name, 0) + 1
            latencies.append(time.perf_counter() - scheduled)

        tasks = []
        start = time.perf_counter() + 0.05
        max_lag = 0.0
        for i in range(total):
            scheduled = start + i / args.rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                max_lag = max(max_lag, -delay)
            auth, body = pool[rng.randrange(len(pool))]
            tasks.append(asyncio.create_task(one(scheduled, auth, body)))
        sent_in = time.perf_counter() - start
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    latencies.sort()
    ok = sum(n for status, n in statuses.items() if status.startswith("2"))
    return {
        "requests": total,
        "ok": ok,
        "statuses": statuses,
        "errors": errors,
        "rate_target": args.rate,
        "rate_sent": total / sent_in if sent_in > 0 else 0.0,
        "duration_us": int(elapsed * 1e6),
        "max_send_lag_ms": round(max_lag * 1000, 3),
        "latency_us": {
            "p50": int(percentile(latencies, 50) * 1e6),
            "p95": int(percentile(latencies, 95) * 1e6),
            "p99": int(percentile(latencies, 99) * 1e6),
            "max": int(latencies[-1] * 1e6) if latencies else 0,
            "mean": sum(latencies) / len(latencies) * 1e6 if latencies else 0.0,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("url")
    parser.add_argument("requests", help="the request pool (TSV)")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of sending")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    result = asyncio.run(run(parser.parse_args()))
    print("BENCH_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
