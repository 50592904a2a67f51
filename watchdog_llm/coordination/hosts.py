"""Model hosts for LAN controller mode: machines the controller drives over SSH.

They are listed in the catalog file's `hosts:` section:

    hosts:
      spark-1: {address: 10.0.0.21, user: lab}
      spark-2: {address: spark-2.lan, user: lab, port: 2222, key_file: ~/.ssh/spark_ed25519}

Host keys are always checked: against the controller's own known_hosts (STATE_DIR/ssh/known_hosts),
to which a host's key is added only by an explicit `watchdog-llm hosts accept NAME`.
Every problem is one line naming the file, the host and the field.
"""

from __future__ import annotations

import getpass
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ADDRESS = re.compile(r"[A-Za-z0-9_.:-]{1,253}")  # a host name, IPv4 or IPv6 literal: nothing a shell or ssh reads
_USER = re.compile(r"[a-z_][a-z0-9_.-]{0,31}", re.IGNORECASE)
_FIELDS = ("address", "user", "port", "key_file", "description", "python")


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    address: str
    user: str
    port: int = 22
    key_file: Path | None = None  # None: the controller's own key, STATE_DIR/ssh/id_ed25519
    description: str = ""
    python: str = "python3"  # on the host, with huggingface_hub: what runs a model download there

    @property
    def shown(self) -> str:
        """For messages: name (user@address:port)."""
        return f"{self.name} ({self.user}@{self.address}:{self.port})"


class HostsError(ValueError):
    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_hosts(doc: Any, where: str) -> dict[str, Host]:
    """The `hosts:` mapping of a catalog file; every problem at once."""
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise HostsError(f"{where}: hosts: expected a mapping of host names to their fields")
    hosts: dict[str, Host] = {}
    problems: list[str] = []
    for name, body in doc.items():
        at = f"{where}: host {name!r}"
        try:
            hosts[str(name)] = _host(name, body, at)
        except HostsError as e:
            problems.extend(e.problems)
    if problems:
        raise HostsError(*problems)
    return hosts


def _host(name: Any, body: Any, at: str) -> Host:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise HostsError(f"{at}: expected a name of 1-64 letters, digits or _.- (starting with a letter or digit)")
    if isinstance(body, str):
        body = {"address": body}
    if not isinstance(body, Mapping):
        raise HostsError(f"{at}: expected a mapping of {', '.join(_FIELDS)} (or just its address)")
    unknown = sorted(set(body) - set(_FIELDS))
    if unknown:
        raise HostsError(f"{at}: unknown field {unknown[0]!r} (expected one of {', '.join(_FIELDS)})")
    address = body.get("address")
    if not isinstance(address, str) or not _ADDRESS.fullmatch(address) or address.startswith("-"):
        raise HostsError(f"{at}: address: expected a host name or an IP address")
    user = body.get("user", getpass.getuser())
    if not isinstance(user, str) or not _USER.fullmatch(user):
        raise HostsError(f"{at}: user: expected a login name (letters, digits, _.-)")
    port = body.get("port", 22)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise HostsError(f"{at}: port: expected a port number from 1 to 65535")
    key = body.get("key_file")
    if key is not None and (not isinstance(key, str) or not key.strip()):
        raise HostsError(f"{at}: key_file: expected the path of a private key")
    desc = body.get("description", "")
    if not isinstance(desc, str) or len(desc) > 500:
        raise HostsError(f"{at}: description: expected text of at most 500 characters")
    python = body.get("python", "python3")
    if not isinstance(python, str) or not python.strip() or any(c.isspace() or not c.isprintable() for c in python):
        raise HostsError(f"{at}: python: expected one command or path (a Python with huggingface_hub)")
    return Host(name, address, user, port, None if key is None else Path(key).expanduser(), desc, python)
