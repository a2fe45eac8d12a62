"""Print a results file of ``run.py`` as the Markdown table of README's "Performance".

.venv/bin/python bench/report.py bench/results/latest.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

ROWS = (
    ("requests/s", "requests_per_s", 0),
    ("p50 / p95 / p99 (ms)", None, 1),
    ("service CPU µs/request", "cpu_us_per_request", 0),
    ("Postgres CPU µs/request", "pg_cpu_us_per_request", 0),
    ("peak RSS MB", "peak_rss_mb", 0),
)


def _n(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"{meta['users']:,} users, medians of {meta['reps']} repetitions,"
        f" {meta['duration_s']:g} s closed-loop / {meta['open_duration_s']:g} s open-loop phases,"
        f" run {meta['date']} (commit {meta.get('commit')}). Ratio: median of service / floor"
        " over the back-to-back pairs.",
        "",
        "| scenario | | service | floor | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for s in result["scenarios"]:
        svc, flo, rat = s["service"], s["floor"], s["ratios"]
        title = f"{s['latency_ms']:g} ms upstream, " + (
            f"c={s['level']:g}" if s["mode"] == "closed" else f"{s['level']:g} req/s open loop"
        )
        for i, (label, key, digits) in enumerate(ROWS):
            name = f"**{title}**" if i == 0 else ""
            if key is None:
                row = [
                    "/".join(_n(d.get(k), digits) for k in ("p50_ms", "p95_ms", "p99_ms"))
                    for d in (svc, flo)
                ]
                r = f"{_n(rat.get('p99_ms'), 2)}× (p99)"
            else:
                row = [_n(svc.get(key), digits), _n(flo.get(key), digits)]
                r = f"{_n(rat.get(key), 2)}×" if key in rat else ""
            lines.append(f"| {name} | {label} | {row[0]} | {row[1]} | {r} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("results", type=Path)
    args = parser.parse_args()
    print(markdown(json.loads(args.results.read_text())), end="")


if __name__ == "__main__":
    main()
