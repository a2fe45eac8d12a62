"""`make mutation`: mutmut over the security-critical modules, one module at a time.

Each module's mutants run against the tests that cover them (mutmut maps each
function to the tests that call it, within the selection in pyproject.toml
[tool.mutmut]). Then a score per module, killed / total, and exit 1 if any is
under 90 %. Survivors are listed so they can be killed or argued equivalent.

    python scripts/mutation.py [--jobs N] [MODULE ...]    # MODULE e.g. ratelimit
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT = Path(sys.executable).with_name("mutmut")
THRESHOLD = 0.90
# Module -> the mutant names (mutmut's globs) it is scored on. Of webhooks.py only
# the signature check and the event parser: the rest is database work.
MODULES = {
    "return_urls": ["service.return_urls.*"],
    "auth": ["service.auth.*"],
    "ratelimit": ["service.ratelimit.*"],
    "webhooks": [
        "service.webhooks.x_verify_signature__mutmut_*",
        "service.webhooks.x_parse_event__mutmut_*",
        "service.webhooks.x__invalid__mutmut_*",
    ],
    "stripe/retry": ["service.stripe.retry.*"],
}
# A mutant the tests noticed: they failed, hung, or it did not even type-check.
DETECTED = {"killed", "timeout", "caught by type check"}


def results() -> dict[str, str]:
    """Every mutant's status, by name, from mutmut's own report."""
    out = subprocess.run(  # noqa: S603 - the venv's own mutmut, fixed arguments
        [MUTMUT, "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    pairs = (line.strip().rpartition(": ") for line in out.splitlines() if ": " in line)
    return {name: status for name, _, status in pairs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=", ".join(MODULES))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    modules = args.modules or list(MODULES)
    if unknown := set(modules) - set(MODULES):
        parser.error(f"unknown module(s) {sorted(unknown)}; known: {', '.join(MODULES)}")

    # A fresh copy: the verdict is on today's code and tests, not on a cache.
    shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    scores: dict[str, tuple[int, int, list[str]]] = {}
    started = time.monotonic()
    for module in modules:
        globs = MODULES[module]
        print(f"--- {module}", flush=True)
        log = ROOT / "mutants" / f"{module.replace('/', '.')}.log"
        run = subprocess.run(  # noqa: S603 - the venv's own mutmut, globs from MODULES
            [MUTMUT, "run", "--max-children", str(args.jobs), *globs],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        log.parent.mkdir(exist_ok=True)
        log.write_text(run.stdout + run.stderr)
        if run.returncode != 0:
            print(run.stdout[-3000:] + run.stderr[-3000:], file=sys.stderr)
            print(f"mutmut failed on {module} (exit {run.returncode}); see {log}", file=sys.stderr)
            return 2
        mine = {
            name: status
            for name, status in results().items()
            if any(fnmatch.fnmatchcase(name, glob) for glob in globs)
        }
        killed = sum(status in DETECTED for status in mine.values())
        survivors = sorted(f"{n}: {s}" for n, s in mine.items() if s not in DETECTED)
        scores[module] = (killed, len(mine), survivors)

    print(f"\nmutation score per module (threshold {THRESHOLD:.0%}):")
    failed = False
    for module, (killed, total, survivors) in scores.items():
        score = killed / total if total else 0.0
        failed |= score < THRESHOLD
        verdict = "ok" if score >= THRESHOLD else "UNDER THRESHOLD"
        print(f"  {module:<14} {killed:>4} / {total:<4} {score:7.1%}  {verdict}")
        for survivor in survivors:
            print(f"      {survivor}")
    print(f"({time.monotonic() - started:.0f} s; `.venv/bin/mutmut show NAME` shows a mutant)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
