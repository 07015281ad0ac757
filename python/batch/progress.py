"""Progress of a batch job: a tqdm bar with images/s and ETA on a terminal, plain log lines otherwise.

    batch: 12000/50000 images (24.0%), 3 errors, 850.3 images/s, ETA 0:00:44

The rate counts this run's images only (the ones a resumed job skipped are in the total and the
percentage, not in the rate), so the ETA is the time this run still needs.
"""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("batch")


def format_eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """``update(n, errors)`` after each batch; ``close()`` prints the summary line."""

    def __init__(self, total: int, done_before: int, enabled: bool = True, interval_s: float = 10.0,
                 clock=time.monotonic, tty: bool | None = None):
        self.total, self.done = total, done_before
        self.new = self.errors = 0
        self.clock, self.interval = clock, interval_s
        self.start = self.last_line = clock()
        self.enabled = enabled
        self.bar = None
        if enabled and (sys.stderr.isatty() if tty is None else tty):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done_before, desc="batch", unit="img", dynamic_ncols=True)

    def rate(self) -> float:
        elapsed = self.clock() - self.start
        return self.new / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate()
        eta = format_eta((self.total - self.done) / rate) if rate > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"batch: {self.done}/{self.total} images ({pct:.1f}%), {self.errors} errors, {rate:.1f} images/s, "
                f"ETA {eta}")

    def update(self, n: int, errors: int = 0) -> None:
        self.done += n
        self.new += n
        self.errors += errors
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(errors=self.errors, refresh=False)
        elif self.enabled and self.clock() - self.last_line >= self.interval:
            self.last_line = self.clock()
            log.info(self.line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            log.info("batch: %d/%d images, %d errors, %d classified by this run in %.1f s (%.1f images/s)",
                     self.done, self.total, self.errors, self.new, self.clock() - self.start, self.rate())
