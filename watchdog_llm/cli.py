"""Command line: `watchdog-llm [--config PATH] run|status|doctor|notify-test|demo`.

The only module that chooses exit codes:
  0 success (run: stopped on request)   1 failure at run time / check failed
  2 bad configuration or cannot start   3 status: daemon not running
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from watchdog_llm import __version__, config
from watchdog_llm.config import format_ids as _ids

EXIT_OK, EXIT_FAIL, EXIT_CONFIG, EXIT_NOT_RUNNING = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="watchdog-llm",
        description="Serve an LLM on idle GPUs; yield to Slurm jobs in milliseconds; come back when free.",
    )
    p.add_argument("--config", metavar="PATH", help=f"config file (default: ${config.CONFIG_ENV_VAR} or ./config.env)")
    p.add_argument("--version", action="version", version=f"watchdog-llm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="run the daemon in the foreground (sbatch, tmux, systemd)")
    st = sub.add_parser("status", help="show the running daemon's state")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    doc = sub.add_parser("doctor", help="check config, cgroup layouts, binaries, GPUs, notifications")
    doc.add_argument("--send", action="store_true", help="also send a test notification")
    sub.add_parser("notify-test", help="send a test notification to every configured URL")
    demo = sub.add_parser("demo", help="run the daemon against a stand-in model and a scratch cgroup tree")
    demo.add_argument("--keep", action="store_true", help="keep the scratch directory afterwards")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from watchdog_llm.demo import run_demo

        return run_demo(keep=args.keep)
    try:
        settings = config.load(args.config)
    except config.ConfigError as e:
        for line in str(e).splitlines():
            print(f"watchdog-llm: {line}", file=sys.stderr)
        return EXIT_CONFIG
    handler = {"run": _run, "status": _status, "doctor": _doctor, "notify-test": _notify_test}[args.command]
    return handler(settings, args)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        stream=sys.stderr,
    )
    # Health probes run every 0.5 s while a model loads; one INFO line each would drown the log.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _run(s: config.Settings, args: argparse.Namespace) -> int:
    from watchdog_llm.app import StartupError, serve

    _setup_logging(s.log_level)
    try:
        return asyncio.run(serve(s))
    except StartupError as e:
        logging.getLogger("watchdog_llm").error("cannot start: %s", e)
        return EXIT_CONFIG
    except KeyboardInterrupt:  # only before the signal handlers are installed
        return EXIT_OK


def _live_status(s: config.Settings) -> dict[str, Any] | None:
    """The running daemon's status from its admin API; None when it cannot be asked."""
    import httpx

    headers = {}
    if s.admin_host:
        base = config.local_url(s.admin_host, s.admin_port)
        headers["Authorization"] = f"Bearer {s.admin_token.get_secret_value()}"
        transport = httpx.HTTPTransport()
    elif s.admin_socket.exists():
        base, transport = "http://admin", httpx.HTTPTransport(uds=str(s.admin_socket))
    else:
        return None
    try:
        with httpx.Client(transport=transport, timeout=2.0, trust_env=False) as client:
            r = client.get(base + "/api/status", headers=headers)
        data = r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, OSError, ValueError):
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
        print(f"not running (no status in {s.state_dir})")
        return EXIT_NOT_RUNNING
    print(_human_status(data, running))
    return EXIT_OK if running else EXIT_NOT_RUNNING


def _ago(t: Any) -> str:
    if not isinstance(t, int | float):
        return "?"
    d = max(0.0, time.time() - t)
    return f"{d:.0f} s ago" if d < 120 else f"{d / 60:.0f} min ago" if d < 7200 else f"{d / 3600:.1f} h ago"


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
        f"  model:   {d.get('model', '')} at {d.get('model_url', '')}  pids {d.get('model_pids') or '-'}",
        f"  public:  {d.get('public_url', '?')}  admin: {d.get('admin', '?')}",
        f"  jobs:    {_jobs(d)}",
    ]
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
    msg = Message("test", "watchdog-llm test", "If you can read this, alerts reach you.", "low")
    ok = asyncio.run(send_once(urls, msg, log=logging.getLogger("watchdog_llm"), node=s.node_name))
    print("sent" if ok else "sending failed (see the log above)")
    return EXIT_OK if ok else EXIT_FAIL


def _doctor(s: config.Settings, args: argparse.Namespace) -> int:
    from watchdog_llm.doctor import run_doctor

    _setup_logging("WARNING")
    return EXIT_OK if run_doctor(s, send=args.send, out=sys.stdout, environ=dict(os.environ)) else EXIT_FAIL


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
