"""The py-spy diagnostic: a profile of the service and of the floor, each in a c=50 phase.

py-spy counts a sample wherever the thread is not sleeping, so time spent
*runnable but preempted* (on 2 cores, a send() that wakes Postgres often hands
the CPU to it) would show up as CPU in whatever was on the stack
(transport.write). So for these phases the target gets CPU 0 alone and
everything else of ours (Postgres backends, stand-in, load generator, py-spy)
CPU 1; the report compares the samples with the CPU time /proc counted.

``results/profile.txt``: the service's profile, then service minus floor by
layer (where the extra CPU per request goes); ``results/profile-floor.txt``:
the floor's. Not measured phases: the profiler runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import procstat
import profile_report
from harness import RESULTS, log
from measure import Scenario, phase
from stack import Stack


@dataclass(frozen=True)
class Taken:
    """One target's profile and the figures of the phase it was taken in."""

    profile: profile_report.Profile
    scenario: str
    figures: dict[str, Any]
    expected_samples: float  # from the CPU time /proc counted
    header: str

    @property
    def cpu(self) -> float:
        value: float = self.figures["cpu_us_per_request"]
        return value

    def layers(self) -> dict[str, float]:
        n = max(self.profile.samples, 1)
        return {k: self.profile.layers.get(k, 0) / n for k, _, _ in profile_report.LAYERS}


async def profile(stack: Stack, args: argparse.Namespace) -> dict[str, Any] | None:
    """Profile both targets, write the reports; a summary for the results file."""
    if not args.py_spy or not Path(args.py_spy).exists():
        log("py-spy not found: no profile")
        return None
    svc = await profile_target(stack, args, "service")
    flo = await profile_target(stack, args, "floor") if svc else None
    if svc is None or flo is None:
        return None
    (RESULTS / "profile-floor.txt").write_text(
        flo.header + profile_report.report(flo.profile, cpu_us_per_request=flo.cpu)
    )
    diff = profile_report.layer_diff(svc.profile, svc.cpu, flo.profile, flo.cpu)
    (RESULTS / "profile.txt").write_text(
        svc.header + profile_report.report(svc.profile, cpu_us_per_request=svc.cpu) + "\n" + diff
    )
    prof, n = svc.profile, max(svc.profile.samples, 1)
    return {
        "scenario": svc.scenario,
        "samples": prof.samples,
        "samples_expected_from_cpu": svc.expected_samples,
        "cpu_us_per_request": svc.cpu,
        "floor_cpu_us_per_request": flo.cpu,
        "requests_per_s": svc.figures["requests_per_s"],
        "top_own": [[k, v / n] for k, v in prof.own.most_common(15)],
        "top_cumulative": [[k, v / n] for k, v in prof.cumulative.most_common(15)],
        "layers": svc.layers(),
        "floor_layers": flo.layers(),
        "steps": {k: prof.steps.get(k, 0) / n for k, _, _ in profile_report.STEPS},
    }


def _pin(pids: Iterable[int], cpus: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, cpus)


def pyspy_cmd(args: argparse.Namespace, pid: int, seconds: float, raw: Path) -> list[str]:
    cmd = [
        *(args.py_spy, "record", "--pid", str(pid), "--rate", str(args.profile_rate)),
        *("--duration", f"{seconds:g}", "--format", "raw"),
        "--nolineno",  # aggregate by function
        # Blocking (the default): py-spy pauses the process for each sample,
        # so stacks are whole; without it half of them came out truncated.
        *("--output", str(raw)),
    ]
    return [*cmd, "--native"] if args.profile_native else cmd


async def profile_target(stack: Stack, args: argparse.Namespace, name: str) -> Taken | None:
    """py-spy on one target during a c=50 phase (pinned unless ``--no-profile-pin``)."""
    target, seconds = stack.targets[name], args.profile_duration
    raw = RESULTS / ("profile.collapsed" if name == "service" else f"profile-{name}.collapsed")
    pinned = (os.cpu_count() or 1) >= 2 and args.profile_pin
    others = [stack.standin.pid, *await stack.backend_pids()] if pinned else []
    if pinned:
        _pin([target.proc.pid], {0})
        _pin(others, {1})
    scenario = Scenario(args.profile_latency, "closed", 50)
    try:
        spy = await asyncio.create_subprocess_exec(
            *pyspy_cmd(args, target.proc.pid, seconds, raw),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if pinned:
            _pin([spy.pid], {1})
        await asyncio.sleep(0.5)
        cpu0 = procstat.cpu_us(target.proc.pid) or 0.0
        figures = await phase(
            stack,
            target,
            scenario,
            seconds - 1.0,
            args.wrk,
            measure=False,
            load_cpus={1} if pinned else None,
        )
        cpu1 = procstat.cpu_us(target.proc.pid) or 0.0
        _, err = await spy.communicate()
    finally:
        if pinned:
            _pin([target.proc.pid, *others], set(range(os.cpu_count() or 1)))
    if spy.returncode != 0 or not raw.exists():
        log(f"py-spy failed on the {name}: {err.decode()[-500:]}")
        return None
    with raw.open() as lines:
        prof = profile_report.parse(lines)
    expected = (cpu1 - cpu0) / 1e6 * args.profile_rate
    native = "native + " if args.profile_native else ""
    header = (
        f"py-spy profile of the {name}: {scenario.title}, {seconds:g} s at"
        f" {args.profile_rate} Hz, {native}Python frames; {figures['answered']:.0f} requests at"
        f" {figures['requests_per_s']:.0f} req/s"
        f"{f'; {name} pinned to CPU 0, the rest of the stack to CPU 1' if pinned else ''}.\n"
        f"Samples {prof.samples} vs {expected:.0f} expected from the CPU time /proc counted"
        " (more samples = time runnable but not running, counted as CPU: other\n"
        f"processes on the machine took CPU 0 at times; other load"
        f" {figures['other_cpu_cores']:.2f} cores).\n"
        "Not a measured phase (the profiler runs); µs/request below are the shares"
        " times this phase's CPU per request.\n\n"
    )
    return Taken(prof, scenario.key, figures, expected, header)
