#!/usr/bin/env python3
"""Yield times while N idle connections are held open to the daemon's public port.

What a neighbour on the node (or anyone through the tunnel) can do: open connections and send
nothing. The daemon keeps MAX_CONNECTIONS of them (default 1024) and refuses the rest at once; its
yield must not care. For each N: a fresh daemon serving vllm-standin (tensor parallel 2), N
connections opened before the jobs, then ARRIVALS jobs; job dir created -> whole tree gone, median
and max. HEAD_TIMEOUT is raised so the held connections stay for the whole run.

    .venv/bin/python bench/connection_flood.py [--arrivals 10] [--counts 0,500,5000] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from yield_bench import Tree, daemon_env, machine, read_status, start_daemon, wait_tree_gone, wait_until


def hold(port: int, n: int) -> list[socket.socket]:
    held = []
    for _ in range(n):
        with contextlib.suppress(OSError):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    return held


def serving(state: Path) -> dict[str, Any] | None:
    st = read_status(state)
    return st if st.get("state") == "serving" else None


def run(tree: Tree, n: int, arrivals: int) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="wdflood-state-"))
    env = daemon_env(state, CGROUP_ROOT=str(tree.root), RESUME_COOLDOWN="0.1", STANDIN_FAST_EXIT="1")
    env["HEAD_TIMEOUT"] = "300"
    daemon = start_daemon(env, state)
    held: list[socket.socket] = []
    gone_ms: list[float] = []
    try:
        wait_until(lambda: read_status(state).get("state") == "serving", 60)
        held = hold(int(env["PUBLIC_PORT"]), n)
        time.sleep(1.0)  # accepted, refused or queued: whatever the daemon does with them is done
        fds = psutil.Process(daemon.pid).num_fds()
        for i in range(arrivals):
            st = wait_until(lambda: serving(state), 60)
            procs = [psutil.Process(p) for p in st["model_pids"]]
            job = f"job_{2000 + i}"
            t0 = tree.add(job)
            t1, left = wait_tree_gone(procs)
            if left:
                raise RuntimeError(f"{len(left)} processes left running")
            gone_ms.append((t1 - t0) * 1000)
            wait_until(lambda: read_status(state).get("state") == "yielded", 10)
            tree.remove(job)
        print(f"  N={n}: median {statistics.median(gone_ms):.1f} ms, max {max(gone_ms):.1f} ms", file=sys.stderr)
    finally:
        for s in held:
            s.close()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        shutil.rmtree(state, ignore_errors=True)
    return {"connections": n, "daemon_fds_held": fds, "median_ms": statistics.median(gone_ms), "max_ms": max(gone_ms)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arrivals", type=int, default=10)
    ap.add_argument("--counts", default="0,500,5000")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this script holds the N sockets
    tree = Tree(False)
    try:
        rows = [run(tree, int(n), args.arrivals) for n in args.counts.split(",")]
    finally:
        tree.close()
    result = {"machine": machine(), "arrivals": args.arrivals, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print("| idle connections | daemon fds | tree gone median | max |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['connections']} | {r['daemon_fds_held']} | {r['median_ms']:.1f} ms | {r['max_ms']:.1f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
