"""The schedule registry: external schedulers (cron jobs, agents, a second dashboard) record what they will
do and when, so people can see it. Stored and shown, never executed: running anything is the scheduler's job.

Times: `next_run` is an RFC 3339 date-time string with an offset (`...Z` or `+02:00`) in the years 2000-2999.
A naive time is rejected, because a scheduler running in local time would otherwise show up hours off; a number
(epoch seconds: `0` would be 1970) and the years outside are mistakes (Go's zero time 0001-01-01, a 9999 "never"),
not schedules. A time in the past is accepted: the entry is overdue, which is for people to see; the registry
judges no clock. Aware times are stored and shown in UTC. `created_at`/`updated_at` are server-set epoch seconds.

Text fields are printable (`printable()`: no control, format or separator character but the space, nothing that
forges or hides text in a log), and the JSON Schema says so with the rule's own pattern, as it does for cron
expressions (`CRON_PATTERN`, made from the tables check_cron reads): schema-valid input is accepted.
"""

from __future__ import annotations

import builtins
import logging
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from watchdog_llm.coordination.store import JsonStore

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
STATE_VERSION = 1

# RFC 3339 `date-time` with an offset, in the years 2000-2999 ([0-9], not \d: the same in every regex engine).
NEXT_RUN_PATTERN = (
    r"^2[0-9]{3}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?"
    r"(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
)
_NEXT_RUN = re.compile(NEXT_RUN_PATTERN, re.ASCII)
_RFC3339 = re.compile(NEXT_RUN_PATTERN.replace("^2[0-9]{3}-", "^[0-9]{4}-"), re.ASCII)  # any year
_NEXT_RUN_EXAMPLE = "e.g. 2030-01-31T03:00:00Z or 2030-01-31T03:00:00+02:00"

# Vixie-cron syntax, conservatively: `*`, numbers, names, ranges, lists, steps. No seconds field and no
# Quartz extensions (?, L, W, #): a dashboard must be able to read back what a scheduler registered.
_MONTHS = {
    m: i for i, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)
}
_DAYS = {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _DAYS),  # 0 and 7 are both Sunday
)
_MACROS = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})
_ITEM = re.compile(r"^(?:\*|([0-9a-z]+)(?:-([0-9a-z]+))?)(?:/([0-9]+))?$")
CRON_MAX = 200


def check_cron(expr: str) -> str:
    """`expr` normalised to single spaces, or ValueError saying which field is wrong."""
    if len(expr) > CRON_MAX:
        raise ValueError(f"at most {CRON_MAX} characters")
    if expr.strip().lower() in _MACROS:
        return expr.strip().lower()
    fields = expr.split()
    if len(fields) != len(_FIELDS):
        raise ValueError(
            f"needs 5 fields (minute hour day-of-month month day-of-week) or one of {', '.join(sorted(_MACROS))}; "
            f"got {len(fields)}"
        )
    for text, (name, lo, hi, names) in zip(fields, _FIELDS, strict=True):
        for item in text.lower().split(","):
            m = _ITEM.match(item)
            if m is None:
                raise ValueError(f"{name} field {text!r}: {item!r} is not *, N, N-M, a name or a step (/N)")
            for part in (m.group(1), m.group(2)):
                if part is None:
                    continue
                value = int(part) if part.isdigit() else names.get(part)
                if value is None or not lo <= value <= hi:
                    raise ValueError(f"{name} field {text!r}: {part!r} is outside {lo}-{hi}")
            if m.group(3) is not None and not 1 <= int(m.group(3)) <= hi + 1:
                raise ValueError(f"{name} field {text!r}: step {m.group(3)} is outside 1-{hi + 1}")
    return " ".join(fields)


def _digits(lo: int, hi: int) -> str:
    """A regex for the decimal numbers lo..hi (0 <= lo <= hi <= 99), leading zeros allowed as int() allows them."""
    alts = [f"[{lo}-{min(hi, 9)}]"] if lo <= 9 else []
    whole: list[int] = []  # tens whose every unit is in range: one [a-b][0-9] for them all
    for tens in range(max(lo // 10, 1), hi // 10 + 1):
        first, last = (lo % 10 if tens == lo // 10 else 0), (hi % 10 if tens == hi // 10 else 9)
        if (first, last) == (0, 9):
            whole.append(tens)
        else:
            alts.append(f"{tens}[{first}-{last}]")
    if whole:
        alts.append(f"[{whole[0]}-{whole[-1]}][0-9]")
    return f"0*({'|'.join(alts)})"


def _any_case(word: str) -> str:
    return "".join(f"[{c}{c.upper()}]" for c in word)


def _cron_pattern() -> str:
    # str.split() separates on these (str.isspace), and strip() drops them around a macro.
    ws = r"[\t-\r\x1c- \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
    fields = []
    for _, lo, hi, names in _FIELDS:
        value = "|".join([_digits(lo, hi), *(_any_case(n) for n in names)])
        item = f"(\\*|({value})(-({value}))?)(/{_digits(1, hi + 1)})?"
        fields.append(f"{item}(,{item})*")
    macros = "|".join(_any_case(m[1:]) for m in sorted(_MACROS))
    return f"^{ws}*(@({macros})|{f'{ws}+'.join(fields)}){ws}*$"


# check_cron's rules as a JSON Schema pattern (tested against check_cron itself).
CRON_PATTERN = _cron_pattern()


# Text that goes into logs, notifications and dashboards holds no character that forges lines there, or hides or
# reorders text: no C0 or C1 control or DEL, none of the BMP's format characters (soft hyphen, zero-width and
# bidirectional controls, BOM, ...) and no separator but the space (no-break and other spaces, line and
# paragraph separators); Unicode 14's. Spelled in escapes that Python's, Rust's and ECMA-262's regex engines read
# alike, so the JSON Schema's pattern is the rule itself: text the schema allows is accepted, and no other.
_BARRED = (
    r"\x7f-\xa0\xad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u1680\u180e\u2000-\u200f\u2028-\u202f"
    r"\u205f-\u2064\u2066-\u206f\u3000\ufeff\ufff9-\ufffb"
)
_UNPRINTABLE = rf"\x00-\x1f{_BARRED}"
_UNPRINTABLE_TEXT = rf"\x00-\x08\x0b\x0c\x0e-\x1f{_BARRED}"  # newlines and tabs allowed
PRINTABLE_PATTERN = f"^[^{_UNPRINTABLE}]*$"
PRINTABLE_NOT_BLANK_PATTERN = f"^ *[^ {_UNPRINTABLE}][^{_UNPRINTABLE}]*$"  # the space is its one whitespace
PRINTABLE_TEXT_PATTERN = f"^[^{_UNPRINTABLE_TEXT}]*$"
# Lone surrogates too: JSON can spell them ("\\ud800"), no JSON Schema validator sees one, and UTF-8 has none.
_BAD = re.compile(rf"[{_UNPRINTABLE}\ud800-\udfff]")
_BAD_TEXT = re.compile(rf"[{_UNPRINTABLE_TEXT}\ud800-\udfff]")


def printable(value: str, *, newlines: bool = False) -> bool:
    """The rule above (newlines: and newlines and tabs); what the swap lock and the schedule call printable."""
    return (_BAD_TEXT if newlines else _BAD).search(value) is None


def _printable(value: str, field: str) -> str:
    if not printable(value) or not value.strip():
        raise ValueError(f"{field} must be printable characters, not blank")
    return value


# "At least one of cron and next_run", as a schema: a null is as good as leaving the field out.
_WHEN: list[Any] = [{"required": [f], "properties": {f: {"type": "string"}}} for f in ("cron", "next_run")]


class ScheduleIn(BaseModel):
    """What a scheduler sends (POST /api/schedule). At least one of `cron` and `next_run`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"anyOf": _WHEN})

    id: str = Field(pattern=ID_PATTERN, description="letters, digits, '_', '.', '-'; 1-64 characters")
    owner: str = Field(
        min_length=1,
        max_length=64,
        description="printable, not blank",
        json_schema_extra={"pattern": PRINTABLE_NOT_BLANK_PATTERN},
    )
    cron: str | None = Field(
        default=None,
        max_length=CRON_MAX,
        description="5-field cron expression (minute hour day-of-month month day-of-week: *, N, N-M, names, "
        "lists, /steps) or @daily-style macro",
        json_schema_extra={"pattern": CRON_PATTERN},
    )
    next_run: datetime | None = Field(
        default=None,
        description="RFC 3339 date-time with an offset (Z or +02:00), in the years 2000-2999; stored in UTC. "
        "Not epoch seconds. A time in the past is accepted (the entry is overdue)",
        json_schema_extra={"pattern": NEXT_RUN_PATTERN},
    )
    action: str = Field(
        min_length=1,
        max_length=200,
        description='what will happen, e.g. "swap qwen-7b"; printable, not blank',
        json_schema_extra={"pattern": PRINTABLE_NOT_BLANK_PATTERN},
    )
    description: str = Field(
        default="",
        max_length=1000,
        description="printable; newlines and tabs allowed",
        json_schema_extra={"pattern": PRINTABLE_TEXT_PATTERN},
    )

    @field_validator("owner")
    @classmethod
    def _owner(cls, v: str) -> str:
        return _printable(v, "owner")

    @field_validator("action")
    @classmethod
    def _action(cls, v: str) -> str:
        return _printable(v, "action")

    @field_validator("description")
    @classmethod
    def _description(cls, v: str) -> str:
        # Newlines and tabs are fine in a description; other control characters would garble logs and terminals.
        if not printable(v, newlines=True):
            raise ValueError("description must not contain control characters")
        return v

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        return None if v is None else check_cron(v)

    @field_validator("next_run", mode="before")
    @classmethod
    def _next_run_text(cls, v: Any) -> Any:
        """A string in the schema's shape, before pydantic reads it: it would take 0, "0", a date alone."""
        if v is None or isinstance(v, datetime):  # an embedder's own datetime: checked below
            return v
        if not isinstance(v, str):
            raise ValueError(f"must be an RFC 3339 date-time string, not a {type(v).__name__}; {_NEXT_RUN_EXAMPLE}")
        if _NEXT_RUN.fullmatch(v) is None:
            if _RFC3339.fullmatch(v):
                raise ValueError(f"{_shown(v)} is outside the years 2000-2999: a placeholder, not a time to run")
            if re.fullmatch(r"[^TZ+]*T[0-9:.]*", v, re.ASCII):
                raise ValueError(f"needs a timezone, {_NEXT_RUN_EXAMPLE}")
            raise ValueError(f"{_shown(v)} is not an RFC 3339 date-time with an offset; {_NEXT_RUN_EXAMPLE}")
        try:
            return datetime.fromisoformat(v)
        except ValueError:  # the right shape, but no such day (2030-02-30)
            raise ValueError(f"{_shown(v)} is not a date-time that exists; {_NEXT_RUN_EXAMPLE}") from None

    @field_validator("next_run")
    @classmethod
    def _next_run(cls, v: datetime | None) -> datetime | None:
        if v is None:
            return None
        if v.tzinfo is None or v.utcoffset() is None:
            raise ValueError("needs a timezone, e.g. 2030-01-31T03:00:00Z or 2030-01-31T03:00:00+02:00")
        try:
            return v.astimezone(UTC)
        except OverflowError:  # 9999-12-31T23:00-02:00 has no UTC date; must be a 422, not a crash
            raise ValueError("is out of range once converted to UTC") from None

    @model_validator(mode="after")
    def _when(self) -> ScheduleIn:
        if self.cron is None and self.next_run is None:
            raise ValueError("give cron or next_run (or both): when will this run?")
        return self


class ScheduleEntry(ScheduleIn):
    """A stored entry: the input plus server-set times (epoch seconds)."""

    model_config = ConfigDict(extra="ignore")  # a file written by a newer version still loads

    created_at: float
    updated_at: float

    @field_validator("next_run", mode="before")
    @classmethod
    def _next_run_text(cls, v: Any) -> Any:
        # Checked on the way in; stored in UTC, where 2000-01-01T00:30+01:00 became 1999: read it back as it is.
        return v


class ScheduleError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Schedule:
    """The registry: upsert by id, bounded, persisted on every change, thread-safe."""

    def __init__(
        self,
        store: JsonStore | None,
        *,
        clock: Callable[[], float] = time.time,
        max_entries: int = 500,
        log: logging.Logger,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._store = store
        self._clock = clock
        self.max_entries = max_entries
        self._log = log
        self._mu = threading.Lock()
        self._entries: dict[str, ScheduleEntry] = {}
        self._entries, rewrite = self._load()
        if rewrite:
            self._save()

    def list(self) -> builtins.list[ScheduleEntry]:
        """All entries, sorted by id."""
        with self._mu:
            return [self._entries[k] for k in sorted(self._entries)]

    def get(self, id: str) -> ScheduleEntry | None:
        with self._mu:
            return self._entries.get(id)

    def put(self, entry_in: ScheduleIn) -> tuple[ScheduleEntry, bool]:
        """Create or replace the entry with this id; the bool says whether it was created.
        A new id on a full registry → ScheduleError 409 "schedule_full"."""
        with self._mu:
            now = self._clock()
            old = self._entries.get(entry_in.id)
            if old is None and len(self._entries) >= self.max_entries:
                raise ScheduleError(
                    409,
                    "schedule_full",
                    f"the schedule holds {self.max_entries} entries already; delete one (DELETE /api/schedule/ID) "
                    "or update an existing id",
                )
            entry = ScheduleEntry.model_validate(
                {**entry_in.model_dump(), "created_at": old.created_at if old else now, "updated_at": now}
            )
            self._entries[entry.id] = entry
            self._save()
            self._log.info("schedule entry %r %s by %r", entry.id, "added" if old is None else "updated", entry.owner)
            return entry, old is None

    def delete(self, id: str) -> bool:
        """True when there was such an entry."""
        with self._mu:
            gone = self._entries.pop(id, None)
            if gone is None:
                return False
            self._save()
            self._log.info("schedule entry %r deleted", id)
            return True

    def _save(self) -> None:
        if self._store is None:
            return
        doc = {
            "version": STATE_VERSION,
            "entries": [self._entries[k].model_dump(mode="json") for k in sorted(self._entries)],
        }
        try:
            self._store.save(doc)
        except (OSError, ValueError) as e:
            # Still served from memory; only a restart would lose it, so say so loudly.
            self._log.error("schedule not saved to %s (%s): a restart would lose the change", self._store.path, e)

    def _load(self) -> tuple[dict[str, ScheduleEntry], bool]:
        """The stored entries, and whether the file must be rewritten (some entries were invalid)."""
        if self._store is None:
            return {}, False
        doc = self._store.load(expect=dict)
        if doc is None:
            return {}, False
        raw = doc.get("entries", [])
        if not isinstance(raw, builtins.list):
            self._store.quarantine("'entries' is not a list")
            return {}, False
        entries: dict[str, ScheduleEntry] = {}
        bad: builtins.list[str] = []
        for n, item in enumerate(raw):
            try:
                entry = ScheduleEntry.model_validate(item)
            except ValidationError as e:
                bad.append(f"#{n} {_label(item)}: {e.errors()[0]['loc']} {e.errors()[0]['msg']}")
                continue
            entries[entry.id] = entry
        if bad:
            # Keep the original for a human, and carry on with the entries that are sound.
            self._store.quarantine(f"{len(bad)} invalid schedule entries: " + "; ".join(bad[:3]))
        return entries, bool(bad)


def _shown(text: str) -> str:
    return repr("".join(c if c.isprintable() else "?" for c in text[:40]) + ("..." if len(text) > 40 else ""))


def _label(item: Any) -> str:
    return repr(item.get("id"))[:70] if isinstance(item, dict) else type(item).__name__
