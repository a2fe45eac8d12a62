"""``python -m stripe_standin``: serve the Stripe stand-in until SIGINT or SIGTERM.

Prints exactly one line once the socket is listening (with the real port, so
``--port 0`` works for tests), and exits 0 on a signal after a bounded
graceful stop.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from . import DEFAULT_API_KEY_PREFIXES, DEFAULT_PORT, create_app

# Hanging requests are released on shutdown, so in-flight handlers finish fast;
# this only bounds a stuck one.
_SHUTDOWN_TIMEOUT = 5.0


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m stripe_standin",
        description="Strict local stand-in for Stripe's billing portal API (test/dev only).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="port to bind, 0 for any (default %(default)s)",
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="standing delay before every API answer, in ms (default %(default)s)",
    )
    parser.add_argument(
        "--api-key-prefix",
        action="append",
        dest="api_key_prefixes",
        metavar="PREFIX",
        help="accepted API key prefix; repeat for several (default: sk_test_ and rk_test_)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    if args.latency_ms < 0:
        parser.error("--latency-ms must not be negative")
    return args


async def _serve(args: argparse.Namespace) -> None:
    app = create_app(
        api_key_prefixes=args.api_key_prefixes or DEFAULT_API_KEY_PREFIXES,
        latency_ms=args.latency_ms,
    )
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        host, port = runner.addresses[0][:2]
        shown_host = f"[{host}]" if ":" in host else host
        print(f"stripe-standin listening on http://{shown_host}:{port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stand-in; returns the process exit code."""
    args = _parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except OSError as error:
        # Typically the port is taken: one line, no traceback.
        print(f"stripe-standin: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
