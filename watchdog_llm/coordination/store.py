"""Durable JSON state files: atomic writes, and a corrupt file never stops the daemon.

A crash (SIGKILL, power loss) mid-write must never leave a half-written file where the next start reads it:
`save` writes a temp file in the same directory, fsyncs it, renames it over the old one, then fsyncs the
directory so the rename itself is durable. A file that cannot be parsed is moved aside (kept for a human to
look at, never deleted) and the caller starts clean.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


class JsonStore:
    """One JSON document in one file."""

    def __init__(self, path: Path, log: logging.Logger) -> None:
        self.path = Path(path)
        self._log = log

    def load(self, expect: type | None = None) -> Any | None:
        """The document, or None when the file is missing or was corrupt (then it has been moved aside).

        `expect` (e.g. `dict`) is the required top-level type; anything else counts as corrupt.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            # Unreadable is not corrupt (permissions, a directory in the way): leave it for a human, start clean.
            self._log.warning("state file %s cannot be read (%s); starting clean", self.path, e.strerror or e)
            return None
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            self.quarantine(f"not valid JSON: {_one_line(e)}")
            return None
        if expect is not None and not isinstance(doc, expect):
            self.quarantine(f"top level is {type(doc).__name__}, expected {expect.__name__}")
            return None
        return doc

    def quarantine(self, why: str) -> Path | None:
        """Move the file aside to `<name>.corrupt-<UTC timestamp>` with a WARNING; returns the new path.

        Public so callers can quarantine a file that parses but fails their own schema.
        """
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        for n in range(100):
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}" + (f"-{n}" if n else ""))
            if aside.exists():  # two corrupt files in one second: never overwrite the first one kept aside
                continue
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return None
            except OSError as e:
                self._log.warning(
                    "state file %s is corrupt (%s) and could not be moved aside (%s); starting clean",
                    self.path,
                    why,
                    e.strerror or e,
                )
                return None
            self._log.warning(
                "state file %s is corrupt (%s); moved aside to %s, starting clean", self.path, why, aside.name
            )
            return aside
        self._log.warning(
            "state file %s is corrupt (%s); too many copies aside already, starting clean", self.path, why
        )
        return None

    def save(self, doc: Any) -> None:
        """Replace the file with `doc` atomically (mode 0600). Raises OSError; the caller logs it."""
        # Serialise first: a document that cannot be written must not cost a temp file. NaN/Infinity are not
        # JSON, and other tools read these files.
        data = json.dumps(doc, indent=1, sort_keys=True, allow_nan=False).encode() + b"\n"
        parent = self.path.parent
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkstemp creates the file 0600 (lock state is about who may swap; nobody else needs to read it).
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(parent)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: the directory entry lives in the directory, not in the file."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__
