"""Settings: `config.env` plus environment variables, validated once and passed down.

Precedence (highest first): environment variables, the config file, defaults.
The file is read as data (dotenv syntax), never executed by a shell.
Setting names are the seed's upper-case names; see `config.env.example`.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import socket
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import Field, PrivateAttr, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from watchdog_llm.base.vocab import YieldOn
from watchdog_llm.coordination.catalog import check_vllm_args, split_args
from watchdog_llm.coordination.webhook import parse_urls, validate_url

CONFIG_ENV_VAR = "WATCHDOG_LLM_CONFIG"
DEFAULT_CONFIG = Path("config.env")


MIN_ADMIN_TOKEN_CHARS = 16
MAX_UNIX_PATH = 107  # sun_path holds 108 bytes, the last a NUL


class ConfigError(Exception):
    """A bad setting: the message is one line naming the setting, the value and what is expected."""


class DetectionMode(StrEnum):
    CGROUP = "cgroup"  # Slurm jobs: inotify on their cgroups
    PROCFS = "procfs"  # Slurm jobs: processes in job cgroups, by scanning /proc/<pid>/cgroup
    NVML = "nvml"  # no Slurm: foreign compute processes on our GPUs (NVML)
    HYBRID = "hybrid"  # cgroup (the early signal) + nvml (anything that reaches our GPUs anyway)

    @property
    def jobs(self) -> str | None:
        """The Slurm job detector this mode runs, if any."""
        return {"cgroup": "cgroup", "procfs": "procfs", "hybrid": "cgroup"}.get(self.value)

    @property
    def watches_gpus(self) -> bool:
        return self in (DetectionMode.NVML, DetectionMode.HYBRID)


class TunnelOnYield(StrEnum):
    KEEP = "keep"
    STOP = "stop"


def _secret(default: str, description: str) -> Any:
    """A setting that is a secret though typed str (URLs with a token in them, an ntfy topic, which
    anyone who knows it can read): never echoed in an error, never inherited by a child."""
    return Field(default, description=description, json_schema_extra={"secret": True})


def _is_secret(f: FieldInfo) -> bool:
    extra = f.json_schema_extra
    return f.annotation is SecretStr or (isinstance(extra, dict) and extra.get("secret") is True)


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "watchdog-llm"


class Settings(BaseSettings):
    """Every setting of the daemon. Field names map case-insensitively to the upper-case names."""

    _source: Path | None = PrivateAttr(default=None)
    model_config = SettingsConfigDict(
        case_sensitive=False,
        extra="forbid",
        env_file_encoding="utf-8",
        validate_default=True,
        env_ignore_empty=True,  # `STATE_DIR=` in the file means "the default", not an empty path
    )

    # The model (vLLM)
    llm_bin: str = Field("vllm", description="vLLM executable (name on PATH or path)")
    model_name: str = Field("", description="model to serve: hub id or local path")
    vllm_args: str = Field("", description="extra arguments for `vllm serve`, shell-quoted")
    server_socket: str = Field(
        "auto",
        description="unix socket vLLM listens on (vllm serve --uds): auto = STATE_DIR/model.sock; "
        "off = TCP on SERVER_HOST:SERVER_PORT",
    )
    server_host: str = Field("127.0.0.1", description="address vLLM listens on with SERVER_SOCKET=off")
    server_port: int = Field(
        8000, ge=1, le=65535, description="port vLLM listens on with SERVER_SOCKET=off (taken: another one)"
    )
    num_gpus: int = Field(1, ge=0, le=64, description="GPUs the model uses")
    startup_timeout: float = Field(900.0, gt=0, description="seconds for the model to answer /health")
    health_path: str = Field("/health", description="readiness path of the model server")
    liveness_interval: float = Field(
        5.0, ge=0, le=3600, description="seconds between health checks of a ready model (0: no checks)"
    )
    liveness_timeout: float = Field(3.0, gt=0, le=600, description="a health check slower than this has failed")
    liveness_failures: int = Field(
        3, ge=1, le=100, description="failed health checks in a row that mean hung: restarted like a crash"
    )
    api_key: SecretStr = Field(SecretStr(""), description="old name for one public key (see PUBLIC_API_KEYS)")

    models: str = Field("", description="model catalog: a YAML file or a directory of *.env profiles")
    default_model: str = Field("", description="catalog name or alias served when no swap chose another")

    # Public gateway: the OpenAI-compatible endpoint, and the tunnel's origin
    public_host: str = Field("127.0.0.1", description="address the public gateway listens on")
    public_port: int = Field(8080, ge=1, le=65535, description="port of the public gateway")
    public_api_keys: SecretStr = Field(
        SecretStr(""), description="client keys, `name:key` or `key`, separated by commas or spaces"
    )
    public_api_keys_file: str = Field("", description="file of client keys, one `name:key` per line")
    chat_page: bool = Field(True, description="a chat page at / of the public listener (off: a status page only)")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest request body (413 above)")
    max_concurrent_per_key: int = Field(64, ge=0, description="requests in flight per key (429 above; 0: no limit)")
    upstream_timeout: float = Field(600.0, gt=0, description="longest silence from the model before 504")
    body_timeout: float = Field(30.0, gt=0, le=3600, description="seconds a client has to send its request body")
    max_connections: int = Field(
        1024, ge=1, le=1_000_000, description="open connections per listener (503 and closed above)"
    )
    max_connections_per_peer: int = Field(
        256, ge=1, le=1_000_000, description="open connections from one address (everyone behind the tunnel is one)"
    )
    head_timeout: float = Field(10.0, gt=0, le=300, description="seconds a client has to send a request head (408)")
    keepalive_timeout: float = Field(20.0, ge=1, le=3600, description="seconds an idle keep-alive connection stays")

    # Admin API: status, metrics (and the coordination endpoints)
    admin_host: str = Field("", description="empty: unix socket STATE_DIR/admin.sock (0600); else listen here")
    admin_port: int = Field(8081, ge=1, le=65535, description="admin port when ADMIN_HOST is set")
    admin_token: SecretStr = Field(SecretStr(""), description="bearer token for the admin API over TCP")

    # Coordination: swap lock, webhooks, on-demand swaps
    on_demand: bool = Field(True, description="a request naming another catalog model swaps to it (off: 409)")
    on_demand_wait: float = Field(
        600.0, gt=0, le=86400, description="longest a request waits for the model it named, seconds"
    )
    on_demand_queue: int = Field(64, ge=1, le=100_000, description="requests that may wait for one model (503 above)")
    min_residency: float = Field(
        30.0, ge=0, le=86400, description="seconds a model serves before a request for another may swap it out"
    )
    swap_lock_max_ttl: float = Field(86400.0, gt=0, le=30 * 86400, description="longest swap lock, seconds")
    host_check_interval: float = Field(
        15.0, ge=0, le=3600, description="mode C: seconds between probes of each host and service (0: none)"
    )
    host_check_timeout: float = Field(5.0, gt=0, le=120, description="mode C: a probe slower than this has failed")
    webhook_urls: str = _secret("", "URLs that receive signed event webhooks (commas or spaces)")
    webhook_secret: SecretStr = Field(SecretStr(""), description="HMAC-SHA256 key for X-Spark-Signature")

    # Yield and resume
    detection_mode: DetectionMode = Field(DetectionMode.CGROUP, description="cgroup | procfs | nvml | hybrid")
    cgroup_root: Path = Field(Path("/sys/fs/cgroup"), description="where Slurm job cgroups live")
    poll_interval: float = Field(0.25, gt=0, le=60, description="procfs scan period, seconds")
    stale_job_grace: float = Field(
        10.0, ge=0, le=3600, description="a job dir with no process this long was left by Slurm: ignored (0: never)"
    )
    yield_grace: float = Field(10.0, ge=0, le=600, description="seconds from SIGTERM to SIGKILL")
    resume_cooldown: float = Field(60.0, ge=0, description="seconds with no job before serving again")
    yield_on: YieldOn = Field(YieldOn.AUTO, description="auto | any | overlap")
    idle_release_after: float = Field(0.0, ge=0, description="serving with no request this long: exit 0 (0: never)")

    # GPUs
    gpu_ids: str = Field("", description="physical GPU ids (Slurm IDX) to use, e.g. 2,3; empty: choose")
    gpu_poll_interval: float = Field(1.0, gt=0, le=600, description="NVML scan period for foreign processes")
    nvml_timeout: float = Field(5.0, gt=0, le=120, description="longest wait for one NVML call")
    gpu_release_timeout: float = Field(30.0, ge=0, le=600, description="after a yield, wait this long for NVML")
    gpu_standin: Path | None = Field(None, description="stand-in GPU view (JSON) instead of NVML: demos, tests")
    scontrol_bin: str = Field("scontrol", description="Slurm's scontrol, to read the GPUs of a job")
    scontrol_timeout: float = Field(5.0, gt=0, le=120, description="longest wait for one scontrol call")

    # Restarts after crashes
    restart_backoff_max: float = Field(60.0, gt=0, description="longest wait between restarts, seconds")
    restart_limit: int = Field(5, ge=1, description="fast failures in a row before giving up (failed)")
    min_uptime: float = Field(60.0, ge=0, description="a run shorter than this counts as a fast failure")

    # Notifications
    ntfy_server: str = Field("https://ntfy.sh", description="ntfy server URL")
    ntfy_topic: str = _secret("", "ntfy topic; empty disables ntfy (anyone who knows it can read it)")
    notify_urls: str = _secret("", "extra apprise URLs, separated by spaces or commas")
    notify_coalesce: float = Field(60.0, ge=0, description="window in which notifications are merged")

    # Cloudflare tunnel
    cloudflared_bin: str = Field("cloudflared", description="cloudflared executable")
    tunnel_id: str = Field("", description="named tunnel id (with CLOUDFLARED_CREDS)")
    tunnel_hostname: str = Field("", description="public hostname routed to this node")
    cloudflared_creds: str = Field("", description="tunnel credentials JSON file")
    tunnel_token: SecretStr = Field(SecretStr(""), description="tunnel token (given to cloudflared by environment)")
    tunnel_token_file: str = Field("", description="file holding the tunnel token")
    tunnel_metrics: str = Field("127.0.0.1:0", description="cloudflared --metrics address (port 0: pick one)")
    tunnel_on_yield: TunnelOnYield = Field(TunnelOnYield.KEEP, description="keep | stop the tunnel while yielded")

    # Daemon
    state_dir: Path = Field(default_factory=default_state_dir, description="status, logs, pid records")
    node_name: str = Field(default_factory=lambda: socket.gethostname(), description="name in messages")
    log_level: str = Field("INFO", description="DEBUG | INFO | WARNING | ERROR")
    tree_scan_interval: float = Field(30.0, gt=0, le=3600, description="how often a serving model's tree is recorded")

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("expected one of DEBUG, INFO, WARNING, ERROR")
        return v

    @field_validator("vllm_args")
    @classmethod
    def _shell_words(cls, v: str) -> str:
        check_vllm_args(split_args(v))  # one rule for VLLM_ARGS and every catalog entry
        return v

    @field_validator("webhook_urls")
    @classmethod
    def _webhooks(cls, v: str) -> str:
        for n, url in enumerate(parse_urls(v), 1):
            validate_url(url, n)
        return v

    @field_validator("gpu_ids")
    @classmethod
    def _gpu_ids(cls, v: str) -> str:
        try:
            parse_id_list(v)
        except ValueError as e:
            raise ValueError(f"expected GPU ids like 0,1 or 2-3 ({e})") from None
        return v

    @field_validator("ntfy_topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        # ntfy's own rule; apprise would otherwise cut "my topic!" to "my" and deliver it there.
        if v and not NTFY_TOPIC_RE.fullmatch(v):
            raise ValueError("an ntfy topic is 1 to 64 letters, digits, '_' or '-'")
        return v

    @field_validator("ntfy_server")
    @classmethod
    def _url(cls, v: str) -> str:
        if v and not v.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return v.rstrip("/")

    @field_validator("health_path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("expected a path starting with /")
        return v

    @field_validator("server_socket")
    @classmethod
    def _socket(cls, v: str) -> str:
        if v.lower() in ("auto", "off"):
            return v.lower()
        if not v.startswith("/"):
            raise ValueError("expected auto, off or an absolute path")
        return v

    @field_validator("tunnel_metrics")
    @classmethod
    def _hostport(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:20241")
        return v

    @model_validator(mode="after")
    def _listeners(self) -> Settings:
        if self.admin_host and not self.admin_token.get_secret_value():
            raise ValueError("ADMIN_HOST needs ADMIN_TOKEN: over TCP every user of the node could reach the admin API")
        if self.admin_token.get_secret_value() and len(self.admin_token.get_secret_value()) < MIN_ADMIN_TOKEN_CHARS:
            raise ValueError(f"ADMIN_TOKEN is too short (at least {MIN_ADMIN_TOKEN_CHARS} characters)")
        ports = {"SERVER_PORT": self.server_port} if self.model_socket is None else {}  # a socket: no port
        ports["PUBLIC_PORT"] = self.public_port
        if self.admin_host:
            ports["ADMIN_PORT"] = self.admin_port
        if len(set(ports.values())) < len(ports):
            raise ValueError(f"{', '.join(f'{k}={v}' for k, v in ports.items())}: each needs its own port")
        return self

    @model_validator(mode="after")
    def _socket_fits(self) -> Settings:
        path = self.model_socket
        if path is not None and len(os.fsencode(path)) > MAX_UNIX_PATH:
            raise ValueError(
                f"SERVER_SOCKET: {str(path)!r} is {len(os.fsencode(path))} bytes, more than the {MAX_UNIX_PATH} a "
                "unix socket path may have: set SERVER_SOCKET to a shorter path (or a shorter STATE_DIR)"
            )
        return self

    @model_validator(mode="after")
    def _tunnel_pairs(self) -> Settings:
        if self.tunnel_token.get_secret_value() and self.tunnel_token_file:
            raise ValueError("TUNNEL_TOKEN and TUNNEL_TOKEN_FILE: set one, not both")
        if self.tunnel_id and not self.cloudflared_creds and not self.tunnel_token_credential:
            raise ValueError("TUNNEL_ID needs CLOUDFLARED_CREDS (credentials file) or a tunnel token")
        return self

    # Derived values: computed here once so no other module re-parses settings.
    @property
    def gpu_id_set(self) -> frozenset[int] | None:
        return frozenset(parse_id_list(self.gpu_ids)) if self.gpu_ids.strip() else None

    @property
    def vllm_argv(self) -> list[str]:
        return shlex.split(self.vllm_args)

    @property
    def tunnel_token_credential(self) -> bool:
        return bool(self.tunnel_token.get_secret_value() or self.tunnel_token_file)

    @property
    def tunnel_enabled(self) -> bool:
        return bool(self.tunnel_token_credential or (self.tunnel_id and self.cloudflared_creds))

    @property
    def notify_url_list(self) -> list[str]:
        urls = [u for u in self.notify_urls.replace(",", " ").split() if u]
        if self.ntfy_topic:
            urls.insert(0, ntfy_url(self.ntfy_server, self.ntfy_topic))
        return urls

    @property
    def model_base_url(self) -> str:
        return local_url(self.server_host, self.server_port)

    @property
    def public_base_url(self) -> str:
        """Where the gateway is reached on this node (the tunnel's origin)."""
        return local_url(self.public_host, self.public_port)

    @property
    def admin_socket(self) -> Path:
        return self.state_dir / "admin.sock"

    @property
    def dashboard_socket(self) -> Path:
        """The admin app again, gated (token or dashboard session): what `watchdog-llm dashboard` forwards to."""
        return self.state_dir / "dashboard.sock"

    @property
    def model_socket(self) -> Path | None:
        """The unix socket vLLM listens on; None: TCP (SERVER_SOCKET=off)."""
        if self.server_socket == "off":
            return None
        return self.state_dir / "model.sock" if self.server_socket == "auto" else Path(self.server_socket)

    @property
    def config_file(self) -> Path | None:
        """The file these settings were read from; None: the environment and defaults only."""
        return self._source


def local_url(host: str, port: int) -> str:
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"http://{host}:{port}"


def parse_id_list(text: str) -> list[int]:
    """'0,2-3' -> [0, 2, 3]: the form of GPU_IDS, SLURM_JOB_GPUS and Slurm's IDX lists."""
    ids: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{part!r} is not a number or a range")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first or last - first > 1024:
            raise ValueError(f"{part!r} is not a valid range")
        ids.extend(range(first, last + 1))
    return sorted(set(ids))


# Derived from the fields: never echoed in an error, removed from every child's inherited environment.
SECRET_SETTINGS = frozenset(name.upper() for name, f in Settings.model_fields.items() if _is_secret(f))


NTFY_TOPIC_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def ntfy_url(server: str, topic: str) -> str:
    """NTFY_SERVER + NTFY_TOPIC as an apprise URL: ntfys://host/topic for https, ntfy:// for http."""
    scheme, _, rest = server.partition("://")
    return f"{'ntfys' if scheme == 'https' else 'ntfy'}://{rest.rstrip('/')}/{quote(topic, safe='')}"


def config_path(cli_path: str | None) -> Path:
    if cli_path:
        return Path(cli_path)
    return Path(os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG)


def _field_names() -> list[str]:
    return [name.upper() for name in Settings.model_fields]


def misspelled_env(environ: Mapping[str, str]) -> list[str]:
    """Environment variables that look like a misspelled setting, each with its likely name.

    The environment holds many variables that are not ours, so unlike the file (extra="forbid") an
    unknown name there cannot be an error; one very close to a setting's name (RESUME_COOLDOWM) is
    almost surely a typo that would otherwise be silently ignored.
    """
    names = _field_names()
    out = []
    for var in sorted(environ):
        if var.isupper() and var not in names:
            hint = difflib.get_close_matches(var, names, n=1, cutoff=0.85)
            if hint:
                out.append(f"{var} in the environment is not a setting (did you mean {hint[0]}?)")
    return out


def _describe(err: dict[str, Any], source: Path | None) -> str:
    loc = str(err["loc"][0]).upper() if err.get("loc") else ""
    where = f" in {source}" if source else ""
    if err["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(loc, _field_names(), n=1)
        suggestion = f" (did you mean {hint[0]}?)" if hint else ""
        return f"unknown setting {loc}{where}{suggestion}"
    value = "<hidden>" if loc in SECRET_SETTINGS else err.get("input")
    if loc and loc in {k.upper() for k in os.environ}:
        where = " (from the environment)"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if "API_KEY" in msg:  # a key typed into VLLM_ARGS by mistake: do not echo it back
        value = "<hidden>"
    if not loc:  # model-level check: the message names the settings itself
        return f"bad settings{where}: {msg}"
    return f"bad setting {loc}={value!r}{where}: {msg}"


def load(cli_path: str | None = None, *, require_file: bool = False) -> Settings:
    """Build Settings once. Raises ConfigError with one line per problem (first problem first)."""
    path = config_path(cli_path)
    explicit = bool(cli_path or os.environ.get(CONFIG_ENV_VAR))
    env_file: Path | None = path
    if not path.exists():
        if explicit or require_file:
            raise ConfigError(f"config file {path} not found (from --config or {CONFIG_ENV_VAR})")
        env_file = None
    elif not path.is_file() or not os.access(path, os.R_OK):
        raise ConfigError(f"config file {path} is not a readable file")
    try:
        settings = Settings(_env_file=env_file)  # type: ignore[call-arg]
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}): {e.reason}") from None
    except ValidationError as e:
        lines = [_describe(dict(err), env_file) for err in e.errors()]
        raise ConfigError("\n".join(lines)) from None
    settings._source = env_file.resolve() if env_file else None
    return settings
