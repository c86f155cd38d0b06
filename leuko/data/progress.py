"""Progress of a long loop: a tqdm bar on a terminal, a few plain lines anywhere else.

A bar redraws itself with carriage returns, which a log file (`make data > log`, a SLURM job's output)
keeps as one line of thousands of characters. When the stream is not a terminal, progress is told in
plain lines instead: one per tenth of the work, one at least every INTERVAL seconds while it goes on,
and one at the end.

    for cell in progress(cells, total=len(cells), desc="prepare", unit="cell", enabled=not quiet):
        ...
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO

from tqdm import tqdm

STEPS = 10  # plain lines at each tenth of the work
INTERVAL = 60.0  # seconds: a slow tenth still shows signs of life in a log this often


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str,
    unit: str | None = None,
    enabled: bool = True,
    file: TextIO | None = None,
) -> Progress:
    """Wrap iterable (or count with .update(n)); output goes to file (default: sys.stderr at call time)."""
    return Progress(iterable, total=total, desc=desc, unit=unit, enabled=enabled, file=file)


class Progress:
    """Iterate over it, or use it as a context manager and call update(n); write(text) prints a line between."""

    def __init__(self, iterable, *, total, desc, unit, enabled, file) -> None:
        self.iterable = iterable
        self.total = total if total is not None or iterable is None else _len(iterable)
        self.desc, self.unit, self.enabled = desc, unit, enabled
        self.file = file if file is not None else sys.stderr
        self.n = 0
        self._bar = None
        if enabled and is_terminal(self.file):
            self._bar = tqdm(iterable, total=self.total, desc=desc, unit=unit or "it", file=self.file)
        self._start = self._last = time.monotonic()
        self._next_step = 1  # the tenth whose crossing prints the next plain line
        self._closed = False

    def __iter__(self) -> Iterator:
        if self._bar is not None:
            yield from self._bar  # the bar counts and closes itself
            return
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)
            return
        self.n += n
        if not self.enabled:
            return
        now = time.monotonic()
        crossed = False
        if self.total and self.n < self.total:  # the line at the end says 100%
            while self._next_step < STEPS and self.n * STEPS >= self._next_step * self.total:
                self._next_step += 1
                crossed = True
        if crossed or now - self._last >= INTERVAL:
            self._line(f"after {now - self._start:.0f} s")

    def write(self, text: str) -> None:
        """A line of its own (e.g. why an item was skipped), also when progress is disabled."""
        if self._bar is not None:
            self._bar.write(text, file=self.file)
        else:
            print(text, file=self.file, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            self._line(f"in {time.monotonic() - self._start:.1f} s")

    def _line(self, when: str) -> None:
        self._last = time.monotonic()
        count = f"{self.n}" if not self.total else f"{self.n}/{self.total}"
        if self.unit:
            count += f" {self.unit}" + ("" if (self.total or self.n) == 1 else "s")
        share = f" ({100 * self.n // self.total}%)" if self.total else ""
        print(f"{self.desc}: {count}{share} {when}", file=self.file, flush=True)


def _len(iterable) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None


def is_terminal(file) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
