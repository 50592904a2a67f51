"""Public API keys: who may use the model, by name; and how many requests each may have in flight.

PUBLIC_API_KEYS (and the lines of PUBLIC_API_KEYS_FILE) are entries `name:key` or a bare `key`; the
name appears in logs, metrics and error bodies (`consumer`), never the key. Keys are compared as
SHA-256 digests with `hmac.compare_digest`, against every key each time: how long a check takes
does not depend on which key, or how much of one, matched.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_KEY = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: it must fit in a header
MIN_KEY_CHARS = 16
ANONYMOUS = "anonymous"


class KeyConfigError(ValueError):
    """A bad key entry: the message names the setting (or file and line) at fault."""


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    digest: bytes


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_entries(text: str, where: str, *, lines: bool) -> list[tuple[str | None, str]]:
    """`name:key` or `key` entries: one per line (a file, `#` comments) or split on commas and spaces."""
    items: list[tuple[str, str]] = []
    if lines:
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                items.append((f"{where} line {n}", line))
    else:
        items = [(f"{where} entry {n}", part) for n, part in enumerate(text.replace(",", " ").split(), 1)]
    out: list[tuple[str | None, str]] = []
    for at, item in items:
        name, sep, key = item.partition(":")
        if not sep or not _NAME.fullmatch(name):
            name, key = "", item
        if not _KEY.fullmatch(key):
            raise KeyConfigError(f"{at}: a key must be printable ASCII without spaces")
        if len(key) < MIN_KEY_CHARS:
            raise KeyConfigError(f"{at}: key too short ({len(key)} characters; at least {MIN_KEY_CHARS})")
        out.append((name or None, key))
    return out


class KeyRing:
    def __init__(self, entries: list[tuple[str | None, str]]) -> None:
        self._entries: list[_Entry] = []
        seen: dict[bytes, str] = {}
        names: set[str] = set()
        for i, (name, key) in enumerate(entries, 1):
            label = name or f"key-{i}"
            d = _digest(key)
            if d in seen:
                raise KeyConfigError(f"key {label} is the same key as {seen[d]}")
            if label in names:
                raise KeyConfigError(f"two keys are named {label}")
            seen[d] = label
            names.add(label)
            self._entries.append(_Entry(label, d))

    @classmethod
    def from_settings(cls, keys: str, keys_file: str, legacy_key: str = "") -> KeyRing:
        entries = parse_entries(keys, "PUBLIC_API_KEYS", lines=False)
        if keys_file:
            try:
                text = Path(keys_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                raise KeyConfigError(f"PUBLIC_API_KEYS_FILE={keys_file!r} cannot be read: {why}") from None
            entries += parse_entries(text, f"PUBLIC_API_KEYS_FILE {keys_file}", lines=True)
        if legacy_key:  # API_KEY: the one key clients used before the gateway; it keeps working
            entries += [("api-key", legacy_key)]
        return cls(entries)

    @property
    def open(self) -> bool:
        """No keys configured: anyone who reaches the endpoint may use it."""
        return not self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def consumer(self, presented: str | None) -> str | None:
        """The name of the key presented, or None if it is not one of ours."""
        if self.open:
            return ANONYMOUS
        if not presented:
            return None
        d = _digest(presented)
        found: str | None = None
        for e in self._entries:  # no early exit: the time taken is the same for every key
            if hmac.compare_digest(d, e.digest):
                found = e.name
        return found


class Limiter:
    """In-flight requests per consumer, at most `limit` each (0: no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_flight: dict[str, int] = {}

    def acquire(self, consumer: str) -> bool:
        n = self._in_flight.get(consumer, 0)
        if self.limit and n >= self.limit:
            return False
        self._in_flight[consumer] = n + 1
        return True

    def release(self, consumer: str) -> None:
        n = self._in_flight.get(consumer, 0) - 1
        if n > 0:
            self._in_flight[consumer] = n
        else:
            self._in_flight.pop(consumer, None)

    def in_flight(self, consumer: str) -> int:
        return self._in_flight.get(consumer, 0)
