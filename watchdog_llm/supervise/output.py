"""The one line of a dead server's output that says why it died, in the forms vLLM prints it.

Checked against vLLM 0.32 (tests/test_real_vllm.py): argparse refusals ("api_server.py: error:
unrecognized arguments: --x", "vllm serve: error: argument --dtype: invalid choice: ..."), an
exception's last line ("huggingface_hub.errors.HFValidationError: Repo id must be ...", "OSError:
[Errno 98] Address already in use"), pydantic's config errors, whose reason is on the next lines
("ValidationError: 1 validation error for ModelConfig" / "  Value error, Sleep mode is not
supported on current platform. [type=value_error, ...]"), and the engine's wrapper ("RuntimeError:
Engine core initialization failed. See root cause above."), which points at an earlier one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

MAX_CAUSE = 300  # it goes into a phone notification and a status line
_PREFIX = re.compile(r"^\(\w+ pid=\d+\) ")  # vLLM's "(APIServer pid=123) " / "(EngineCore pid=7) "
_ARGPARSE = re.compile(r"^\S+(?: serve)?: error: (.+)$")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit)): (.+)$")
_PYDANTIC = re.compile(r"^\d+ validation errors? for (\w+)$")
_PYDANTIC_TAIL = re.compile(r"\s*\[type=.*$")
_WRAPPERS = ("See root cause above", "Engine core initialization failed")


@dataclass(frozen=True, slots=True)
class Cause:
    line: str  # for people: "unrecognized arguments: --x", "OSError: [Errno 98] Address already in use"
    usage: bool  # the command line was refused (argparse): the flags are at fault, not the model


def cause(tail: Sequence[str]) -> Cause | None:
    """Why the process whose last output lines are `tail` died, when its output says so."""
    lines = [_PREFIX.sub("", line.rstrip()) for line in tail]
    for line in reversed(lines):
        if m := _ARGPARSE.match(line):
            return Cause(_clip(m.group(1)), usage=True)
    found: str | None = None
    for i in range(len(lines) - 1, -1, -1):
        if not (m := _EXCEPTION.match(lines[i])):
            continue
        name, message = m.groups()
        if p := _PYDANTIC.match(message):
            message = f"{p.group(1)}: {_pydantic_reason(lines[i + 1 :])}"
        line = f"{name}: {message}"
        if not any(w in message for w in _WRAPPERS):
            return Cause(_clip(line), usage=False)
        found = found or line  # only the wrapper: better than nothing
    return Cause(_clip(found), usage=False) if found else None


def _pydantic_reason(after: list[str]) -> str:
    parts: list[str] = []
    for line in after:
        if not line.startswith(" ") and parts and not line.strip().isidentifier():
            break
        text = _PYDANTIC_TAIL.sub("", line.strip()).removeprefix("Value error, ")
        if not text or text.startswith("For further information"):
            break
        parts.append(text)
    return ": ".join(parts) or "invalid configuration"


def _clip(line: str) -> str:
    return line if len(line) <= MAX_CAUSE else line[: MAX_CAUSE - 1] + "…"
