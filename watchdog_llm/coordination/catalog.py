"""The model catalog: which models this node can serve, by name and alias.

Sources (MODELS): a YAML file, or a directory of predecessor-style `*.env` profiles (MODEL_NAME,
VLLM_ARGS, NUM_GPUS, any other line is environment for the model); with neither, the daemon's own
MODEL_NAME/VLLM_ARGS form a one-model catalog. Profiles are read as data (dotenv syntax, no variable
expansion): `$(...)` in one is a literal string, never run by a shell.

Every problem is reported as one line naming the file, the entry and the field.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from dotenv import dotenv_values

from watchdog_llm.coordination.hosts import Host, HostsError, parse_hosts
from watchdog_llm.placement import Group

# Flags the daemon sets itself: the same option in two places is a bug waiting to happen, and a key
# on a command line is readable by every user of the node.
RESERVED_VLLM_FLAGS = {
    "--port": "use SERVER_PORT",
    "--host": "use SERVER_HOST",
    "--uds": "use SERVER_SOCKET",
    "--api-key": "the daemon gives vLLM a fresh internal key by environment; clients use PUBLIC_API_KEYS",
}
# Environment a profile may not set: the daemon owns GPU placement and the internal key.
RESERVED_ENV = frozenset({"CUDA_VISIBLE_DEVICES", "VLLM_API_KEY", "CUDA_DEVICE_ORDER", "WATCHDOG_LLM_RUN_TAG"})
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FIELDS = (
    "name", "aliases", "model", "args", "env", "gpus", "health_path", "startup_timeout", "description",
    "kind", "gpu_memory", "ttl", "group", "priority", "max_concurrency", "sleep",
    "host", "base_url", "start", "stop", "logs", "always_on",
)  # fmt: skip
# A remote entry's commands are words; these stand for the entry's own values. `{args}` is a word
# of its own and becomes the entry's args, one word each.
PLACEHOLDERS = ("{model}", "{name}", "{args}")
_PLACEHOLDER = re.compile(r"\{[A-Za-z_]*\}")
# Flags a remote start command may set itself: the port and host are the host's business there.
_REMOTE_FREE_FLAGS = frozenset({"--port", "--host", "--uds"})
# What an entry serves (`kind`), and the OpenAI-style routes each kind answers.
KINDS: Mapping[str, tuple[str, ...]] = {
    "chat": ("/v1/chat/completions", "/v1/responses"),
    "completions": ("/v1/completions",),
    "embeddings": ("/v1/embeddings",),
    "rerank": ("/v1/rerank", "/v2/rerank", "/rerank"),
    "speech": ("/v1/audio/speech",),
    "transcription": ("/v1/audio/transcriptions", "/v1/audio/translations"),
    "images": ("/v1/images/generations",),
}
DEFAULT_KIND = ("chat", "completions")
_GROUP_FIELDS = ("swap", "exclusive", "persistent")
# Profile keys that are fields, not environment.
_PROFILE_KEYS = {
    "MODEL_NAME": "model",
    "VLLM_ARGS": "args",
    "NUM_GPUS": "gpus",
    "HEALTH_PATH": "health_path",
    "STARTUP_TIMEOUT": "startup_timeout",
    "DESCRIPTION": "description",
    "ALIASES": "aliases",
    "KIND": "kind",
    "GPU_MEMORY": "gpu_memory",
    "TTL": "ttl",
    "GROUP": "group",
    "PRIORITY": "priority",
    "MAX_CONCURRENCY": "max_concurrency",
    "SLEEP": "sleep",
}


class CatalogError(ValueError):
    """A bad catalog: one line per problem, each naming the source, entry and field at fault.

    Every problem found is reported at once, so a catalog is fixed in one edit, not one per run.
    """

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def check_vllm_args(words: Iterable[str], *, remote: bool = False) -> None:
    """Raise ValueError for a flag the daemon sets itself (vLLM's argparse accepts `--api_key` and
    unambiguous prefixes such as `--api`, so those count too). On a remote host only the key is ours."""
    for word in words:
        flag = word.split("=", 1)[0].replace("_", "-")
        for reserved, instead in RESERVED_VLLM_FLAGS.items():
            if remote and reserved in _REMOTE_FREE_FLAGS:
                continue
            if flag == reserved or (len(flag) > 3 and flag.startswith("--") and reserved.startswith(flag)):
                raise ValueError(f"{word.split('=', 1)[0]} is not allowed here: {instead}")


def split_args(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as e:
        raise ValueError(f"expected shell-quoted arguments ({e})") from None


@dataclass(frozen=True, slots=True)
class Defaults:
    """What an entry gets for a field it leaves out (the daemon's settings)."""

    gpus: int = 1
    health_path: str = "/health"
    startup_timeout: float = 900.0


@dataclass(frozen=True, slots=True)
class RemoteSpec:
    """How a remote entry runs: commands as words (placeholders not yet filled in)."""

    host: str
    base_url: str  # what the gateway (and probes) reach: http://address:port, no path
    start: tuple[str, ...]
    stop: tuple[str, ...] = ()  # empty: stopped by a signal over the SSH channel
    logs: tuple[str, ...] = ()  # empty: the start command's own output is the log

    def public(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "base_url": self.base_url,
            "start": list(self.start),
            "stop": list(self.stop),
            "logs": list(self.logs),
        }


def fill(words: Iterable[str], entry: ModelEntry) -> list[str]:
    """A remote command's words with the entry's values in place of {model}, {name} and {args}."""
    out: list[str] = []
    for w in words:
        if w == "{args}":
            out.extend(entry.args)
        else:
            out.append(w.replace("{model}", entry.model).replace("{name}", entry.name))
    return out


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    model: str  # hub id or local path: what `vllm serve` is given
    aliases: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    gpus: int = 1
    health_path: str = "/health"
    startup_timeout: float = 900.0
    description: str = ""
    # The arbiter's fields (several entries resident at once; see watchdog_llm/placement.py):
    kind: tuple[str, ...] = DEFAULT_KIND
    gpu_memory: int | float | None = None  # MiB per GPU (int), a share of each GPU (0 < float <= 1), or all of it
    ttl: float | None = None  # idle seconds before it is unloaded; None: never
    group: str | None = None
    priority: int = 0
    max_concurrency: int | None = None
    sleep: int = 0  # 0: evicted by a stop; 1 or 2: vLLM sleep mode at that level
    # LAN controller mode: the entry runs on `host` (a name in `hosts:`), started, stopped and
    # followed by these commands over SSH, and reached at `base_url`. None: it runs on this node.
    remote: RemoteSpec | None = None
    # A service that runs beside the model (a speech server on a second host), started with the
    # daemon and restarted when it dies; reached at the gateway's /services/NAME/; never swapped to.
    always_on: bool = False

    @property
    def host(self) -> str | None:
        return self.remote.host if self.remote is not None else None

    def memory_mib(self, gpu_total_mib: int) -> int | None:
        """MiB per GPU on a GPU of `gpu_total_mib`; None: the whole GPU."""
        if self.gpu_memory is None:
            return None
        if isinstance(self.gpu_memory, float):
            return int(self.gpu_memory * gpu_total_mib)
        return self.gpu_memory

    @property
    def local_path(self) -> Path | None:
        """The model as a local directory, when it is written as a path rather than a hub id."""
        if self.model.startswith(("/", "./", "../", "~")):
            return Path(self.model).expanduser()
        return None

    def public(self) -> dict[str, Any]:
        """What `GET /api/models` shows: everything but the environment's values (they may hold tokens)."""
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "model": self.model,
            "args": list(self.args),
            "env": sorted(self.env),
            "gpus": self.gpus,
            "health_path": self.health_path,
            "startup_timeout": self.startup_timeout,
            "description": self.description,
            "kind": list(self.kind),
            "gpu_memory": self.gpu_memory,
            "ttl": self.ttl,
            "group": self.group,
            "priority": self.priority,
            "max_concurrency": self.max_concurrency,
            "sleep": self.sleep,
            **(self.remote.public() if self.remote is not None else {"host": None}),
            "always_on": self.always_on,
        }


@dataclass(frozen=True, slots=True)
class Catalog:
    entries: tuple[ModelEntry, ...]
    default: str  # the name of the model served when no swap chose another
    source: str  # where it came from, for people: a file, a directory, or "MODEL_NAME"
    # Every group an entry names, with its rules (llama-swap's defaults for one `groups:` leaves out).
    groups: Mapping[str, Group] = field(default_factory=dict)
    hosts: Mapping[str, Host] = field(default_factory=dict)  # LAN controller mode: machines driven over SSH

    def resolve(self, key: str) -> ModelEntry | None:
        """An entry by name or alias (exact, then case-insensitive)."""
        for exact in (True, False):
            for e in self.entries:
                names = (e.name, *e.aliases)
                if key in names if exact else key.lower() in (n.lower() for n in names):
                    return e
        return None

    def get(self, name: str) -> ModelEntry:
        e = self.resolve(name)
        if e is None:
            raise KeyError(name)
        return e

    @property
    def default_entry(self) -> ModelEntry:
        return self.get(self.default)


def single(model: str, args: str, defaults: Defaults) -> Catalog:
    """The catalog of a config.env without MODELS: MODEL_NAME with VLLM_ARGS."""
    entry = _entry({"name": _name_of(model), "model": model, "args": args}, "MODEL_NAME", defaults)
    return Catalog((entry,), entry.name, "MODEL_NAME")


def load(models: str, default_model: str, defaults: Defaults, *, model_name: str = "", vllm_args: str = "") -> Catalog:
    """The catalog MODELS points at (a YAML file or a directory of *.env profiles), or the one-model
    catalog of MODEL_NAME. DEFAULT_MODEL (a name or alias) picks the model served at start."""
    if not models:
        if not model_name:
            raise CatalogError("MODEL_NAME is empty and MODELS is not set: name the model to serve")
        cat = single(model_name, vllm_args, defaults)
    else:
        path = Path(models).expanduser()
        if path.is_dir():
            cat = _from_dir(path, defaults)
        elif path.is_file():
            cat = _from_yaml(path, defaults)
        else:
            raise CatalogError(f"MODELS={models!r}: no such file or directory")
    if default_model:
        e = cat.resolve(default_model)
        if e is None:
            names = ", ".join(x.name for x in cat.entries)
            raise CatalogError(f"DEFAULT_MODEL={default_model!r} is not in the catalog ({names})")
        if e.always_on:
            raise CatalogError(f"DEFAULT_MODEL={default_model!r} is an always-on service, not a model to serve")
        cat = Catalog(cat.entries, e.name, cat.source, cat.groups, cat.hosts)
    return cat


def _from_yaml(path: Path, defaults: Defaults) -> Catalog:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CatalogError(f"MODELS {path}: cannot be read: {getattr(e, 'strerror', None) or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise CatalogError(f"MODELS {path}: not valid YAML{where}: {problem}") from None
    groups_doc: Any = None
    hosts_doc: Any = None
    if isinstance(doc, dict) and "models" in doc:
        default = doc.get("default")
        unknown = sorted(set(doc) - {"models", "default", "groups", "hosts"})
        if unknown:
            raise CatalogError(
                f"MODELS {path}: unknown top-level key {unknown[0]!r} (expected models, default, groups, hosts)"
            )
        items = doc["models"]
        groups_doc = doc.get("groups")
        hosts_doc = doc.get("hosts")
    else:
        default, items = None, doc
    if isinstance(items, dict):  # name: {fields}
        raw = []
        for name, body in items.items():
            if not isinstance(body, dict):
                raise CatalogError(f"MODELS {path}: model {name!r}: expected a mapping of fields")
            raw.append({"name": str(name), **body})
    elif isinstance(items, list):
        raw = items
    else:
        raise CatalogError(f"MODELS {path}: expected a list of models (or `models:` with one)")
    entries: list[ModelEntry] = []
    problems: list[str] = []
    for i, item in enumerate(raw, 1):
        where = f"MODELS {path}: model {i}"
        if not isinstance(item, dict):
            problems.append(f"{where}: expected a mapping of fields")
            continue
        if isinstance(item.get("name"), str):
            where = f"MODELS {path}: model {item['name']!r}"
        try:
            entries.append(_entry(item, where, defaults))
        except CatalogError as e:
            problems.extend(e.problems)
    if default is not None and not isinstance(default, str):
        problems.append(f"MODELS {path}: default: expected a model name")
        default = None
    groups = _groups(groups_doc, f"MODELS {path}", problems)
    try:
        hosts = parse_hosts(hosts_doc, f"MODELS {path}")
    except HostsError as e:
        problems.extend(e.problems)
        hosts = {}
    else:
        for entry in entries:
            if entry.host is not None and entry.host not in hosts:
                known = ", ".join(hosts) or "none: add a hosts: section"
                problems.append(f"MODELS {path}: model {entry.name!r}: host: {entry.host!r} is not in hosts: ({known})")
    cat = _catalog(entries, default, str(path), problems, groups)
    return Catalog(cat.entries, cat.default, cat.source, cat.groups, hosts)


def _groups(doc: Any, where: str, problems: list[str]) -> dict[str, Group]:
    """`groups: {name: {swap, exclusive, persistent}}`; a group left out gets llama-swap's defaults."""
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        problems.append(f"{where}: groups: expected a mapping of group names to their rules")
        return {}
    out: dict[str, Group] = {}
    for name, body in doc.items():
        at = f"{where}: group {name!r}"
        if not isinstance(name, str) or not NAME.fullmatch(name):
            problems.append(f"{at}: expected a name of letters, digits or _.:+-")
            continue
        body = body or {}
        if not isinstance(body, dict):
            problems.append(f"{at}: expected a mapping of {', '.join(_GROUP_FIELDS)}")
            continue
        unknown = sorted(set(body) - set(_GROUP_FIELDS))
        if unknown:
            problems.append(f"{at}: unknown field {unknown[0]!r} (expected one of {', '.join(_GROUP_FIELDS)})")
            continue
        bad = [k for k, v in body.items() if not isinstance(v, bool)]
        if bad:
            problems.append(f"{at}: {bad[0]}: expected true or false")
            continue
        out[name] = Group(name, **body)
    return out


def _from_dir(path: Path, defaults: Defaults) -> Catalog:
    files = sorted(p for p in path.glob("*.env") if p.is_file())
    if not files:
        raise CatalogError(f"MODELS {path}: no *.env profiles in this directory")
    entries: list[ModelEntry] = []
    problems: list[str] = []
    for f in files:
        try:  # one profile's first problem ends that profile, not the others
            entries.append(_profile(f, defaults))
        except CatalogError as e:
            problems.extend(e.problems)
    return _catalog(entries, None, str(path), problems)


def _profile(f: Path, defaults: Defaults) -> ModelEntry:
    where = f"MODELS {f}"
    try:
        text = f.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CatalogError(f"{where}: cannot be read: {getattr(e, 'strerror', None) or e}") from None
    values = dotenv_values(stream=io.StringIO(text), interpolate=False)  # data: no ${VAR}, no $(...)
    item: dict[str, Any] = {"name": f.stem}
    env: dict[str, str] = {}
    for key, value in values.items():
        if value is None:
            raise CatalogError(f"{where}: line {key!r} has no '=': expected KEY=value")
        if key.upper() in _PROFILE_KEYS:
            item[_PROFILE_KEYS[key.upper()]] = value
        else:
            env[key] = value
    if "model" not in item:
        raise CatalogError(f"{where}: MODEL_NAME is missing")
    if isinstance(item.get("aliases"), str):
        item["aliases"] = item["aliases"].replace(",", " ").split()
    item["env"] = env
    return _entry(item, where, defaults)


def _catalog(
    entries: list[ModelEntry],
    default: str | None,
    source: str,
    problems: list[str],
    groups: Mapping[str, Group] | None = None,
) -> Catalog:
    """The catalog from its good entries, or every problem found: the entries' own, then clashes."""
    owner: dict[str, str] = {}
    for e in entries:
        for n in (e.name, *e.aliases):
            other = owner.get(n.lower())
            if other is not None:
                what = "name" if n == e.name else "alias"
                problems.append(f"MODELS {source}: model {e.name!r}: {what} {n!r} is already used by model {other!r}")
            else:
                owner[n.lower()] = e.name
    if not entries and not problems:
        problems.append(f"MODELS {source}: the catalog is empty")
    hit = next((e for e in entries if not e.always_on), entries[0] if entries else None)
    if default is not None:
        hit = next((e for e in entries if default in (e.name, *e.aliases)), None)
        if hit is None and default.lower() not in _bad_names(problems):
            problems.append(f"MODELS {source}: default {default!r} is not one of its models")
        elif hit is not None and hit.always_on:
            problems.append(f"MODELS {source}: default {hit.name!r} is an always-on service, not a model to serve")
    if entries and all(e.always_on for e in entries):
        problems.append(f"MODELS {source}: every entry is an always-on service: the catalog needs a model")
    rules = dict(groups or {})
    for e in entries:
        if e.group is not None and e.group not in rules:
            rules[e.group] = Group(e.group)  # llama-swap's defaults: swap within the group
    for name in sorted(set(rules) - {e.group for e in entries}):
        problems.append(f"MODELS {source}: group {name!r}: no model names it (a typo in a model's group?)")
    if problems or hit is None:
        raise CatalogError(*problems)
    return Catalog(tuple(entries), hit.name, source, rules)


def _bad_names(problems: list[str]) -> set[str]:
    """Names of entries already reported bad: a default naming one is not a second problem."""
    return {m.group(1).lower() for p in problems if (m := re.search(r": model '([^']+)'", p))}


def _name_of(model: str) -> str:
    """A catalog name for a bare MODEL_NAME: its last path part, made safe."""
    base = model.rstrip("/").rsplit("/", 1)[-1] or "model"
    safe = re.sub(r"[^A-Za-z0-9_.:+-]", "-", base).lstrip("-_.:+") or "model"
    return safe[:64]


def _entry(item: Mapping[str, Any], where: str, defaults: Defaults) -> ModelEntry:
    unknown = sorted(set(item) - set(_FIELDS))
    if unknown:
        raise CatalogError(f"{where}: unknown field {unknown[0]!r} (expected one of {', '.join(_FIELDS)})")

    def bad(fld: str, why: str) -> CatalogError:
        return CatalogError(f"{where}: {fld}: {why}")

    name = item.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise bad("name", "expected 1-64 letters, digits or _.:+- (starting with a letter or digit)")
    model = item.get("model")
    if not isinstance(model, str) or not model.strip() or any(not c.isprintable() for c in model):
        raise bad("model", "expected a hub id or a local path")
    aliases = item.get("aliases") or []
    if isinstance(aliases, str):
        aliases = [aliases]
    if not isinstance(aliases, list) or not all(isinstance(a, str) and NAME.fullmatch(a) for a in aliases):
        raise bad("aliases", "expected a list of names (letters, digits, _.:+-)")
    remote = _remote(item, bad)
    try:
        words = _words(item.get("args") or [])
        check_vllm_args(words, remote=remote is not None)
    except ValueError as e:
        raise bad("args", str(e)) from None
    env = item.get("env") or {}
    if not isinstance(env, dict):
        raise bad("env", "expected a mapping of NAME: value")
    for k, v in env.items():
        if not isinstance(k, str) or not _ENV_NAME.fullmatch(k):
            raise bad("env", f"{k!r} is not a valid environment variable name")
        if k.upper() in RESERVED_ENV:
            raise bad("env", f"{k} is set by the daemon (GPU placement, the internal key)")
        if not isinstance(v, str | int | float | bool):
            raise bad("env", f"{k}: expected a string")
        if remote is not None and ("\n" in str(v) or "\0" in str(v)):
            raise bad("env", f"{k}: a remote entry's values travel one per line: no line breaks")
    gpus = _number(item.get("gpus", defaults.gpus), int, 0, 64)
    if gpus is None:
        raise bad("gpus", "expected a whole number from 0 to 64")
    timeout = _number(item.get("startup_timeout", defaults.startup_timeout), float, 1, 86400)
    if timeout is None:
        raise bad("startup_timeout", "expected seconds, from 1 to 86400")
    health = item.get("health_path", defaults.health_path)
    if not isinstance(health, str) or not health.startswith("/") or any(c.isspace() for c in health):
        raise bad("health_path", "expected a path starting with /")
    desc = item.get("description", "")
    if not isinstance(desc, str) or len(desc) > 500:
        raise bad("description", "expected text of at most 500 characters")
    kind = item.get("kind", list(DEFAULT_KIND))
    if isinstance(kind, str):
        kind = kind.replace(",", " ").split()
    if not isinstance(kind, list) or not kind or not all(isinstance(k, str) and k in KINDS for k in kind):
        raise bad("kind", f"expected one or more of {', '.join(KINDS)}")
    memory = item.get("gpu_memory")
    if memory is not None:
        memory = _memory(memory)
        if memory is None:
            raise bad("gpu_memory", "expected MiB per GPU (a whole number, e.g. 24000) or a share of each GPU (0.5)")
    ttl = item.get("ttl")
    if ttl is not None and (ttl := _number(ttl, float, 1, 7 * 86400)) is None:
        raise bad("ttl", "expected idle seconds before unloading, from 1 to 604800")
    group = item.get("group")
    if group is not None and (not isinstance(group, str) or not NAME.fullmatch(group)):
        raise bad("group", "expected a group name (letters, digits, _.:+-)")
    priority = _number(item.get("priority", 0), int, -100, 100)
    if priority is None:
        raise bad("priority", "expected a whole number from -100 to 100")
    conc = item.get("max_concurrency")
    if conc is not None and (conc := _number(conc, int, 1, 100_000)) is None:
        raise bad("max_concurrency", "expected a whole number of requests at once, at least 1")
    sleep = item.get("sleep", 0)
    sleep = {False: 0, True: 1}.get(sleep, sleep) if isinstance(sleep, bool) else sleep
    sleep = int(sleep) if isinstance(sleep, str) and sleep.strip() in ("0", "1", "2") else sleep
    if sleep not in (0, 1, 2):
        raise bad("sleep", "expected 0 (stop when evicted), 1 or 2 (vLLM sleep mode level)")
    return ModelEntry(
        name=name,
        model=model.strip(),
        aliases=tuple(aliases),
        args=tuple(words),
        env={k: str(v) for k, v in env.items()},
        gpus=int(gpus),
        health_path=health,
        startup_timeout=float(timeout),
        description=desc,
        kind=tuple(dict.fromkeys(kind)),
        gpu_memory=memory,
        ttl=None if ttl is None else float(ttl),
        group=group,
        priority=int(priority),
        max_concurrency=None if conc is None else int(conc),
        sleep=int(sleep),
        remote=remote,
        always_on=_always_on(item, remote, bad),
    )


def _always_on(item: Mapping[str, Any], remote: RemoteSpec | None, bad: Any) -> bool:
    value = item.get("always_on", False)
    if not isinstance(value, bool):
        raise bad("always_on", "expected true or false")
    if value and remote is None:
        raise bad("always_on", "only for an entry on another host (one here would hold GPUs that jobs need)")
    return value


def _words(value: Any) -> list[str]:
    """A list of words, or one shell-quoted string split into words (never run by a shell)."""
    words = split_args(value) if isinstance(value, str) else value
    if not isinstance(words, list) or not all(isinstance(w, str | int | float) for w in words):
        raise ValueError("expected a list of arguments or one shell-quoted string")
    if any(isinstance(w, bool) for w in words):
        raise ValueError("a word is a YAML true/false (or yes/no): quote it")
    return [str(w) for w in words]


def _remote(item: Mapping[str, Any], bad: Any) -> RemoteSpec | None:
    """`host`, `base_url`, `start`, `stop`, `logs`: all or nothing of a remote entry."""
    fields = ("base_url", "start", "stop", "logs")
    host = item.get("host")
    if host is None:
        given = [f for f in fields if f in item]
        if given:
            raise bad(given[0], "only for an entry that runs on another host: set host (a name in hosts:)")
        return None
    if not isinstance(host, str) or not host:
        raise bad("host", "expected the name of a host in hosts:")
    url = item.get("base_url")
    if not isinstance(url, str) or not re.fullmatch(r"https?://[A-Za-z0-9_.:\[\]-]+", url.rstrip("/")):
        raise bad("base_url", "expected where the server on the host listens, e.g. http://10.0.0.21:8000 (no path)")
    commands: dict[str, tuple[str, ...]] = {}
    for fld in ("start", "stop", "logs"):
        value = item.get(fld)
        if value is None:
            if fld == "start":
                raise bad("start", "a remote entry needs the command that starts its server on the host")
            commands[fld] = ()
            continue
        try:
            words = _words(value)
        except ValueError as e:
            raise bad(fld, str(e)) from None
        if not words:
            raise bad(fld, "expected a command")
        for w in words:
            for p in _PLACEHOLDER.findall(w):
                if p not in PLACEHOLDERS:
                    raise bad(fld, f"unknown placeholder {p} (expected {', '.join(PLACEHOLDERS)})")
            if "{args}" in w and w != "{args}":
                raise bad(fld, "{args} stands for several words: write it as a word of its own")
            if any(not c.isprintable() for c in w):
                raise bad(fld, "expected printable words")
        commands[fld] = tuple(words)
    return RemoteSpec(host, url.rstrip("/"), commands["start"], commands["stop"], commands["logs"])


def _memory(value: Any) -> int | float | None:
    """MiB (a whole number above 1) or a share (0 < x <= 1), as written; None when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip().lower().removesuffix("mib").strip()
        if text.endswith("%"):
            n = _number(text[:-1], float, 0, 100)
            return None if n is None or n == 0 else float(n) / 100
        try:
            value = float(text) if "." in text else int(text)
        except ValueError:
            return None
    if isinstance(value, float) and 0 < value <= 1:
        return float(value)
    if isinstance(value, int | float) and value == int(value) and 1 < value <= 16 * 1024 * 1024:
        return int(value)
    return None


def _number(value: Any, kind: type[int] | type[float], lo: float, hi: float) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        n = float(value) if isinstance(value, str) else value
    except ValueError:
        return None
    if not isinstance(n, int | float) or not math.isfinite(n) or not lo <= n <= hi:
        return None
    if kind is int and n != int(n):
        return None
    return n


# ---- adding an entry to the catalog file (POST /api/models) ---------------------------------------


def add_to_file(path: Path, item: Mapping[str, Any], defaults: Defaults) -> Catalog:
    """Append `item` (catalog fields; `like: NAME` copies that entry's fields first) to the YAML file
    at `path`, whose whole new content is checked first: any problem raises CatalogError and changes
    nothing. The file is replaced atomically; the previous one is kept as `<file>.bak`. YAML
    comments are not kept (the .bak has them)."""
    if not path.is_file():
        raise CatalogError(f"MODELS {path}: only a YAML catalog file can be added to")
    try:
        text = path.read_text(encoding="utf-8")
        doc = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CatalogError(f"MODELS {path}: cannot be read: {getattr(e, 'strerror', None) or e}") from None
    holder = doc if isinstance(doc, dict) and "models" in doc else None
    items = holder["models"] if holder is not None else doc
    new = dict(item)
    like = new.pop("like", None)
    if like is not None:
        raws = [{"name": k, **v} for k, v in items.items()] if isinstance(items, dict) else list(items or [])
        base = next(
            (r for r in raws if isinstance(r, dict) and like in (r.get("name"), *(r.get("aliases") or []))), None
        )
        if base is None:
            raise CatalogError(f"MODELS {path}: like: {like!r} is not a model of the catalog")
        new = {**{k: v for k, v in base.items() if k not in ("name", "aliases", "description")}, **new}
    name = new.get("name")
    if isinstance(items, dict):
        body = {k: v for k, v in new.items() if k != "name"}
        items = {**items, name: body}
    elif isinstance(items, list):
        items = [*items, new]
    else:
        raise CatalogError(f"MODELS {path}: expected a list of models (or `models:` with one)")
    out = {**holder, "models": items} if holder is not None else items
    data = yaml.safe_dump(out, sort_keys=False, allow_unicode=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777)
        cat = _from_yaml(Path(tmp), defaults)  # every problem of the new file, or it stays unwritten
        cat = Catalog(cat.entries, cat.default, str(path), cat.groups, cat.hosts)
        if not any(e.name == name for e in cat.entries):
            raise CatalogError(f"MODELS {path}: model {name!r} was not added")
        shutil.copy2(path, path.with_name(path.name + ".bak"))
        os.replace(tmp, path)
    except CatalogError as e:
        raise CatalogError(*(p.replace(tmp, str(path)) for p in e.problems)) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return cat
