"""Read-only views of a running daemon, as the admin API serves them: status (GET /api/status and
status.json), discovery (GET /api/endpoints) and a swap's dry run (POST /api/swap/{key}/validate).

They read the daemon's parts and change nothing; the HTTP layer only translates them to JSON.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import psutil

from watchdog_llm import __version__
from watchdog_llm.base.ids import format_ids as _ids
from watchdog_llm.coordination.catalog import ModelEntry, fill
from watchdog_llm.coordination.lock import public as lock_public
from watchdog_llm.detect.gpu import GpuError
from watchdog_llm.policy import Phase, served
from watchdog_llm.supervise.specs import model_argv

if TYPE_CHECKING:
    from watchdog_llm.app import Daemon


def endpoints(d: Daemon) -> dict[str, Any]:
    """Discovery (GET /api/endpoints): where clients reach the model, filled in while it is down too."""
    st, s = d.state, d.s
    e = d.entry(st.model.name)
    a = d.availability()
    probed = d.watch.public() if d.watch is not None else []
    tunnel = None
    if d.tunnel is not None:
        tunnel = {
            "url": d.tunnel.url or None,
            "ready": d.tunnel.ready,
            "state": d.tunnel.child.state.value,
            "on_yield": s.tunnel_on_yield.value,
        }
    return {
        "vllm": {
            "ready": a.serving,
            "base_url": s.public_base_url + "/v1",
            "model": e.name,
            "model_id": e.model,
            "openai_compat": True,
            "state": st.phase.value,
            "message": a.message,
            "retry_after": None if a.serving else a.retry_after,
            # Where it runs: this node (null), or a host of the catalog, reached at its base_url
            # (through the gateway above, with our keys; the upstream is for people and dashboards).
            "host": e.host,
            "upstream": e.remote.base_url if e.remote is not None else None,
        },
        "tunnel": tunnel,
        "node": s.node_name,
        # Mode C: each host (its SSH port) and each server on one (its health path), as last probed.
        "hosts": [t for t in probed if t["kind"] == "host"],
        "services": [t for t in probed if t["kind"] == "service"],
    }


def validate(d: Daemon, key: str) -> dict[str, Any]:
    """A swap's dry run: what would run, and whether it can (POST /api/swap/{key}/validate)."""
    e = d.next_start(key)
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "ok": ok, "detail": detail})

    if e.remote is not None:
        return _validate_remote(d, e)
    check("binary", bool(d.llm_bin), d.llm_bin or f"LLM_BIN={d.s.llm_bin!r} not found")
    if (path := e.local_path) is not None:
        check("model_path", path.exists(), f"{path} " + ("exists" if path.exists() else "does not exist"))
    else:
        check("model_path", True, f"{e.model} is a hub id (fetched by vLLM, not checked here)")
    gpus = d.our_gpus()
    if gpus is None:
        check("gpus", True, f"needs {e.gpus}; this node's GPUs are unknown (no NVML)")
    else:
        check("gpus", e.gpus <= len(gpus), f"needs {e.gpus}; {len(gpus)} can be ours ({_ids(gpus)})")
    argv = model_argv(d.s, d.llm_bin or d.s.llm_bin, e)
    return {
        "ok": all(c["ok"] for c in checks),
        "model": e.name,
        "command": argv,
        "env": sorted(e.env),
        "checks": checks,
    }


def _validate_remote(d: Daemon, e: ModelEntry) -> dict[str, Any]:
    """A remote entry's dry run: the host and keys as this controller knows them (no connection:
    `watchdog-llm hosts check NAME` makes one), and the commands as the host will get them."""
    from watchdog_llm.remote.ssh import KEY_NAME, known_keys, ssh_dir

    assert e.remote is not None and d.catalog is not None
    host = d.catalog.hosts[e.remote.host]
    key = host.key_file or ssh_dir(d.s.state_dir) / KEY_NAME
    checks = [
        {
            "check": "key",
            "ok": key.exists(),
            "detail": f"{key}" + ("" if key.exists() else ": run `watchdog-llm ssh-key`"),
        },
        {
            "check": "host_key",
            "ok": bool(known := known_keys(d.s.state_dir, host)),
            "detail": f"{host.shown}: "
            + ("accepted" if known else f"not accepted yet: `watchdog-llm hosts accept {host.name}`"),
        },
    ]
    r = e.remote
    return {
        "ok": all(c["ok"] for c in checks),
        "model": e.name,
        "host": host.name,
        "command": fill(r.start, e),
        "stop": fill(r.stop, e),
        "logs": fill(r.logs, e),
        "base_url": r.base_url,
        "env": sorted(e.env),
        "checks": checks,
    }


def status(d: Daemon) -> dict[str, Any]:
    """GET /api/status, and status.json for `watchdog-llm status` (times are wall-clock seconds)."""
    st = d.state
    mono_to_wall = time.time() - time.monotonic()
    last_yield = None
    if st.last_yield is not None:
        last_yield = asdict(st.last_yield)
        last_yield["detected_at"] = st.last_yield.detected_at + mono_to_wall
    return {
        "version": __version__,
        "daemon_pid": os.getpid(),
        "daemon_create_time": psutil.Process().create_time(),
        "node": d.s.node_name,
        "config": None if d.s.config_file is None else str(d.s.config_file),
        "state": st.phase.value,
        "reason": st.reason,
        "since": st.since + mono_to_wall,
        "updated_at": time.time(),
        "model": st.model.name,
        "model_id": d.entry(st.model.name).model if d.catalog is not None else d.s.model_name,
        "model_url": d.model_addr.shown,
        "public_url": d.s.public_base_url,
        "admin": f"{d.s.admin_host}:{d.s.admin_port}" if d.s.admin_host else str(d.s.admin_socket),
        "availability": asdict(d.availability()),
        "model_pids": d.model.pids if d.model else [],
        "model_run": st.run,
        "serving_since": None if st.serving_since is None else st.serving_since + mono_to_wall,
        "jobs": sorted(st.jobs),
        "last_yield": last_yield,
        "last_exit": st.last_exit,
        "fast_failures": st.fast_failures,
        "tunnel": _tunnel(d),
        "detector": d.s.detection_mode.value,
        "served_s": round(served(st, time.monotonic()), 1),
        "gpus": _gpus(d),
        "swap": None if d.coord is None or (o := d.coord.swaps.open()) is None else o.public(),
        "lock": lock_public(d.coord.lock.status()) if d.coord is not None else None,
        "webhooks": _webhooks(d),
        "catalog": _catalog(d),
        "services": d.services.public() if d.services is not None else [],
        "notifications": None
        if d.notifier is None
        else {"sent": d.notifier.sent, "failed": d.notifier.failed, "dropped": d.notifier.dropped},
    }


def _tunnel(d: Daemon) -> dict[str, Any] | None:
    if d.tunnel is None:
        return None
    return {
        "state": d.tunnel.child.state.value,
        "url": d.tunnel.url,
        "pids": d.tunnel.child.pids,
        "ready": d.tunnel.ready,
    }


def _gpus(d: Daemon) -> dict[str, Any]:
    st, lim = d.state, d.limits
    return {
        "view": d.gpu.name if d.gpu is not None else None,
        "ours": sorted(st.gpus),
        "choose_from": None if lim.all_gpus is None else sorted(lim.all_gpus),
        "fixed": None if lim.fixed_gpus is None else sorted(lim.fixed_gpus),
        "yield_on": lim.yield_on,
        "busy": sorted(st.busy),
        "job_gpus": {j: None if g is None else sorted(g) for j, g in sorted(st.job_gpus.items())},
    }


def _webhooks(d: Daemon) -> dict[str, int] | None:
    w = d.webhooks
    if w is None:
        return None
    return {"delivered": w.delivered, "failed": w.failed, "dropped": w.dropped, "queued": w.queued}


def gpu_table(d: Daemon) -> dict[str, Any]:
    """GET /api/gpus: each GPU with its memory and whose processes hold it (NVML, asked now; this
    blocks up to the NVML timeout, so the API runs it in a thread). GPU numbers are minors, as in status."""
    view = d.gpu
    if view is None:
        return {"view": None, "gpus": [], "error": "no GPU view (DETECTION_MODE uses cgroups only)"}
    try:
        gpus, procs = view.gpus(), view.processes()
    except GpuError as e:
        return {"view": view.name, "gpus": [], "error": str(e)}
    ours = set(d.model.pids if d.model else [])
    st = d.state
    rows = []
    for g in sorted(gpus, key=lambda g: g.minor):
        on = [p for p in procs if p.minor == g.minor]
        rows.append(
            {
                "minor": g.minor,
                "index": g.index,
                "name": g.name,
                "memory_total": g.memory_total,
                "memory_used": sum(p.used_memory or 0 for p in on),
                "ours": g.minor in st.gpus,
                "busy": g.minor in st.busy,
                "processes": [{"pid": p.pid, "used_memory": p.used_memory, "ours": p.pid in ours} for p in on],
            }
        )
    return {"view": view.name, "gpus": rows, "error": None}


# What the active entry is, by the daemon's phase (the others are "not_loaded").
_ENTRY_STATE = {
    Phase.SERVING: "resident",
    Phase.STARTING: "loading",
    Phase.YIELDING: "yielded",
    Phase.YIELDED: "yielded",
    Phase.COOLDOWN: "yielded",
    Phase.BACKOFF: "restarting",
    Phase.FAILED: "failed",
    Phase.SWAPPING: "stopping",
    Phase.STOPPING: "stopping",
}


def _catalog(d: Daemon) -> list[dict[str, Any]] | None:
    """Each catalog entry: its state and the requests waiting for it (ON_DEMAND); None with one model."""
    if d.catalog is None or len(d.catalog.entries) < 2:
        return None
    active = d.state.model.name
    waiting = d.on_demand.waiting if d.on_demand is not None else {}
    return [
        {
            "name": e.name,
            "state": _ENTRY_STATE.get(d.state.phase, "not_loaded") if e.name == active else "not_loaded",
            "waiting": waiting.get(e.name, 0),
        }
        for e in d.catalog.entries
    ]
