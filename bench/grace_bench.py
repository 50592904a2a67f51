#!/usr/bin/env python3
"""A model tree that ignores SIGTERM: how long after YIELD_GRACE is the whole tree gone?

Each yield must wait the full grace, then SIGKILL the group and every member; the interesting
number is the overshoot beyond the grace (target: under 0.5 s).

    .venv/bin/python bench/grace_bench.py [--arrivals 10] [--grace 1.0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from yield_bench import Tree, bench_watchdog, fmt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arrivals", type=int, default=10)
    ap.add_argument("--grace", type=float, default=1.0)
    args = ap.parse_args()
    tree = Tree(real=False)
    try:
        env = {"STANDIN_IGNORE_SIGTERM": "1", "YIELD_GRACE": str(args.grace), "STANDIN_FAST_EXIT": ""}
        r = bench_watchdog(tree, args.arrivals, 0.0, extra_env=env)
    finally:
        tree.close()
    gone = r["tree_gone_ms"]
    over = {k: (v - args.grace * 1000 if k != "n" else v) for k, v in gone.items()}
    print(f"SIGTERM-ignoring tree ({r['procs']} processes), YIELD_GRACE={args.grace} s, {args.arrivals} yields")
    print(f"job dir created -> tree gone, ms (median / p99 / max): {fmt(gone)}")
    print(f"beyond the grace, ms (median / p99 / max):             {fmt(over)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
