"""A write that keeps failing (a full disk) is one warning and a count, never a line per attempt."""

from __future__ import annotations

import logging


class FailureNote:
    """`failed()` warns the first time, then counts; `ok()` after failures says how many there were.

    For writes the daemon retries on its own (status.json, children.json, a model's output log):
    the disk filling must not become a flood of log lines, nor stop the daemon."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log = log
        self.what = what  # e.g. "cannot write /state/status.json"
        self.count = 0

    def failed(self, err: BaseException | str) -> None:
        self.count += 1
        if self.count == 1:
            why = err.strerror if isinstance(err, OSError) and err.strerror else err
            self.log.warning("%s: %s (counting further failures; one line when it works again)", self.what, why)

    def ok(self) -> None:
        if self.count:
            self.log.warning(
                "%s works again, after %d failed attempt(s)", self.what.removeprefix("cannot "), self.count
            )
            self.count = 0
