"""Cost of the stale-job sweep (cgroup mode, STALE_JOB_GRACE) next to DETECTION_MODE=procfs.

Both read /proc/<pid>/cgroup for every process on the node; they differ in how often. The sweep
runs every STALE_JOB_GRACE/2 s and only while a job is known; procfs mode every POLL_INTERVAL s,
always. This starts N idle processes (a busy node's process count), times one scan (median of
repeats), and prints CPU per second of wall time for both at their default periods.

    .venv/bin/python bench/stale_sweep.py [--counts 0,500,2000] [--repeats 30]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

from watchdog_llm.config import Settings
from watchdog_llm.detect.stale import jobs_with_processes


def scan_ms(repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        jobs_with_processes(Path("/proc"), frozenset())
        times.append((time.process_time() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="0,500,2000")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    defaults = Settings.model_fields
    grace = float(defaults["stale_job_grace"].default)
    poll = float(defaults["poll_interval"].default)
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"# sweep every {grace / 2:g} s (STALE_JOB_GRACE={grace:g}) vs procfs every {poll:g} s (POLL_INTERVAL)")
    print("extra processes | processes | scan ms (CPU, median) | sweep CPU % | procfs CPU % | ratio")
    for n in (int(x) for x in args.counts.split(",")):
        procs = [subprocess.Popen(["sleep", "600"]) for _ in range(n)]
        try:
            total = sum(1 for e in os.scandir("/proc") if e.name.isdigit())
            ms = scan_ms(args.repeats)
            sweep = ms / 1000 / (grace / 2) * 100
            procfs = ms / 1000 / poll * 100
            print(f"{n} | {total} | {ms:.2f} | {sweep:.3f} | {procfs:.2f} | {procfs / sweep:.0f}x")
        finally:
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()


if __name__ == "__main__":
    main()
