"""Per-model settings that persist: the knobs people turn between runs (the Spark controller's
overrides file), kept in STATE_DIR/overrides.json apart from the catalog, so an updated catalog
never loses them and they never need the catalog file to be writable.

A setting replaces the same vLLM flag in the entry's `args` (whichever way it was written there:
`--flag v`, `--flag=v`, `--no-flag`); `extra_args` come last. They apply at the model's next start.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from watchdog_llm.coordination.catalog import ModelEntry, check_vllm_args, split_args
from watchdog_llm.coordination.store import JsonStore

# setting -> the vLLM flag it owns (prefix caching also owns its --no- form)
FLAGS: Mapping[str, str] = {
    "max_model_len": "--max-model-len",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "prefix_caching": "--enable-prefix-caching",
    "kv_cache_dtype": "--kv-cache-dtype",
}
_DTYPE = re.compile(r"[a-z0-9_]{1,32}")  # auto, fp8, fp8_e4m3, bfloat16, ...: vLLM checks the name itself
_VALUED = frozenset({"--max-model-len", "--gpu-memory-utilization", "--kv-cache-dtype"})


class SettingsError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True)
class ModelSettings:
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    prefix_caching: bool | None = None
    kv_cache_dtype: str | None = None
    extra_args: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return self == ModelSettings()

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d["extra_args"] = list(self.extra_args)
        return d

    def args(self) -> list[str]:
        out: list[str] = []
        if self.max_model_len is not None:
            out += ["--max-model-len", str(self.max_model_len)]
        if self.gpu_memory_utilization is not None:
            out += ["--gpu-memory-utilization", f"{self.gpu_memory_utilization:g}"]
        if self.prefix_caching is not None:
            out.append("--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching")
        if self.kv_cache_dtype is not None:
            out += ["--kv-cache-dtype", self.kv_cache_dtype]
        return out + list(self.extra_args)

    def owned(self) -> set[str]:
        """The flags these settings set (to be removed from the entry's own args)."""
        flags = {FLAGS[k] for k in FLAGS if getattr(self, k) is not None}
        if self.prefix_caching is not None:
            flags.add("--no-enable-prefix-caching")
        return flags


def merged(args: tuple[str, ...], s: ModelSettings) -> tuple[str, ...]:
    """The entry's args with the settings' flags in place of its own."""
    owned = s.owned()
    out: list[str] = []
    skip = False
    for word in args:
        if skip:
            skip = False
            continue
        flag = word.split("=", 1)[0].replace("_", "-") if word.startswith("--") else ""
        if flag in owned:
            skip = flag in _VALUED and "=" not in word  # its value is the next word
            continue
        out.append(word)
    return (*out, *s.args())


def parse(patch: Mapping[str, Any], base: ModelSettings, *, remote: bool) -> ModelSettings:
    """`base` with `patch` applied (a None value clears that setting); SettingsError names the field."""
    values = base.public()
    for k, v in patch.items():
        if k not in values:
            raise SettingsError(k, f"unknown setting (expected one of {', '.join(values)})")
        values[k] = v
    mml = values["max_model_len"]
    if mml is not None and (isinstance(mml, bool) or not isinstance(mml, int) or not 16 <= mml <= 10_000_000):
        raise SettingsError("max_model_len", "expected a whole number of tokens from 16 to 10000000")
    gmu = values["gpu_memory_utilization"]
    if gmu is not None and (isinstance(gmu, bool) or not isinstance(gmu, int | float) or not 0 < gmu <= 1):
        raise SettingsError("gpu_memory_utilization", "expected the share of each GPU vLLM may use, above 0, at most 1")
    pc = values["prefix_caching"]
    if pc is not None and not isinstance(pc, bool):
        raise SettingsError("prefix_caching", "expected true or false")
    dt = values["kv_cache_dtype"]
    if dt is not None and (not isinstance(dt, str) or not _DTYPE.fullmatch(dt)):
        raise SettingsError("kv_cache_dtype", "expected a dtype name such as auto, fp8 or fp8_e4m3")
    extra = values["extra_args"] or []
    try:
        words = split_args(extra) if isinstance(extra, str) else extra
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ValueError("expected a list of arguments or one shell-quoted string")
        check_vllm_args(words, remote=remote)
        for w in words:
            if any(not c.isprintable() for c in w):
                raise ValueError("expected printable words")
            flag = w.split("=", 1)[0].replace("_", "-")
            if flag in (*FLAGS.values(), "--no-enable-prefix-caching"):
                name = next((k for k, f in FLAGS.items() if f == flag), "prefix_caching")
                raise ValueError(f"{flag} has its own setting: use {name}")
    except ValueError as e:
        raise SettingsError("extra_args", str(e)) from None
    return ModelSettings(
        max_model_len=mml,
        gpu_memory_utilization=None if gmu is None else float(gmu),
        prefix_caching=pc,
        kv_cache_dtype=dt,
        extra_args=tuple(words),
    )


class Overrides:
    """STATE_DIR/overrides.json: {"models": {name: settings}}. Written atomically at every change; a
    corrupt file is moved aside (JsonStore) and a stored entry that no longer validates is dropped
    with a warning, never half-applied."""

    def __init__(self, store: JsonStore, log: logging.Logger) -> None:
        self._store = store
        self._log = log
        self._mu = threading.Lock()  # the admin API's sync endpoints run in threads
        self._by_name: dict[str, ModelSettings] = {}
        doc = store.load(dict) or {}
        for name, body in (doc.get("models") or {}).items():
            try:
                self._by_name[str(name)] = parse(body if isinstance(body, dict) else {}, ModelSettings(), remote=True)
            except SettingsError as e:
                log.warning("overrides: settings of model %r dropped: %s", name, e)

    def get(self, name: str) -> ModelSettings:
        return self._by_name.get(name, ModelSettings())

    def update(self, entry: ModelEntry, patch: Mapping[str, Any]) -> ModelSettings:
        """Raises SettingsError (nothing changed), or OSError when the file cannot be written (nothing
        changed either: memory follows the file, never the other way round)."""
        with self._mu:
            new = parse(patch, self.get(entry.name), remote=entry.remote is not None)
            after = {k: v for k, v in self._by_name.items() if k != entry.name}
            if not new.empty:
                after[entry.name] = new
            self._save(after)
            self._by_name = after
        self._log.info("settings of model %s: %s (at its next start)", entry.name, " ".join(new.args()) or "none")
        return new

    def applied(self, entry: ModelEntry) -> ModelEntry:
        """The entry as its next start runs it."""
        s = self.get(entry.name)
        if s.empty:
            return entry
        try:  # stored for a remote entry that the catalog has since made local, say
            check_vllm_args(s.extra_args, remote=entry.remote is not None)
        except ValueError as e:
            self._log.warning("settings of model %s: extra_args not used: %s", entry.name, e)
            s = replace(s, extra_args=())
        return replace(entry, args=merged(entry.args, s))

    def _save(self, by_name: Mapping[str, ModelSettings]) -> None:
        self._store.save({"models": {n: s.public() for n, s in sorted(by_name.items())}})
