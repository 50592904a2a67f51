#!/usr/bin/env python3
"""Yield benchmark: watchdog-llm vs a reconstruction of its predecessor, side by side in one run.

Measures, for each:
  - job arrival -> whole model tree gone (N arrivals; median, p99, max), from outside: the clock
    starts just before the job's cgroup dir is created and stops when pidfds of every process of
    the model tree (API server, EngineCore, workers) have signalled exit;
  - detection latency alone (job dir created -> the daemon knows);
  - the daemon's own CPU and RSS while idle (serving, no jobs) over IDLE seconds.

The model is vllm-standin (tensor-parallel 2: four processes). The predecessor is the seed's bash
loop: `find` over the cgroup tree every 0.25 s, `pkill -f "vllm serve"` to yield. Its pkill pattern
here includes a random model name so that it can only ever match this benchmark's own processes.

    .venv/bin/python bench/yield_bench.py [--arrivals 50] [--idle 60] [--cgroupfs] [--json out.json]

--cgroupfs uses the real cgroup filesystem (root; cgroup v1 memory controller or v2) instead of a
scratch directory. These numbers are for docs/PERFORMANCE.md, not assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from watchdog_llm.config import Settings
from watchdog_llm.detect import JobSeen, make_detector
from watchdog_llm.supervise.probes import free_port
from watchdog_llm.supervise.tree import Member, wait_gone

VENV_BIN = Path(sys.executable).parent
# "1": the model tree exits at once on SIGTERM, so the numbers measure the supervisor, not the
# stand-in's graceful shutdown; "": the stand-in shuts down gracefully (~0.3 s, like uvicorn + engine).
FAST_EXIT = "1"

PREDECESSOR = r"""#!/bin/bash
# Reconstruction of the seed's spot-gpu loop (what watchdog-llm replaces). Do not deploy.
ROOT="$1"; MODEL="$2"; PORT="$3"; LLM_BIN="$4"
while true; do
  if find "$ROOT" -maxdepth 6 -type d -name 'job_*' 2>/dev/null | grep -q .; then
    if pgrep -f "serve $MODEL" >/dev/null; then
      echo "noticed $(date +%s.%N)"
      pkill -f "serve $MODEL"
    fi
  else
    if ! pgrep -f "serve $MODEL" >/dev/null; then
      setsid "$LLM_BIN" serve "$MODEL" --port "$PORT" --tensor-parallel-size 2 >/dev/null 2>&1 &
    fi
  fi
  sleep 0.25
done
"""


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


def summary(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "median": statistics.median(xs), "p99": pct(xs, 99), "max": max(xs)} if xs else {}


class Tree:
    """Where job dirs are made: a scratch dir with the v2 layout, or the real cgroupfs."""

    def __init__(self, real: bool) -> None:
        self.real = real
        if real:
            base = Path("/sys/fs/cgroup/memory")
            if not base.is_dir():
                base = Path("/sys/fs/cgroup/system.slice")
            self.root = Path("/sys/fs/cgroup")
            self.parent = base / f"slurm_wdbench{uuid.uuid4().hex[:6]}" / "uid_0"
            self.parent.mkdir(parents=True)
            self._cleanup = base / self.parent.parent.name
        else:
            self.scratch = Path(
                tempfile.mkdtemp(prefix="wdbench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
            )
            self.root = self.scratch / "cgroup"
            self.parent = self.root / "system.slice" / "slurmstepd.scope"
            self.parent.mkdir(parents=True)

    def add(self, job: str) -> float:
        d = self.parent / job
        t = time.monotonic()
        d.mkdir()
        (d / "step_extern").mkdir()
        return t

    def remove(self, job: str) -> None:
        d = self.parent / job
        (d / "step_extern").rmdir()
        d.rmdir()

    def close(self) -> None:
        if self.real:
            dirs = [d for d in self._cleanup.rglob("*") if d.is_dir()]  # cgroupfs: control files too
            for d in sorted(dirs, key=lambda p: -len(p.parts)):
                d.rmdir()
            self._cleanup.rmdir()
        else:
            shutil.rmtree(self.scratch, ignore_errors=True)


def model_tree(leader: psutil.Process) -> list[psutil.Process]:
    return [leader, *leader.children(recursive=True)]


def wait_tree_gone(procs: list[psutil.Process]) -> tuple[float, list[psutil.Process]]:
    """When the whole tree is gone; or, if some of it outlives the leader by 1 s, what was left."""
    members = [Member(p) for p in procs]  # pidfds: woken by each exit, no polling
    try:
        left = asyncio.run(wait_gone(members[:1], 10))
        if left:
            p = left[0].proc
            with contextlib.suppress(psutil.Error):
                print(f"  ! leader {p.pid} {p.status()} {p.cmdline()} still alive after 10 s", file=sys.stderr)
        left = asyncio.run(wait_gone(members, 1.0))
        t = time.monotonic()
        for m in left:  # clean up the orphans by the psutil handles we hold (never by name)
            m.proc.kill()
        return t, [m.proc for m in left]
    finally:
        for m in members:
            m.close()


def wait_until(pred: Any, timeout: float, interval: float = 0.01) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if v := pred():
            return v
        time.sleep(interval)
    raise TimeoutError("timed out")


def idle_cost(proc: psutil.Process, seconds: float, include_children: bool) -> dict[str, float]:
    def cpu() -> float:
        t = proc.cpu_times()
        extra = t.children_user + t.children_system if include_children else 0.0
        return t.user + t.system + extra

    c0, w0 = cpu(), time.monotonic()
    time.sleep(seconds)
    c1, w1 = cpu(), time.monotonic()
    return {"cpu_percent": (c1 - c0) / (w1 - w0) * 100, "rss_mb": proc.memory_info().rss / 2**20}


# ---- watchdog-llm -----------------------------------------------------------------------------


def daemon_env(state: Path, **settings: str) -> dict[str, str]:
    """The real daemon serving vllm-standin (tensor parallel 2), settings from the environment only."""
    names = {n.upper() for n in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in names and not k.startswith(("SLURM_", "STANDIN_"))}
    env.update(
        LLM_BIN=str(VENV_BIN / "vllm-standin"),
        MODEL_NAME="bench/standin",
        NUM_GPUS="2",
        SERVER_PORT=str(free_port()),
        PUBLIC_PORT=str(free_port()),
        STATE_DIR=str(state),
        YIELD_GRACE="5",
        STANDIN_STARTUP_S="0.2",
        LOG_LEVEL="WARNING",
        WATCHDOG_LLM_CONFIG=str(state / "none.env"),
        **settings,
    )
    (state / "none.env").write_text("")
    return env


def start_daemon(env: dict[str, str], state: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "watchdog_llm", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(state / "daemon.log", "wb"),
    )


def read_status(state: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((state / "status.json").read_text()))
    except (OSError, ValueError):
        return {}


def bench_watchdog(tree: Tree, arrivals: int, idle: float, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="wdbench-state-"))
    env = daemon_env(state, CGROUP_ROOT=str(tree.root), RESUME_COOLDOWN="0.1", STANDIN_FAST_EXIT=FAST_EXIT)
    env.update(extra_env or {})
    daemon = start_daemon(env, state)

    def status() -> dict[str, Any]:
        return read_status(state)

    def serving() -> dict[str, Any] | None:
        s = status()
        return s if s.get("state") == "serving" else None

    gone_ms: list[float] = []
    detect_ms: list[float] = []
    cost: dict[str, float] = {}
    try:
        st = wait_until(serving, 60)
        d_proc = psutil.Process(daemon.pid)
        if idle:
            time.sleep(2)
            cost = idle_cost(d_proc, idle, include_children=False)
        for i in range(arrivals):
            st = wait_until(serving, 60)
            procs = [psutil.Process(p) for p in st["model_pids"]]
            job = f"job_{1000 + i}"
            t0 = tree.add(job)
            t1, left = wait_tree_gone(procs)
            if left:
                raise RuntimeError(f"watchdog-llm left {len(left)} processes running")
            gone_ms.append((t1 - t0) * 1000)
            y = wait_until(
                lambda j=job: (
                    (s := status()).get("state") == "yielded" and s["last_yield"]["job"] == j and s["last_yield"]
                ),
                10,
            )
            if y.get("detect_ms") is not None:
                detect_ms.append(y["detect_ms"])
            tree.remove(job)
            print(f"  watchdog-llm arrival {i + 1}/{arrivals}: tree gone in {gone_ms[-1]:.1f} ms", file=sys.stderr)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        shutil.rmtree(state, ignore_errors=True)
    return {"tree_gone_ms": summary(gone_ms), "detect_ms": summary(detect_ms), "idle": cost, "procs": len(procs)}


def bench_detector_alone(tree: Tree, n: int) -> dict[str, Any]:
    """In-process: job dir created -> the detector's sink is called (no daemon, no model)."""
    seen: dict[str, float] = {}
    ev = threading.Event()

    def sink(sig: object) -> None:
        if isinstance(sig, JobSeen):
            seen[sig.job] = time.monotonic()
            ev.set()

    import logging

    det = make_detector(
        "cgroup", cgroup_root=tree.root, poll_interval=0.25, own=frozenset(), log=logging.getLogger("bench")
    )
    det.start(sink)
    lat: list[float] = []
    try:
        for i in range(n):
            job = f"job_{5000 + i}"
            ev.clear()
            t0 = tree.add(job)
            if not ev.wait(5):
                raise RuntimeError(f"{job} not seen")
            lat.append((seen[job] - t0) * 1000)
            tree.remove(job)
            time.sleep(0.01)
    finally:
        det.stop()
    return summary(lat)


# ---- the predecessor --------------------------------------------------------------------------


def bench_predecessor(tree: Tree, arrivals: int, idle: float) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="wdbench-pred-"))
    script = work / "spot-gpu.sh"
    script.write_text(PREDECESSOR)
    model = f"bench-pred-{uuid.uuid4().hex[:8]}"  # pkill -f can only match this run's processes
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "STANDIN_"))}
    env.update(STANDIN_STARTUP_S="0.2", VLLM_API_KEY="", STANDIN_FAST_EXIT=FAST_EXIT)
    out = open(work / "out.log", "w")
    notices = open(work / "out.log")  # its own offset: the loop's stdout shares `out`'s
    loop = subprocess.Popen(
        ["bash", str(script), str(tree.root), model, str(port), str(VENV_BIN / "vllm-standin")],
        env=env,
        stdout=out,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    loop_p = psutil.Process(loop.pid)

    def leader() -> psutil.Process | None:
        import httpx

        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if "serve" in cmd and model in cmd and p.ppid() in (1, loop.pid, os.getpid()):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        return p
                except httpx.HTTPError:
                    return None
        return None

    gone_ms: list[float] = []
    detect_ms: list[float] = []
    orphaned = arrivals_with_orphans = 0
    cost: dict[str, float] = {}
    try:
        lead = wait_until(leader, 60, 0.05)
        if idle:
            time.sleep(2)
            cost = idle_cost(loop_p, idle, include_children=True)
        for i in range(arrivals):
            lead = wait_until(leader, 60, 0.05)
            procs = model_tree(lead)
            time.sleep(0.05)
            job = f"job_{2000 + i}"
            notices.seek(0, os.SEEK_END)
            wall0 = time.time()
            t0 = tree.add(job)
            t1, left = wait_tree_gone(procs)
            if left:
                orphaned += len(left)
                arrivals_with_orphans += 1
            else:
                gone_ms.append((t1 - t0) * 1000)
            line = wait_until(lambda: [ln for ln in notices.read().splitlines() if ln.startswith("noticed")], 5)
            detect_ms.append((float(line[0].split()[1]) - wall0) * 1000)  # first notice of this job
            tree.remove(job)
            what = f"{len(left)} processes left running" if left else f"tree gone in {gone_ms[-1]:.1f} ms"
            print(f"  predecessor arrival {i + 1}/{arrivals}: {what}", file=sys.stderr)
    finally:
        os.killpg(loop.pid, signal.SIGKILL)
        loop.wait()
        for p in psutil.process_iter(["cmdline"]):  # the model it left (it uses setsid)
            if model in (p.info["cmdline"] or []):
                for q in model_tree(p):
                    q.kill()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "tree_gone_ms": summary(gone_ms),
        "detect_ms": summary(detect_ms),
        "idle": cost,
        "orphaned_processes": orphaned,
        "arrivals_with_orphans": arrivals_with_orphans,
    }


def machine() -> dict[str, str]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def fmt(s: dict[str, float]) -> str:
    return f"{s['median']:.1f} / {s['p99']:.1f} / {s['max']:.1f}" if s else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arrivals", type=int, default=50)
    ap.add_argument("--idle", type=float, default=60.0)
    ap.add_argument("--cgroupfs", action="store_true", help="use the real cgroup filesystem (root)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    global FAST_EXIT
    tree = Tree(args.cgroupfs)
    try:
        det = bench_detector_alone(tree, max(200, args.arrivals))
        runs: dict[str, dict[str, Any]] = {}
        for mode in ("prompt", "graceful"):
            FAST_EXIT = "1" if mode == "prompt" else ""
            idle = args.idle if mode == "prompt" else 0.0
            print(f"-- {mode} model shutdown", file=sys.stderr)
            runs[f"watchdog_llm_{mode}"] = bench_watchdog(tree, args.arrivals, idle)
            runs[f"predecessor_{mode}"] = bench_predecessor(tree, args.arrivals, idle)
    finally:
        tree.close()
    result = {
        "machine": machine(),
        "tree": "cgroupfs" if args.cgroupfs else "scratch (tmpfs)",
        "arrivals": args.arrivals,
        "idle_s": args.idle,
        "detector_alone_ms": det,
        **runs,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print_table(result)
    return 0


def print_table(r: dict[str, Any]) -> None:
    m = r["machine"]
    print(
        f"\n{m['date']}, {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}; "
        f"job dirs on {r['tree']}; {r['arrivals']} arrivals per row, idle {r['idle_s']:.0f} s\n"
    )
    print("| measure (median / p99 / max) | watchdog-llm | predecessor (0.25 s poll, pkill -f) | ratio of medians |")
    print("| --- | --- | --- | --- |")
    det = r["detector_alone_ms"]
    print(f"| detection alone: job dir created -> detector's callback, ms | {fmt(det)} | | |")
    for mode, label in (("prompt", "model exits promptly on SIGTERM"), ("graceful", "graceful model shutdown")):
        ours, pred = r[f"watchdog_llm_{mode}"], r[f"predecessor_{mode}"]
        print(
            f"| {label}: job dir created -> noticed, ms | {fmt(ours['detect_ms'])} | {fmt(pred['detect_ms'])} "
            f"| {ratio(pred['detect_ms'], ours['detect_ms'])} |"
        )
        left = pred["orphaned_processes"]
        note = (
            f" ({left} processes left running after {pred['arrivals_with_orphans']} of {r['arrivals']} yields)"
            if left
            else ""
        )
        print(
            f"| {label}: job dir created -> whole tree ({ours['procs']} processes) gone, ms "
            f"| {fmt(ours['tree_gone_ms'])} | {fmt(pred['tree_gone_ms'])}{note} "
            f"| {ratio(pred['tree_gone_ms'], ours['tree_gone_ms'])} |"
        )
    ours, pred = r["watchdog_llm_prompt"]["idle"], r["predecessor_prompt"]["idle"]
    if ours and pred:
        # psutil's CPU times count clock ticks (10 ms): below one tick over the window reads as 0.
        floor = 100 * 0.01 / r["idle_s"]
        mine = ours["cpu_percent"]
        shown = f"{mine:.3f}" if mine >= floor else f"< {floor:.3f} (under one 10 ms tick in {r['idle_s']:.0f} s)"
        times = f"{pred['cpu_percent'] / mine:.0f}x" if mine >= floor else f"> {pred['cpu_percent'] / floor:.0f}x"
        print(f"| idle CPU, % of one core | {shown} | {pred['cpu_percent']:.3f} | {times} |")
        print(f"| idle RSS, MB | {ours['rss_mb']:.1f} | {pred['rss_mb']:.1f} (bash alone) | |")


def ratio(a: dict[str, float], b: dict[str, float]) -> str:
    if not a or not b:
        return "-"
    return f"{a['median'] / max(b['median'], 1e-3):.1f}x"


if __name__ == "__main__":
    raise SystemExit(main())
