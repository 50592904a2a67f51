#!/usr/bin/env python3
"""Yield benchmark against a real Slurm (mode B): a real `sbatch` job -> the whole model tree gone.

The daemon runs outside Slurm, watching the real /sys/fs/cgroup, serving vllm-standin (tensor
parallel 2: four processes). N times: `sbatch --wrap 'sleep 2'`, then measure
  - sbatch returned -> whole model tree gone (psutil, polled every 1 ms): what a job's user sees,
    including Slurm's own scheduling and job launch;
  - job's cgroup dir created -> noticed (`detect_ms` in status.json: the dir's age when the daemon
    saw it; ctime has 4 ms ticks, so an upper bound);
  - job's cgroup dir created -> tree gone: tree-gone time minus the dir's ctime (same coarse clock);
then wait for the job to end and the daemon to serve again.

    scripts/slurm-local.sh start
    .venv/bin/python bench/slurm_bench.py [--arrivals 10] [--graceful] [--overlap] [--json PATH]

Writes bench/results/<date>-slurm.json unless --json says otherwise. Numbers for docs/SLURM.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from yield_bench import daemon_env, pct, read_status, start_daemon, wait_until
from yield_bench import machine as _machine
from yield_bench import summary as _summary

VENV_BIN = Path(sys.executable).parent
RESULTS = Path(__file__).resolve().parent / "results"


def run(*args: str, timeout: float = 15) -> str:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=True).stdout


def summary(xs: list[float]) -> dict[str, float]:
    # Twelve-odd arrivals per row: a p90 means something, a p99 would just be the max again.
    return {**_summary(xs), "p90": pct(xs, 90), "min": min(xs)} if xs else {}


def running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def job_state(job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=15).stdout
    return out.strip()


GPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "gpu" / "h100x4.json"


def bench(arrivals: int, fast_exit: bool, overlap: bool = False) -> dict[str, Any]:
    """`overlap`: YIELD_ON=overlap with the real scontrol: the daemon holds all four (stand-in NVML)
    GPUs, every job asks for one, so each yield waits for `scontrol show job -d` first."""
    state = Path(tempfile.mkdtemp(prefix="wdbench-slurm-"))
    env = daemon_env(
        state,
        CGROUP_ROOT="/sys/fs/cgroup",
        YIELD_ON="any",
        RESUME_COOLDOWN="0.2",
        STANDIN_FAST_EXIT="1" if fast_exit else "",
    )
    job_args = ["--wrap", "sleep 2"]
    if overlap:
        shutil.copy(GPUS, state / "gpus.json")
        env.update(YIELD_ON="overlap", GPU_STANDIN=str(state / "gpus.json"), NUM_GPUS="4")
        env.pop("CUDA_VISIBLE_DEVICES", None)
        job_args = ["--gres=gpu:1", "--mem=100M", *job_args]
    daemon = start_daemon(env, state)

    def status() -> dict[str, Any]:
        return read_status(state)

    from_sbatch: list[float] = []
    from_dir: list[float] = []
    detect: list[float] = []
    lookup: list[float] = []
    jobs: list[str] = []
    try:
        for i in range(arrivals):
            st = wait_until(lambda: (s := status()).get("state") == "serving" and s, 60)
            procs = [psutil.Process(p) for p in st["model_pids"]]
            procs += [c for p in procs[:1] for c in p.children(recursive=True) if c not in procs]
            out = run("sbatch", "--parsable", "-o", "/dev/null", "-J", "wdbench", *job_args)
            t_sbatch, wall_sbatch = time.monotonic(), time.time()
            job = out.strip().split(";")[0]
            jobs.append(job)
            while any(running(p) for p in procs):
                time.sleep(0.001)
                if time.monotonic() - t_sbatch > 30:
                    raise RuntimeError(f"model tree still running 30 s after job {job}")
            t_gone, wall_gone = time.monotonic(), time.time()
            from_sbatch.append((t_gone - t_sbatch) * 1000)
            y = wait_until(
                lambda j=job: (s := status()).get("last_yield") and s["last_yield"]["job"] == f"job_{j}" and s, 10
            )
            ly = y["last_yield"]
            if ly.get("lookup_ms") is not None:
                lookup.append(ly["lookup_ms"])
            if ly.get("detect_ms") is not None:
                detect.append(ly["detect_ms"])
                # The dir's creation on the wall clock: when the daemon noticed it, minus its age.
                created = ly["detected_at"] - ly["detect_ms"] / 1000
                from_dir.append((wall_gone - created) * 1000)
            print(
                f"  arrival {i + 1}/{arrivals}: job {job}: sbatch -> tree gone {from_sbatch[-1]:.0f} ms,"
                f" cgroup dir -> gone {from_dir[-1] if from_dir else float('nan'):.1f} ms,"
                f" detect {detect[-1] if detect else float('nan'):.1f} ms"
                f" (sbatch -> dir {(created - wall_sbatch) * 1000 if from_dir else float('nan'):.0f} ms)",
                file=sys.stderr,
            )
            wait_until(lambda j=job: job_state(j) == "", 30, 0.05)
    finally:
        for job in jobs:
            subprocess.run(["scancel", job], capture_output=True, timeout=15)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        shutil.rmtree(state, ignore_errors=True)
    return {
        "model_shutdown": "prompt (STANDIN_FAST_EXIT=1)" if fast_exit else "graceful (~0.3 s)",
        "yield_on": "overlap (scontrol show job -d on every job)" if overlap else "any",
        "scontrol_lookup_ms": summary(lookup),
        "sbatch_to_tree_gone_ms": summary(from_sbatch),
        "cgroup_dir_to_tree_gone_ms": summary(from_dir),
        "detect_ms": summary(detect),
        "procs": len(procs),
    }


def machine() -> dict[str, str]:
    return {**_machine(), "slurm": run("sinfo", "--version").strip()}


def fmt(s: dict[str, float]) -> str:
    return f"{s['median']:.1f} / {s['p90']:.1f} / {s['max']:.1f} (n={s['n']})" if s else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arrivals", type=int, default=10)
    ap.add_argument("--graceful", action="store_true", help="also measure the stand-in's graceful shutdown")
    ap.add_argument("--overlap", action="store_true", help="also measure YIELD_ON=overlap (real scontrol)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("sbatch"):
        print("slurm_bench: needs root and a running Slurm (scripts/slurm-local.sh start)", file=sys.stderr)
        return 2
    runs = {}
    for fast in (True, False) if args.graceful else (True,):
        print(f"-- {'prompt' if fast else 'graceful'} model shutdown", file=sys.stderr)
        runs["prompt" if fast else "graceful"] = bench(args.arrivals, fast)
    if args.overlap:
        print("-- prompt model shutdown, YIELD_ON=overlap", file=sys.stderr)
        runs["prompt_overlap"] = bench(args.arrivals, True, overlap=True)
    result = {"machine": machine(), "arrivals": args.arrivals, **runs}
    path = args.json or RESULTS / f"{time.strftime('%Y-%m-%d')}-slurm.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"machine: {result['machine']}")
    for name, r in runs.items():
        print(f"{name}: median / p90 / max ms")
        print(f"  sbatch returned -> whole tree gone: {fmt(r['sbatch_to_tree_gone_ms'])}")
        print(f"  job cgroup dir created -> tree gone: {fmt(r['cgroup_dir_to_tree_gone_ms'])}")
        print(f"  job cgroup dir created -> noticed:   {fmt(r['detect_ms'])}")
        if r["scontrol_lookup_ms"]:
            print(f"  job noticed -> its GPUs known:      {fmt(r['scontrol_lookup_ms'])}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
