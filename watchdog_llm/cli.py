"""Command line: `watchdog-llm [--config PATH] run|status|doctor|notify-test|demo|models|swap|lock|schedule`.

The only module that chooses exit codes:
  0 success (run: stopped on request; swap --wait: the model is ready)
  1 failure at run time / check failed / the daemon refused the request (unknown model 404, a swap
    under way 409, the swap lock held 423, the daemon stopping 503, bad input 400/422) / the swap failed
  2 bad configuration or cannot start (also: a bad model catalog, an unreadable or empty token file)
  3 the daemon is not running (status, models, swap, lock, schedule; `status --json` and `models`
    still print what they know)
  4 swap --wait: --timeout ran out before the swap ended (it goes on in the daemon)
  130 interrupted (Ctrl-C; swap --wait: the swap goes on in the daemon)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from watchdog_llm import __version__, config
from watchdog_llm.base.ids import format_ids as _ids
from watchdog_llm.base.vocab import NotifyKind

if TYPE_CHECKING:
    from watchdog_llm.admin_client import AdminClient, AdminError

EXIT_OK, EXIT_FAIL, EXIT_CONFIG, EXIT_NOT_RUNNING, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
LOCK_TOKEN_ENV = "WATCHDOG_LLM_LOCK_TOKEN"
SWAP_WAIT_DEFAULT = 1800.0
_TOKEN_NOTE = (
    f"Command lines are visible to every user of the node (ps): prefer --token-file or ${LOCK_TOKEN_ENV} to --token"
)


_CONFIG_HELP = f"config file (default: ${config.CONFIG_ENV_VAR} or ./config.env)"


def _command(sub: Any, name: str, **kw: Any) -> argparse.ArgumentParser:
    """A subcommand that also takes --config after its name (`watchdog-llm run --config FILE`).

    SUPPRESS as its default: a subcommand given no --config leaves the one before it in place.
    """
    cmd: argparse.ArgumentParser = sub.add_parser(name, **kw)
    cmd.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=_CONFIG_HELP)
    return cmd


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="watchdog-llm",
        description="Serve an LLM on idle GPUs; yield to Slurm jobs in milliseconds; come back when free.",
    )
    p.add_argument("--config", metavar="PATH", help=_CONFIG_HELP)
    p.add_argument("--version", action="version", version=f"watchdog-llm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _command(sub, "run", help="run the daemon in the foreground (sbatch, tmux, systemd)")
    st = _command(sub, "status", help="show the running daemon's state")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    doc = _command(sub, "doctor", help="check config, cgroup layouts, binaries, GPUs, notifications")
    doc.add_argument("--send", action="store_true", help="also send a test notification")
    _command(sub, "notify-test", help="send a test notification to every configured URL")
    demo = _command(sub, "demo", help="run the daemon against a stand-in model and a scratch cgroup tree")
    demo.add_argument("--keep", action="store_true", help="keep the scratch directory afterwards")
    demo.add_argument("--real", action="store_true", help="the same with the real vLLM (see `make real-vllm`)")
    demo.add_argument("--vllm", metavar="PATH", help="the vllm command for --real (default: make real-vllm's)")
    demo.add_argument("--model", metavar="DIR", help="a local model directory for --real (default: the tiny one)")
    dash = _command(
        sub,
        "dashboard",
        help="print a one-time sign-in link to the operator dashboard (and forward a local port to it)",
        description="Print a sign-in link for the dashboard on the admin listener; it works once, for 5 "
        "minutes, and signs a browser in for 12 hours. With the admin API on its unix socket (no ADMIN_HOST), "
        "this command also forwards 127.0.0.1:PORT to the dashboard until Ctrl-C.",
    )
    dash.add_argument(
        "--port",
        type=int,
        default=None,
        metavar="PORT",
        help="local port to forward (default: ADMIN_PORT, or a free one when that is taken; 0: a free one)",
    )
    _coordination_parsers(sub)
    rl = _command(
        sub,
        "reload",
        help="read the catalog file again (or send the daemon SIGUSR1); the serving model keeps running",
    )
    rl.add_argument("--json", action="store_true", help="machine-readable output")
    tn = _command(
        sub,
        "tune",
        help="a model's settings that persist (STATE_DIR/overrides.json); they apply at its next start",
        description="Show or change a model's settings. Each option sets one (`none` clears it); the others "
        "stay. They replace the same flags in the catalog's args, and apply when the model next starts.",
    )
    tn.add_argument("model", metavar="MODEL", help="catalog name or alias")
    tn.add_argument("--max-model-len", metavar="TOKENS|none", help="--max-model-len")
    tn.add_argument("--gpu-memory-utilization", metavar="SHARE|none", help="--gpu-memory-utilization (0-1]")
    tn.add_argument("--prefix-caching", metavar="on|off|none", help="--enable-prefix-caching, or --no-...")
    tn.add_argument("--kv-cache-dtype", metavar="DTYPE|none", help="--kv-cache-dtype (auto, fp8, ...)")
    tn.add_argument("--extra-args", metavar="ARGS|none", help="more vllm serve arguments, shell-quoted")
    tn.add_argument("--reset", action="store_true", help="clear every setting of this model")
    tn.add_argument("--json", action="store_true", help="machine-readable output")
    sv = _command(
        sub,
        "service",
        help="the always-on services (mode C): list them, or start, stop or restart one",
    )
    sv.add_argument("name", metavar="NAME", nargs="?", help="a service (an always_on entry of the catalog)")
    sv.add_argument("action", nargs="?", choices=["start", "stop", "restart"], help="what to do (default: show)")
    sv.add_argument("--json", action="store_true", help="machine-readable output")
    dl = _command(
        sub,
        "download",
        help="download a model from the hub (HF_ENDPOINT, HF_TOKEN), here or on a host, with progress",
        description="Download ORG/NAME into the hub's cache (where `vllm serve ORG/NAME` finds it), on this "
        "node or on a host of the catalog, following its progress. Ctrl-C cancels it; the files it finished "
        "stay, and the next download of the repo resumes from them.",
    )
    dl.add_argument("repo", metavar="REPO", nargs="?", help="ORG/NAME")
    dl.add_argument("--revision", metavar="REV", help="branch, tag or commit (default: main)")
    dl.add_argument("--host", metavar="NAME", help="download on this host of the catalog (default: here)")
    dl.add_argument("--cancel", metavar="ID", help="cancel a running download")
    dl.add_argument("--list", action="store_true", help="list downloads")
    dl.add_argument("--json", action="store_true", help="machine-readable output (the final record)")
    from watchdog_llm import hosts_cli

    hosts_cli.add_parsers(sub, _command)
    return p


def _token_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--token", metavar="TOKEN", help="the swap lock's token (other users can read it in ps)")
    g.add_argument(
        "--token-file", metavar="PATH", help=f"read the swap lock's token from PATH (else ${LOCK_TOKEN_ENV})"
    )


def _coordination_parsers(sub: Any) -> None:
    m = _command(sub, "models", help="list the model catalog and which model is active")
    m.add_argument("--json", action="store_true", help="machine-readable output")

    sw = _command(
        sub,
        "swap",
        help="swap the served model (POST /api/swap)",
        description="Swap the served model. While the swap lock is held, pass its token: "
        f"--token-file PATH or ${LOCK_TOKEN_ENV}. {_TOKEN_NOTE}.",
    )
    sw.add_argument("model", metavar="MODEL", help="catalog name or alias")
    sw.add_argument("--wait", action="store_true", help="follow the model's log until the swap is ready or failed")
    sw.add_argument(
        "--timeout",
        type=_seconds,
        default=SWAP_WAIT_DEFAULT,
        metavar="S",
        help=f"with --wait: give up waiting after S seconds (default {SWAP_WAIT_DEFAULT:g}; the swap goes on)",
    )
    sw.add_argument("--json", action="store_true", help="print the swap record as JSON (log lines go to stderr)")
    _token_args(sw)

    lk = _command(sub, "lock", help="the swap lock: acquire, status, extend, release")
    lsub = lk.add_subparsers(dest="lock_command", required=True, metavar="ACTION")
    acq = _command(
        lsub,
        "acquire",
        help="take the swap lock; prints its token once",
        description="Take the swap lock. The token is printed once (stdout), or written to --token-file "
        "with mode 0600. Anyone with the token can swap models and release the lock: keep it private.",
    )
    acq.add_argument("--holder", required=True, help="who holds it (shown to everyone)")
    acq.add_argument("--ttl", type=_seconds, required=True, metavar="SECONDS", help="expires after this long")
    acq.add_argument("--reason", default="", help="why (shown to everyone)")
    acq.add_argument("--token-file", metavar="PATH", help="write the token to PATH (mode 0600) instead of printing it")
    acq.add_argument("--json", action="store_true", help="machine-readable output")
    ls = _command(lsub, "status", help="who holds the swap lock, until when")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ext = _command(
        lsub,
        "extend",
        help="extend the swap lock you hold (needs its token)",
        description=f"Extend the swap lock to now + --ttl. Needs its token. {_TOKEN_NOTE}.",
    )
    ext.add_argument("--ttl", type=_seconds, required=True, metavar="SECONDS", help="expires this long from now")
    ext.add_argument("--reason", default="", help="a new reason (default: keep the old one)")
    ext.add_argument("--json", action="store_true", help="machine-readable output")
    _token_args(ext)
    rel = _command(
        lsub,
        "release",
        help="release the swap lock (its token, or --force)",
        description=f"Release the swap lock with its token, or anyone's with --force. {_TOKEN_NOTE}.",
    )
    rel.add_argument("--force", action="store_true", help="release it whoever holds it (logged, notified, webhooked)")
    rel.add_argument("--json", action="store_true", help="machine-readable output")
    _token_args(rel)

    sc = _command(sub, "schedule", help="the schedule registry (what external schedulers will do)")
    ssub = sc.add_subparsers(dest="schedule_command", required=True, metavar="ACTION")
    sl = _command(ssub, "list", help="list the registered schedule entries")
    sl.add_argument("--json", action="store_true", help="machine-readable output")


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0 seconds")
    return v


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from watchdog_llm.demo import find_real, run_demo

        if not (args.real or args.vllm or args.model):  # either of those means --real
            return run_demo(keep=args.keep)
        real = find_real(args.vllm, args.model)
        if isinstance(real, str):
            print(real, file=sys.stderr)
            return 2
        return run_demo(keep=args.keep, real=real)
    try:
        settings = config.load(args.config)
    except config.ConfigError as e:
        for line in str(e).splitlines():
            print(f"watchdog-llm: {line}", file=sys.stderr)
        return EXIT_CONFIG
    handler = {
        "run": _run,
        "status": _status,
        "doctor": _doctor,
        "notify-test": _notify_test,
        "models": _models,
        "swap": _swap,
        "lock": _lock,
        "schedule": _schedule,
        "dashboard": _dashboard,
        "reload": _reload,
        "tune": _tune,
        "download": _download,
        "service": _service,
        "ssh-key": _hosts_cli("ssh_key"),
        "hosts": _hosts_cli("hosts"),
    }[args.command]
    if args.command == "run":
        return handler(settings, args)
    try:
        return handler(settings, args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `watchdog-llm swap --wait | head`: the reader went away
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_FAIL


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        stream=sys.stderr,
    )
    # Health probes run every 0.5 s while a model loads; one INFO line each would drown the log.
    logging.getLogger("httpx").setLevel(logging.WARNING)


DAEMON_LOG = "daemon.log"
DAEMON_LOG_BYTES = 10 << 20  # one file and one backup: the last ~20 MiB of the daemon's own log


def _log_to_state_dir(s: config.Settings) -> None:
    """The daemon's own log in STATE_DIR/logs/daemon.log, size-capped, in every launch mode: a daemon
    that dies at start in a tmux session that closes, or under nohup, still leaves its reason."""
    from logging.handlers import RotatingFileHandler

    from watchdog_llm.app import prepare_state_dir

    prepare_state_dir(s.state_dir)  # ours alone (mode, owner) before anything is written there
    handler = RotatingFileHandler(s.state_dir / "logs" / DAEMON_LOG, maxBytes=DAEMON_LOG_BYTES, backupCount=1)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    logging.getLogger().addHandler(handler)


def _run(s: config.Settings, args: argparse.Namespace) -> int:
    from watchdog_llm.app import StartupError, serve

    _setup_logging(s.log_level)
    log = logging.getLogger("watchdog_llm")
    try:
        _log_to_state_dir(s)
        for typo in config.misspelled_env(os.environ):
            log.warning("%s", typo)
        return asyncio.run(serve(s))
    except StartupError as e:
        log.error("cannot start: %s", e)
        return EXIT_CONFIG
    except KeyboardInterrupt:  # only before the signal handlers are installed
        return EXIT_OK


def _live_status(s: config.Settings) -> dict[str, Any] | None:
    """The running daemon's status from its admin API; None when it cannot be asked."""
    from watchdog_llm.admin_client import AdminClient, AdminError

    try:
        data = AdminClient(s, timeout=2.0).get("/api/status")
    except AdminError:
        return None
    return data if isinstance(data, dict) else None


def _status(s: config.Settings, args: argparse.Namespace) -> int:
    from watchdog_llm import status

    path = s.state_dir / status.STATUS_FILE
    data = _live_status(s)  # live from the daemon; its status file when it does not answer
    if data is None:
        try:
            data = status.read(path)
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError) as e:
            print(f"watchdog-llm: cannot read {path}: {e}", file=sys.stderr)
            return EXIT_FAIL
    running = bool(data) and status.daemon_alive(data)
    if args.json:
        print(json.dumps({"running": running, **data}, indent=2, sort_keys=True))
        return EXIT_OK if running else EXIT_NOT_RUNNING
    if not data:
        print(f"not running (no status in {s.state_dir}; config: {_config_line(s.config_file)})")
        return EXIT_NOT_RUNNING
    print(_human_status(data, running))
    return EXIT_OK if running else EXIT_NOT_RUNNING


def _ago(t: Any) -> str:
    if not isinstance(t, int | float):
        return "?"
    d = max(0.0, time.time() - t)
    return f"{d:.0f} s ago" if d < 120 else f"{d / 60:.0f} min ago" if d < 7200 else f"{d / 3600:.1f} h ago"


def _config_line(path: object) -> str:
    return str(path) if path else "none (environment and defaults only)"


def _jobs(d: dict[str, Any]) -> str:
    """Jobs, with their GPUs where scontrol told them (YIELD_ON=overlap)."""
    known = (d.get("gpus") or {}).get("job_gpus") or {}
    out = []
    for job in d.get("jobs") or []:
        if job in known:
            gpus = known[job]
            out.append(
                f"{job} (GPUs unknown)" if gpus is None else f"{job} (GPU {_ids(gpus)})" if gpus else f"{job} (no GPUs)"
            )
        else:
            out.append(job)
    return ", ".join(out) or "none"


def _human_status(d: dict[str, Any], running: bool) -> str:
    head = f"{d.get('state', '?')} since {_ago(d.get('since'))}"
    if not running:
        head = f"not running (last state: {head})"
    lines = [
        f"watchdog-llm on {d.get('node', '?')}: {head}",
        f"  reason:  {d.get('reason', '')}",
        f"  config:  {_config_line(d.get('config'))}",
        f"  model:   {_model_name(d)} at {d.get('model_url', '')}  pids {d.get('model_pids') or '-'}",
        f"  public:  {d.get('public_url', '?')}  admin: {d.get('admin', '?')}",
        f"  jobs:    {_jobs(d)}",
    ]
    if cat := d.get("catalog"):
        shown = [f"{e['name']} {e['state']}" + (f" ({e['waiting']} waiting)" if e.get("waiting") else "") for e in cat]
        lines.append(f"  models:  {', '.join(shown)}")
    if svcs := d.get("services"):
        lines.append("  services: " + ", ".join(f"{v['name']} {v['state']} on {v.get('host')}" for v in svcs))
    if sw := d.get("swap"):
        lines.append(f"  swap:    {_swap_line(sw)}")
    if (lk := d.get("lock")) and lk.get("locked"):
        lines.append(f"  lock:    {_lock_line(lk)}")
    if (g := d.get("gpus")) and (g.get("ours") or g.get("fixed") or g.get("choose_from")):
        busy = f"; foreign processes on {_ids(g['busy'])}" if g.get("busy") else ""
        lines.append(f"  GPUs:    ours {_ids(g.get('ours'))} (yield on {g.get('yield_on')}; {g.get('view')}){busy}")
    if y := d.get("last_yield"):
        detect = f"{y['detect_ms']:.1f} ms" if y.get("detect_ms") is not None else "?"
        stop = f"{y['stop_ms']:.0f} ms" if y.get("stop_ms") is not None else "in progress"
        freed = f", GPU memory free in {y['gpu_release_ms']:.0f} ms" if y.get("gpu_release_ms") is not None else ""
        who = y.get("cause") or y.get("job")
        lines.append(
            f"  yielded: to {who} {_ago(y.get('detected_at'))}: detected in {detect}, tree gone in {stop}{freed}"
        )
    if t := d.get("tunnel"):
        lines.append(f"  tunnel:  {t.get('state')} {t.get('url') or ''}")
    if n := d.get("notifications"):
        lines.append(f"  notices: {n.get('sent', 0)} sent, {n.get('failed', 0)} failed")
    return "\n".join(lines)


def _notify_test(s: config.Settings, args: argparse.Namespace) -> int:
    from watchdog_llm.notify import Message, NotifyConfigError, parse_urls, send_once

    _setup_logging(s.log_level)
    urls = s.notify_url_list
    if not urls:
        print("watchdog-llm: no notification URL: set NTFY_TOPIC or NOTIFY_URLS", file=sys.stderr)
        return EXIT_CONFIG
    try:
        parse_urls(urls)
    except NotifyConfigError as e:
        print(f"watchdog-llm: {e}", file=sys.stderr)
        return EXIT_CONFIG
    msg = Message(NotifyKind.TEST, "watchdog-llm test", "If you can read this, alerts reach you.", "low")
    ok = asyncio.run(send_once(urls, msg, log=logging.getLogger("watchdog_llm"), node=s.node_name))
    print("sent" if ok else "sending failed (see the log above)")
    return EXIT_OK if ok else EXIT_FAIL


def _doctor(s: config.Settings, args: argparse.Namespace) -> int:
    from watchdog_llm.doctor import run_doctor

    _setup_logging("WARNING")
    return EXIT_OK if run_doctor(s, send=args.send, out=sys.stdout, environ=dict(os.environ)) else EXIT_FAIL


# ---- coordination: models, swap, lock, schedule --------------------------------------------------


class _ArgError(Exception):
    """A bad argument found after parsing (an unreadable token file): exit 2, one line."""


def _err(msg: str) -> None:
    print(f"watchdog-llm: {msg}", file=sys.stderr)


def _client(s: config.Settings) -> AdminClient:
    from watchdog_llm.admin_client import AdminClient

    return AdminClient(s)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _refused(e: AdminError, args: argparse.Namespace, hint: str = "") -> int:
    """The one-line answer to a request the daemon refused, or could not be asked; its exit code.
    `hint` is what to do about a held swap lock (423)."""
    from watchdog_llm.admin_client import NotRunning

    if isinstance(e, NotRunning):
        _err(e.message)
        return EXIT_NOT_RUNNING
    msg = e.message
    lock = e.body.get("lock")
    if e.status == 423 and isinstance(lock, dict) and lock.get("locked"):
        reason = f" ({lock['reason']})" if lock.get("reason") else ""
        msg = f"the swap lock is held by {lock.get('holder')!r} until {_when(lock.get('expires_at'))}{reason}"
    if hint and e.status == 423:
        msg += f"; {hint}"
    if getattr(args, "json", False) and e.body:
        _print_json(e.body)
    _err(msg)
    return EXIT_FAIL


def _when(t: Any) -> str:
    """An epoch time as people read it: UTC, and how far away."""
    if not isinstance(t, int | float):
        return "?"
    try:
        stamp = datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError):
        return f"{t:.0f} (epoch s)"
    d = t - time.time()
    span = abs(d)
    text = f"{span:.0f} s" if span < 120 else f"{span / 60:.0f} min" if span < 7200 else f"{span / 3600:.1f} h"
    return f"{stamp} ({'in ' + text if d >= 0 else text + ' ago'})"


def _model_name(d: dict[str, Any]) -> str:
    name, model_id = d.get("model", ""), d.get("model_id")
    return f"{name} ({model_id})" if model_id and model_id != name else str(name)


def _swap_line(sw: dict[str, Any]) -> str:
    prev = f" from {sw['previous']}" if sw.get("previous") else ""
    return f"{sw.get('id')} to {sw.get('model')}{prev}: {sw.get('state')} ({sw.get('detail', '')})"


def _lock_line(lk: dict[str, Any]) -> str:
    reason = f": {lk['reason']}" if lk.get("reason") else ""
    return f"held by {lk.get('holder')!r} until {_when(lk.get('expires_at'))}{reason}"


def _lock_token(args: argparse.Namespace) -> str | None:
    """The lock token from --token, --token-file or $WATCHDOG_LLM_LOCK_TOKEN (in that order), if any."""
    if args.token is not None:
        token, where = args.token, "--token"
    elif args.token_file:
        path = Path(args.token_file).expanduser()
        try:
            token = path.read_text(encoding="utf-8")
            mode = path.stat().st_mode
        except (OSError, UnicodeDecodeError) as e:
            raise _ArgError(f"--token-file {path}: cannot be read: {getattr(e, 'strerror', None) or e}") from None
        if mode & 0o077:
            _err(f"warning: other users have access to {path}: chmod 600 it")
        where = f"--token-file {path}"
    else:
        token, where = os.environ.get(LOCK_TOKEN_ENV, ""), f"${LOCK_TOKEN_ENV}"
        if not token:  # unset or empty: no token
            return None
    token = str(token).strip()
    if not token:
        raise _ArgError(f"{where} is empty")
    return token


def _write_secret(path: Path, text: str) -> None:
    """`text` into `path`, mode 0600 from the first byte; replaced atomically (a symlink there is replaced,
    never followed)."""
    path = path.expanduser()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _models(s: config.Settings, args: argparse.Namespace) -> int:
    from watchdog_llm.admin_client import AdminError, NotRunning

    note = ""
    try:
        data = _client(s).get("/api/models")
    except NotRunning as e:
        note = e.message
    except AdminError as e:
        return _refused(e, args)
    if note:  # the catalog as the daemon would load it
        from watchdog_llm.coordination.catalog import CatalogError
        from watchdog_llm.supervise.specs import load_catalog

        try:
            cat = load_catalog(s)
        except CatalogError as e:
            _err(str(e))
            return EXIT_CONFIG
        models = [{**e.public(), "active": False} for e in cat.entries]
        data = {"active": None, "default": cat.default, "source": cat.source, "models": models}
    if args.json:
        _print_json({"running": not note, **data})
        if note:
            _err(f"{note}: the active model is unknown")
    else:
        print(_human_models(data))
        if note:
            print(f"{note}: the active model is unknown")
    return EXIT_NOT_RUNNING if note else EXIT_OK


_TUNE_OPTIONS = ("max_model_len", "gpu_memory_utilization", "prefix_caching", "kv_cache_dtype", "extra_args")


def _tune_value(name: str, text: str) -> Any:
    """A --option's text as the API takes it (`none` clears); ValueError names the option."""
    if text.strip().lower() in ("none", "null", ""):
        return None
    opt = "--" + name.replace("_", "-")
    try:
        if name == "max_model_len":
            return int(text)
        if name == "gpu_memory_utilization":
            return float(text)
    except ValueError:
        raise ValueError(f"{opt}: expected a number or none, not {text!r}") from None
    if name == "prefix_caching":
        on = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False}.get(text.lower())
        if on is None:
            raise ValueError(f"{opt}: expected on, off or none, not {text!r}")
        return on
    return text


def _tune(s: config.Settings, args: argparse.Namespace) -> int:
    from watchdog_llm.admin_client import AdminError

    path = f"/api/models/{urllib.parse.quote(args.model, safe='')}/settings"
    try:
        patch = {n: _tune_value(n, v) for n in _TUNE_OPTIONS if (v := getattr(args, n)) is not None}
    except ValueError as e:
        _err(str(e))
        return EXIT_CONFIG
    client = _client(s)
    try:
        if args.reset:
            d = client.post(path + "/reset")
        elif patch:
            d = client.request("PATCH", path, body=patch)
        else:
            d = client.get(path)
    except AdminError as e:
        return _refused(e, args)
    if args.json:
        _print_json(d)
        return EXIT_OK
    shown = {k: v for k, v in d["settings"].items() if v not in (None, [])}
    print(f"{d['model']}: " + (", ".join(f"{k}={v}" for k, v in shown.items()) or "no settings of its own"))
    when = (
        "its next start (it runs now: swap to it again, or restart, to apply)" if d.get("active") else "its next start"
    )
    print(f"  args at {when}: {' '.join(d['args']) or '(none)'}")
    return EXIT_OK


def _service(s: config.Settings, args: argparse.Namespace) -> int:
    from watchdog_llm.admin_client import AdminError

    client = _client(s)
    try:
        if args.action:
            name = urllib.parse.quote(args.name, safe="")
            d = client.post(f"/api/services/{name}/{args.action}")
            rows = [d]
        else:
            rows = client.get("/api/services")["services"]
            if args.name:
                rows = [r for r in rows if r["name"] == args.name]
                if not rows:
                    _err(f"no always-on service {args.name!r}")
                    return EXIT_FAIL
    except AdminError as e:
        return _refused(e, args)
    if args.json:
        _print_json(rows[0] if args.action else {"services": rows})
        return EXIT_OK
    if not rows:
        print("no always-on services in the catalog")
    for r in rows:
        print(f"{r['name']:<16} {r['state']:<9} on {r.get('host')} ({r.get('base_url')})  {r.get('detail', '')}")
    return EXIT_OK


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _progress_line(d: dict[str, Any]) -> str:
    pct = d.get("percent")
    width = 24
    filled = int(width * (pct or 0) / 100)
    bar = "#" * filled + "." * (width - filled)
    rate = f"{_size(d['rate'])}/s" if d.get("rate") else "-"
    eta = f"ETA {d['eta_s']:.0f} s" if d.get("eta_s") else ""
    shown = f"{pct:5.1f}%" if pct is not None else "  ?  "
    return f"[{bar}] {shown}  {_size(d.get('bytes'))} / {_size(d.get('total'))}  {rate}  {eta}".rstrip()


def _download(s: config.Settings, args: argparse.Namespace) -> int:
    from watchdog_llm.admin_client import AdminError

    client = _client(s)
    try:
        if args.list:
            d = client.get("/api/downloads")
            if args.json:
                _print_json(d)
            for r in d["downloads"]:
                print(f"{r['id']}  {r['state']:<11} {r['repo']}  {r.get('host') or 'here'}  {_progress_line(r)}")
            return EXIT_OK
        if args.cancel:
            d = client.post(f"/api/downloads/{urllib.parse.quote(args.cancel, safe='')}/cancel")
            print(f"{d['id']}: cancelling {d['repo']}")
            return EXIT_OK
        if not args.repo:
            _err("download: name the repo (ORG/NAME), or use --list or --cancel ID")
            return EXIT_CONFIG
        body = {k: v for k, v in (("repo", args.repo), ("revision", args.revision), ("host", args.host)) if v}
        rec = client.post("/api/downloads", body)
    except AdminError as e:
        return _refused(e, args)
    where = f" on {args.host}" if args.host else ""
    _err(f"{rec['id']}: downloading {rec['repo']}{where} (Ctrl-C cancels)")
    tty = sys.stderr.isatty()
    shown = -10.0
    try:
        for _event, d in client.events(f"/api/downloads/{rec['id']}/stream", read_timeout=None):
            rec = d
            pct = d.get("percent")
            if tty:
                print("\r" + _progress_line(d), end="", file=sys.stderr, flush=True)
            elif pct is not None and (pct - shown >= 10 or d["state"] in ("done", "failed", "cancelled")):
                shown = pct
                _err(_progress_line(d))
    except KeyboardInterrupt:
        with contextlib.suppress(AdminError):
            client.post(f"/api/downloads/{rec['id']}/cancel")
        _err(f"\n{rec['id']}: cancelled; the files it finished stay cached, and the next download resumes")
        return EXIT_INTERRUPTED
    except AdminError as e:
        return _refused(e, args)
    if tty:
        print(file=sys.stderr)
    if args.json:
        _print_json(rec)
    if rec["state"] == "done":
        entry = rec.get("entry") or {}
        print(f"{rec['repo']}: done, in {rec['path']}" + (f" on {rec['host']}" if rec.get("host") else ""))
        print(f"  a catalog entry for it: {{name: {entry.get('name')}, model: {entry.get('model')}}}")
        return EXIT_OK
    _err(f"{rec['repo']}: {rec['state']}" + (f" ({rec['error']}): {rec['message']}" if rec.get("error") else ""))
    return EXIT_FAIL


def _human_models(d: dict[str, Any]) -> str:
    models = d.get("models") or []
    active = "* active, " if d.get("active") else ""
    lines = [f"models in {d.get('source', '?')} ({active}default {d.get('default', '?')}):"]
    wn = max((len(str(m.get("name", ""))) for m in models), default=0)
    wm = max((len(str(m.get("model", ""))) for m in models), default=0)
    for m in models:
        gpus = m.get("gpus")
        extra = [f"{gpus} GPU" + ("" if gpus == 1 else "s")]
        if m.get("host"):
            extra[0] += f" on {m['host']} ({m.get('base_url', '')})"
        if m.get("aliases"):
            extra.append("aliases " + ", ".join(m["aliases"]))
        if m.get("description"):
            extra.append(m["description"])
        if any(v not in (None, []) for v in (m.get("settings") or {}).values()):
            extra.append("tuned: " + " ".join(m.get("effective_args") or []))
        mark = "*" if m.get("active") else " "
        lines.append(f"{mark} {m.get('name', ''):<{wn}}  {m.get('model', ''):<{wm}}  {'; '.join(extra)}")
    return "\n".join(lines)


def _swap(s: config.Settings, args: argparse.Namespace) -> int:
    from watchdog_llm.admin_client import AdminError

    try:
        token = _lock_token(args)
    except _ArgError as e:
        _err(str(e))
        return EXIT_CONFIG
    client = _client(s)
    try:
        rec = client.post("/api/swap", {"model": args.model}, token=token)
    except AdminError as e:
        hint = "pass its token (--token-file PATH or $WATCHDOG_LLM_LOCK_TOKEN)" if token is None else ""
        if e.status == 423 and token is not None:
            hint = "the token given is not this lock's token"
        return _refused(e, args, hint)
    # The daemon's own stage (stopping, deferred: waiting for job_31, ...), as it answered.
    line = f"{rec['id']}: swap to {rec['model']} {rec['state']}" + (f": {rec['detail']}" if rec.get("detail") else "")
    if not args.wait:
        if args.json:
            _print_json(rec)
        else:
            print(line)
        return EXIT_OK
    if not args.json:
        print(line, flush=True)
    return _follow_swap(client, rec, args)


def _follow_swap(client: AdminClient, rec: dict[str, Any], args: argparse.Namespace) -> int:
    try:
        return _follow(client, rec, args)
    except KeyboardInterrupt:
        _err(f"stopped following {rec['id']}; the swap goes on in the daemon (watchdog-llm status shows it)")
        return EXIT_INTERRUPTED


def _follow(client: AdminClient, rec: dict[str, Any], args: argparse.Namespace) -> int:
    """Print the swap's log lines and states as they come (its SSE stream; polling when the stream
    breaks, e.g. across a daemon restart) until it ends or --timeout runs out."""
    from watchdog_llm.admin_client import AdminError, NotRunning

    swap_id = rec["id"]
    out = sys.stderr if args.json else sys.stdout
    deadline = time.monotonic() + args.timeout
    shown: tuple[Any, Any] = (rec.get("state"), rec.get("detail"))

    def state(data: dict[str, Any]) -> dict[str, Any] | None:
        nonlocal shown
        if (data.get("state"), data.get("detail")) != shown:
            shown = (data.get("state"), data.get("detail"))
            print(f"==> {data.get('state')}: {data.get('detail', '')}", file=out, flush=True)
        return data if data.get("state") in ("ready", "failed") else None

    end: dict[str, Any] | None = None
    why = "the stream ended before the swap did"
    try:
        for event, data in client.events(f"/api/swap/{swap_id}/stream", read_timeout=max(0.1, args.timeout)):
            if event == "log" and isinstance(data, dict):
                print(data.get("line", ""), file=out, flush=True)
            elif event == "state" and isinstance(data, dict):
                if (end := state(data)) is not None:
                    break
            elif event == "end":
                why = str(data.get("detail") if isinstance(data, dict) else data) or why
                break
            if time.monotonic() >= deadline:
                break
    except TimeoutError:
        pass
    except NotRunning as e:
        why = e.message
    except AdminError as e:
        if e.status == 404:
            return _refused(e, args)
        why = e.message
    if end is None and time.monotonic() < deadline:
        print(f"==> {why}; polling the swap every second", file=out, flush=True)
        while end is None and time.monotonic() < deadline:
            try:
                end = state(client.get(f"/api/swap/{swap_id}"))
            except NotRunning:
                pass  # restarting: a swap left open completes on the next start
            except AdminError as e:
                if e.status is not None and e.status < 500:
                    return _refused(e, args)
            if end is None:
                time.sleep(max(0.0, min(1.0, deadline - time.monotonic())))
    if end is None:
        _err(f"{swap_id} is still {shown[0]} after {args.timeout:g} s; it goes on (GET /api/swap/{swap_id})")
        if args.json:
            _print_json({"id": swap_id, "state": shown[0], "detail": shown[1], "timed_out": True})
        return EXIT_TIMEOUT
    final: dict[str, Any] = end
    with contextlib.suppress(AdminError):  # the event has what people need
        final = client.get(f"/api/swap/{swap_id}")
    ok = final.get("state") == "ready"
    if args.json:
        _print_json(final)
    if not ok:
        tail = final.get("log_tail") or end.get("log_tail") or []
        if tail:
            print("last lines of the model's output:", file=out)
            for line in tail:
                print(f"  {line}", file=out)
        _err(f"{swap_id}: swap to {final.get('model', args.model)} failed: {final.get('detail', '')}")
    return EXIT_OK if ok else EXIT_FAIL


def _lock(s: config.Settings, args: argparse.Namespace) -> int:
    from watchdog_llm.admin_client import AdminError

    client = _client(s)
    try:
        if args.lock_command == "status":
            lk = client.get("/api/swap/lock")
            if args.json:
                _print_json(lk)
            else:
                print(f"swap lock {_lock_line(lk)}" if lk.get("locked") else "swap lock: free")
            return EXIT_OK
        if args.lock_command == "acquire":
            return _lock_acquire(client, args)
        token = _lock_token(args)
        if args.lock_command == "extend":
            return _lock_extend(client, args, token)
        return _lock_release(client, args, token)
    except _ArgError as e:
        _err(str(e))
        return EXIT_CONFIG
    except AdminError as e:
        hint = {
            "release": "--force releases it anyway (logged, notified, webhooked)",
            "acquire": "wait for it to expire, or ask its holder",
        }.get(args.lock_command, "")
        return _refused(e, args, hint)


def _lock_acquire(client: AdminClient, args: argparse.Namespace) -> int:
    lk = client.post("/api/swap/lock", {"holder": args.holder, "ttl_s": args.ttl, "reason": args.reason})
    return _new_token(lk, args, "taken")


def _new_token(lk: dict[str, Any], args: argparse.Namespace, what: str) -> int:
    """Hand over a token the daemon created: to --token-file (0600), else once on stdout."""
    token = lk.get("token")
    path = Path(args.token_file).expanduser() if getattr(args, "token_file", None) else None
    if path is not None and token:
        try:
            _write_secret(path, token)
        except OSError as e:
            # The lock is ours now, and this was the only copy of its token: show it rather than lose it.
            _err(f"cannot write {path} ({e.strerror or e}); the token follows, keep it private")
            print(token)
            return EXIT_FAIL
    if args.json:
        _print_json({**lk, "token": None, "token_file": str(path)} if path is not None else lk)
    elif token and path is None:
        print(token)
    where = f"; token in {path} (mode 0600)" if path is not None else ""
    _err(f"swap lock {what}: {_lock_line(lk)}{where}")
    if token and path is None:
        _err("the token is shown only this once: keep it private (anyone with it can swap models and release the lock)")
    return EXIT_OK


def _lock_extend(client: AdminClient, args: argparse.Namespace, token: str | None) -> int:
    if token is None:
        raise _ArgError(f"lock extend needs the lock's token: --token-file PATH or ${LOCK_TOKEN_ENV} (or --token)")
    lk = client.get("/api/swap/lock")
    if not lk.get("locked"):
        _err("the swap lock is not held (it expired or was released): take it again with `lock acquire`")
        return EXIT_FAIL
    lk = client.post("/api/swap/lock", {"holder": lk["holder"], "ttl_s": args.ttl, "reason": args.reason}, token=token)
    if lk.get("token"):  # it expired between our two calls: the daemon made a new lock for us
        return _new_token(lk, args, "had expired and was taken again")
    if args.json:
        _print_json(lk)
    else:
        print(f"swap lock extended: {_lock_line(lk)}")
    return EXIT_OK


def _lock_release(client: AdminClient, args: argparse.Namespace, token: str | None) -> int:
    before = client.get("/api/swap/lock")
    lk = client.delete("/api/swap/lock", token=token, params={"force": "true"} if args.force else None)
    if args.json:
        _print_json(lk)
    elif not before.get("locked"):
        print("swap lock: not held")
    else:
        how = " by force" if args.force and token is None else " (--force given)" if args.force else ""
        print(f"swap lock of {before.get('holder')!r} released{how}")
    return EXIT_OK


def _schedule(s: config.Settings, args: argparse.Namespace) -> int:
    from watchdog_llm.admin_client import AdminError

    try:
        data = _client(s).get("/api/schedule")
    except AdminError as e:
        return _refused(e, args)
    if args.json:
        _print_json(data)
        return EXIT_OK
    entries = data.get("entries") or []
    if not entries:
        print("no schedule entries (external schedulers register them with POST /api/schedule)")
        return EXIT_OK
    for entry in entries:
        when = []
        if entry.get("cron"):
            when.append(f"cron {entry['cron']!r}")
        if entry.get("next_run"):
            when.append(f"next run {entry['next_run']}")
        print(f"{entry.get('id')}  by {entry.get('owner')}  {' and '.join(when)}: {entry.get('action')}")
        if entry.get("description"):
            print(f"    {' '.join(str(entry['description']).split())}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


def _dashboard(s: config.Settings, args: argparse.Namespace) -> int:
    from watchdog_llm.admin_client import AdminError

    if args.port is not None and not 0 <= args.port <= 65535:
        _err(f"--port {args.port}: must be 0-65535")
        return EXIT_CONFIG
    try:
        link = _client(s).request("POST", "/api/dashboard/login")
    except AdminError as e:
        return _refused(e, args)
    node = s.node_name
    if s.admin_host:
        base = config.local_url(s.admin_host, s.admin_port)
        host = base.removeprefix("http://").rsplit(":", 1)[0]  # as the node reaches it ([::1] kept whole)
        print(f"Dashboard: {base}{link['path']}")
        print("  (the link works once, for 5 minutes, and signs one browser in for 12 hours)")
        print(f"From a laptop: ssh -N -L {s.admin_port}:{host}:{s.admin_port} {node}   then open the link there.")
        return EXIT_OK

    from watchdog_llm.forward import forward

    def ready(port: int) -> None:
        print(f"Dashboard: http://127.0.0.1:{port}{link['path']}")
        print("  (the link works once, for 5 minutes, and signs one browser in for 12 hours)")
        print(f"From a laptop: ssh -N -L {port}:127.0.0.1:{port} {node}   then open the link there.")
        print(f"Forwarding 127.0.0.1:{port} to {s.dashboard_socket}; Ctrl-C stops.", flush=True)

    from watchdog_llm.supervise.probes import port_in_use

    port = args.port
    if port is None:  # the port people know from the docs, unless someone holds it
        port = 0 if port_in_use("127.0.0.1", s.admin_port) else s.admin_port
    try:
        asyncio.run(forward("127.0.0.1", port, s.dashboard_socket, ready))
    except OSError as e:
        _err(f"--port {port}: cannot listen on 127.0.0.1:{port}: {e.strerror or e}")
        return EXIT_FAIL
    print("dashboard forward stopped", file=sys.stderr)
    return EXIT_OK


def _hosts_cli(name: str) -> Callable[[config.Settings, argparse.Namespace], int]:
    def handler(s: config.Settings, args: argparse.Namespace) -> int:
        from watchdog_llm import hosts_cli

        result: int = getattr(hosts_cli, name)(s, args)
        return result

    return handler


def _reload(s: config.Settings, args: argparse.Namespace) -> int:
    from watchdog_llm.admin_client import AdminError, NotRunning

    try:
        d = _client(s).request("POST", "/api/catalog/reload")
    except NotRunning as e:
        _err(e.message)
        return EXIT_NOT_RUNNING
    except AdminError as e:
        if args.json and e.body:
            _print_json(e.body)
        for problem in e.body.get("problems") or [e.message]:
            _err(f"not reloaded: {problem}")
        return EXIT_FAIL
    if args.json:
        _print_json(d)
        return EXIT_OK

    def names(key: str) -> str:
        return ", ".join(d.get(key) or []) or "none"

    print(f"catalog reloaded from {d['source']}: {len(d['models'])} model(s)")
    print(f"  added: {names('added')}; removed: {names('removed')}; changed: {names('changed')}")
    return EXIT_OK
