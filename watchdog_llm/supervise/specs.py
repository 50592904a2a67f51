"""What to run: the model server and the Cloudflare tunnel, built from Settings in one place."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog_llm.config import MAX_UNIX_PATH, SECRET_SETTINGS, Settings, local_url
from watchdog_llm.coordination import catalog
from watchdog_llm.coordination.catalog import Catalog, ModelEntry, fill
from watchdog_llm.coordination.hosts import Host
from watchdog_llm.supervise.child import ChildSpec
from watchdog_llm.supervise.probes import Address, HttpProbe, Liveness, port_in_use

# Secrets the daemon holds that no child needs: removed from inherited environments.
_DAEMON_SECRETS = SECRET_SETTINGS | {"VLLM_API_KEY"}
# Never inherited by the model: vLLM's dev mode adds /sleep, /wake_up, /collective_rpc and
# /reset_prefix_cache, open to whoever reaches its port. The daemon needs none of them; a catalog
# entry's own env may still set it (an operator's explicit choice).
_NOT_INHERITED = frozenset({"VLLM_SERVER_DEV_MODE"})


def _base_env(drop: frozenset[str] = frozenset()) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.upper() not in _DAEMON_SECRETS | drop}
    env["PYTHONUNBUFFERED"] = "1"  # log lines reach our log file as they happen
    return env


def model_address(s: Settings, port: int | None = None) -> Address:
    """Where the model listens: its unix socket, or SERVER_HOST and `port` (default SERVER_PORT)."""
    sock = s.model_socket
    if sock is not None:
        return Address("http://localhost", str(sock))
    port = port or s.server_port
    return Address(local_url(s.server_host, port), port=port)


def resolve_bin(name: str) -> str | None:
    """Absolute path of an executable given as a name on PATH or a path; None if not runnable."""
    found = shutil.which(name)
    return os.path.abspath(found) if found else None


def catalog_defaults(s: Settings) -> catalog.Defaults:
    return catalog.Defaults(gpus=s.num_gpus, health_path=s.health_path, startup_timeout=s.startup_timeout)


def load_catalog(s: Settings) -> Catalog:
    """MODELS (a YAML file or a directory of *.env profiles), or MODEL_NAME/VLLM_ARGS. Raises CatalogError."""
    return catalog.load(s.models, s.default_model, catalog_defaults(s), model_name=s.model_name, vllm_args=s.vllm_args)


def settings_entry(s: Settings) -> ModelEntry:
    """MODEL_NAME with VLLM_ARGS as a catalog entry (the model of a config.env without MODELS)."""
    return catalog.single(s.model_name or "model", s.vllm_args, catalog_defaults(s)).entries[0]


def model_argv(s: Settings, llm_bin: str, entry: ModelEntry | None = None, addr: Address | None = None) -> list[str]:
    e = entry or settings_entry(s)
    at = addr or model_address(s)
    where = ["--uds", at.uds] if at.uds else ["--host", s.server_host, "--port", str(at.port)]
    argv = [llm_bin, "serve", e.model, *e.args, *where]
    if e.gpus > 1 and not any(a.split("=", 1)[0] in ("--tensor-parallel-size", "-tp") for a in e.args):
        argv[3:3] = ["--tensor-parallel-size", str(e.gpus)]
    return argv


def model_spec(
    s: Settings,
    llm_bin: str,
    api_key: Callable[[], str],
    entry: ModelEntry | None = None,
    addr: Address | None = None,
) -> ChildSpec:
    """`api_key` gives the internal key of the run being started: each start passes a fresh one as
    VLLM_API_KEY in its environment (argv is world-readable on a shared node)."""
    e = entry or settings_entry(s)
    a = addr or model_address(s)
    env = {**_base_env(_NOT_INHERITED), **e.env}
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # Slurm's GPU indices are in PCI bus order
    # vLLM's API server and engine talk over ZMQ ipc sockets made in VLLM_RPC_BASE_PATH (default
    # /tmp, with the process umask): in our 0700 STATE_DIR no other user can reach them. Each is
    # <dir>/<uuid4>, and must fit a unix socket path; vLLM leaves them behind, so each start clears
    # what the last one left.
    rpc_dir = None
    if "VLLM_RPC_BASE_PATH" not in env and len(os.fsencode(s.state_dir)) + 1 + _UUID_LEN <= MAX_UNIX_PATH:
        rpc_dir = s.state_dir
        env["VLLM_RPC_BASE_PATH"] = str(rpc_dir)
    if s.gpu_standin is not None:  # the stand-in model announces its GPU contexts to the stand-in NVML
        env["WATCHDOG_LLM_GPU_STANDIN"] = str(s.gpu_standin)
    base = a.base_url

    def preflight() -> str | None:
        if rpc_dir is not None:
            _clear_rpc_sockets(rpc_dir)
        if a.uds:
            return _clear_socket(Path(a.uds))
        if a.port is not None and port_in_use(s.server_host, a.port):
            return f"SERVER_PORT {a.port} is already in use by another process"
        return None

    probe, live = _probes(s, base, e.health_path, api_key)
    argv = tuple(model_argv(s, llm_bin, e, a))
    return ChildSpec("model", argv, env, probe, preflight, liveness=live, uds=a.uds)


def _probes(s: Settings, base: str, health: str, api_key: Callable[[], str]) -> tuple[HttpProbe, Liveness | None]:
    """Readiness (health, then /v1/models with the run's key: the server is ours) and liveness."""
    probe = HttpProbe(
        url=base + health,
        confirm_url=base + "/v1/models",
        confirm_headers=lambda: {"Authorization": f"Bearer {api_key()}"},
    )
    live = None
    if s.liveness_interval > 0:
        live = Liveness(base + health, s.liveness_interval, s.liveness_timeout, s.liveness_failures)
    return probe, live


def remote_address(e: ModelEntry) -> Address:
    assert e.remote is not None
    return Address(e.remote.base_url)


def remote_spec(s: Settings, api_key: Callable[[], str], e: ModelEntry, host: Host, name: str = "model") -> ChildSpec:
    """A remote entry's child: the local runner (watchdog_llm.remote.runner) that drives the server on
    `host` over SSH. Its job travels in its environment; the internal key (VLLM_API_KEY, added at
    each start) and the entry's env go on to the host on stdin, never on a command line."""
    from watchdog_llm.remote.runner import SPEC_ENV, Job  # the runner's own module: its job format

    r = e.remote
    assert r is not None
    job = Job(
        host=host,
        state_dir=s.state_dir,
        start=fill(r.start, e),
        stop=fill(r.stop, e),
        logs=fill(r.logs, e),
        forward=["VLLM_API_KEY", *sorted(e.env)],
        stop_timeout=REMOTE_STOP_S,
    )
    env = {**_base_env(), **e.env, SPEC_ENV: job.to_env()}
    probe, live = _probes(s, r.base_url, e.health_path, api_key)
    argv = (sys.executable, "-m", "watchdog_llm.remote.runner", e.name, host.name)  # names only: for ps
    # A remote entry never yields (this node's jobs are not its host's), so its stop is the host's
    # pace: `docker stop` waits 10 s by default. The runner gets a little more, to end its channels.
    return ChildSpec(name, argv, env, probe, liveness=live, grace=REMOTE_STOP_S + 3)


REMOTE_STOP_S = 30.0  # a remote stop command's budget
_UUID_LEN = 36
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _clear_rpc_sockets(directory: Path) -> None:
    """The ZMQ ipc sockets (named by a uuid4) an earlier vLLM left in `directory`: nothing else."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if _UUID.fullmatch(entry.name) and stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _clear_socket(path: Path) -> str | None:
    """vLLM binds its socket path and fails if anything is there: remove what an earlier run left
    (the directory is ours alone); anything but a socket is not ours to remove."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"SERVER_SOCKET {str(path)!r}: {e.strerror or e}"
    if not stat.S_ISSOCK(st.st_mode):
        return f"SERVER_SOCKET {str(path)!r} exists and is not a socket: remove it or choose another path"
    try:
        path.unlink()
    except OSError as e:
        return f"SERVER_SOCKET {str(path)!r}: cannot remove the old socket: {e.strerror or e}"
    return None


def tunnel_config(s: Settings) -> dict[str, Any]:
    """cloudflared's config for a named tunnel: everything for our hostname goes to the public gateway
    (never to vLLM itself, nor to the admin API)."""
    rules: list[dict[str, str]] = []
    if s.tunnel_hostname:
        rules.append({"hostname": s.tunnel_hostname, "service": s.public_base_url})
    else:
        rules.append({"service": s.public_base_url})
    if s.tunnel_hostname:
        rules.append({"service": "http_status:404"})
    return {"tunnel": s.tunnel_id, "credentials-file": s.cloudflared_creds, "ingress": rules}


def tunnel_spec(s: Settings, cloudflared_bin: str, metrics: str, config_file: Path | None) -> ChildSpec:
    """`cloudflared tunnel run`; a token travels by environment or file name, never on argv."""
    env = _base_env()
    argv = [cloudflared_bin, "tunnel", "--no-autoupdate", "--metrics", metrics]
    if config_file is not None:
        argv += ["--config", str(config_file)]
    argv.append("run")
    if token := s.tunnel_token.get_secret_value():
        env["TUNNEL_TOKEN"] = token
    elif s.tunnel_token_file:
        argv += ["--token-file", s.tunnel_token_file]
    elif s.tunnel_id:
        argv.append(s.tunnel_id)
    return ChildSpec("tunnel", tuple(argv), env, HttpProbe(url=f"http://{metrics}/ready"))
