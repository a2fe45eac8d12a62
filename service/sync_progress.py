"""How ``sync --from-stripe`` shows its progress on stderr, and its closing summary.

On a terminal, one line redrawn in place: a bar of the current page's phase
(linking its customers, then backfilling the users linked) and the counts so
far. Elsewhere (a log file, CI) one line per page, so the output stays
readable. Stripe does not say how many customers there are, so the bar is the
page's, not the run's.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from typing import TextIO

from service.stripe_sync import Tally

BAR_WIDTH = 20
# Redraws a second at most: a terminal can't show faster, and writes cost.
_REDRAWS_PER_SECOND = 10


def counts(tally: Tally) -> str:
    """The running counts, as both renderers show them."""
    verb = "would link" if tally.dry_run else "linked"
    return (
        f"{tally.customers} customers · {verb} {tally.linked} · unchanged {tally.unchanged}"
        f" · conflicts {tally.conflicts} · skipped {tally.skipped}"
        f" · {tally.stripe_calls} Stripe calls"
    )


class TerminalBar:
    """A bar of the current page and the counts, redrawn in place."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._last_draw = 0.0
        self._drawn = False

    def step(self, tally: Tally, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last_draw < 1 / _REDRAWS_PER_SECOND:
            return
        self._last_draw = now
        filled = BAR_WIDTH * done // max(total, 1)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        line = f"sync page {tally.pages} {phase:<11} [{bar}] {done}/{total} · {counts(tally)}"
        # \r back to the start, \x1b[K clears what a longer line left behind; a
        # line wider than the terminal would wrap, and \r would not undo that.
        self._stream.write(f"\r{line[: self._width() - 1]}\x1b[K")
        self._stream.flush()
        self._drawn = True

    def _width(self) -> int:
        try:
            return os.get_terminal_size(self._stream.fileno()).columns
        except (OSError, ValueError, io.UnsupportedOperation):
            return shutil.get_terminal_size().columns

    def page_done(self, tally: Tally) -> None:
        return  # the page's last step already shows it

    def finished(self, tally: Tally) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()


class PageLines:
    """One line per page, for logs and pipes."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def step(self, tally: Tally, phase: str, done: int, total: int) -> None:
        return

    def page_done(self, tally: Tally) -> None:
        print(f"sync: page {tally.pages}: {counts(tally)}", file=self._stream, flush=True)

    def finished(self, tally: Tally) -> None:
        return


def progress_for(stream: TextIO) -> TerminalBar | PageLines:
    """A bar on a terminal, a line per page otherwise."""
    return TerminalBar(stream) if stream.isatty() else PageLines(stream)


def summary(tally: Tally) -> str:
    """The closing line: what was (or, dry, would be) done, and what it cost upstream."""
    head = "sync --dry-run (nothing written)" if tally.dry_run else "sync"
    verb = "would link" if tally.dry_run else "linked"
    relinked = f" ({tally.relinked} re-pointed)" if tally.relinked else ""
    skipped = (
        f"{tally.skipped} skipped ({tally.skipped_no_key} no key, {tally.skipped_deleted} deleted,"
        f" {tally.skipped_invalid_user_id} invalid user id)"
    )
    # Rare outcomes, shown when they happened.
    rare = ""
    if tally.unlinked:
        rare += f", {tally.unlinked} unlinked (their customer names another user now)"
    if tally.superseded:
        rare += f", {tally.superseded} superseded (a newer webhook decided)"
    backfills = ""
    if not tally.dry_run:
        backfills = f"; {tally.backfilled} backfilled"
        if tally.backfill_failures:
            backfills += f", {len(tally.backfill_failures)} backfills failed"
    resumed = ""
    if tally.resumed:
        resumed = f", resumed after {tally.resumed_after or 'nothing done (first page again)'}"
    return (
        f"{head}: {tally.customers} customers in {tally.pages} pages{resumed}:"
        f" {verb} {tally.linked}{relinked}, {tally.unchanged} unchanged,"
        f" {tally.conflicts} conflicts, {skipped}{rare}{backfills};"
        f" {tally.stripe_calls} Stripe calls in {tally.seconds:.1f} s"
        f" (cap {tally.rate_cap:g}/s)"
    )
