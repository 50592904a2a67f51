#!/usr/bin/env python3
"""How long a hung model keeps clients waiting: SIGSTOP of the model's API server while serving.

A stopped (or deadlocked) server still has its socket: the kernel accepts connections, nothing
answers. For each setting, a fresh daemon serving vllm-standin; REPEATS times: SIGSTOP the API
server at a random point of the liveness cycle, at once send one chat request through the gateway
(non-streamed, the OpenAI SDK's default), and measure
  - detected: SIGSTOP -> the daemon's status leaves `serving` (the hang is noticed);
  - answered: the request's wait, and what it got (503 from the gateway, or UPSTREAM_TIMEOUT's 504).
Then the daemon restarts the model; the next round waits for `serving` again.

LIVENESS_INTERVAL=0 is the daemon without the check (before this feature): the request waits for
UPSTREAM_TIMEOUT, lowered here to --upstream-timeout so the run ends.

    .venv/bin/python bench/hang_bench.py [--repeats 5] [--upstream-timeout 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from yield_bench import daemon_env, machine, read_status, start_daemon, wait_until

KEY = "bench-hang-key-0123456789abcdef"


def ask(url: str, out: dict[str, Any]) -> None:
    t0 = time.monotonic()
    try:
        r = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "bench/standin", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=600,
        )
        out["status"] = r.status_code
    except httpx.HTTPError as e:
        out["status"] = type(e).__name__
    out["s"] = time.monotonic() - t0


def leader(pids: list[int]) -> int:
    return next(p for p in pids if psutil.Process(p).ppid() not in pids)


def run(settings: dict[str, str], repeats: int, rng: random.Random) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="wdhang-state-"))
    env = daemon_env(state, PUBLIC_API_KEYS=f"bench:{KEY}", RESTART_BACKOFF_MAX="1", **settings)
    env["RESTART_LIMIT"] = "100"
    daemon = start_daemon(env, state)
    url = f"http://127.0.0.1:{env['PUBLIC_PORT']}"
    detected: list[float] = []
    waits: list[float] = []
    statuses: list[Any] = []
    try:
        last = 0
        for _ in range(repeats):
            # A new run each round (the last one was hung, then restarted): never the old pids.
            def fresh(last: int = last) -> dict[str, Any] | None:
                s = read_status(state)
                return s if s.get("state") == "serving" and s.get("model_run", 0) > last else None

            wait_until(fresh, 60)
            time.sleep(rng.uniform(0.5, 0.5 + float(settings.get("LIVENESS_INTERVAL", "5") or 5)))
            st = wait_until(fresh, 10)
            run_no = last = st["model_run"]
            api = leader(st["model_pids"])
            t0 = time.monotonic()
            os.kill(api, signal.SIGSTOP)
            out: dict[str, Any] = {}
            asker = threading.Thread(target=ask, args=(url, out))
            asker.start()
            # Without the check nothing notices: give it the client's whole wait, and a little.
            limit = float(settings.get("UPSTREAM_TIMEOUT", "600")) + 5
            try:
                wait_until(lambda: read_status(state).get("state") != "serving", limit)
                detected.append(time.monotonic() - t0)
            except TimeoutError:
                detected.append(float("inf"))  # never noticed
            asker.join(limit)
            waits.append(out.get("s", float("nan")))
            statuses.append(out.get("status"))
            if read_status(state).get("model_run") == run_no:  # not noticed: the bench ends the hang itself
                os.kill(api, signal.SIGKILL)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        shutil.rmtree(state, ignore_errors=True)
    row = {
        "settings": settings,
        "detected_median_s": statistics.median(detected),
        "detected_max_s": max(detected),
        "wait_median_s": statistics.median(waits),
        "wait_max_s": max(waits),
        "statuses": statuses,
    }
    print(f"  {settings}: {row}", file=sys.stderr)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--upstream-timeout", default="30")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rng = random.Random(1)
    cases = [
        {"LIVENESS_INTERVAL": "0", "UPSTREAM_TIMEOUT": args.upstream_timeout},
        {"UPSTREAM_TIMEOUT": args.upstream_timeout},  # the defaults: every 5 s, 3 s timeout, 3 failures
        {"LIVENESS_INTERVAL": "1", "LIVENESS_TIMEOUT": "1", "UPSTREAM_TIMEOUT": args.upstream_timeout},
    ]
    rows = [run(c, args.repeats, rng) for c in cases]
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "repeats": args.repeats, "rows": rows}, indent=2))
    print("| liveness | hang noticed median / max | client waited median / max | client got |")
    print("|---|---:|---:|---|")
    for r in rows:
        s = r["settings"]
        what = "off" if s.get("LIVENESS_INTERVAL") == "0" else f"every {s.get('LIVENESS_INTERVAL', '5')} s"
        print(
            f"| {what} | {r['detected_median_s']:.1f} / {r['detected_max_s']:.1f} s "
            f"| {r['wait_median_s']:.1f} / {r['wait_max_s']:.1f} s | {sorted(set(map(str, r['statuses'])))} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
