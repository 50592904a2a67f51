#!/usr/bin/env python3
"""Gateway benchmark: the same upstream reached three ways, side by side in one run.

  direct   straight to the model server's port, with the daemon's internal key (read, as the
           benchmark's own user, from /proc/<API server pid>/environ: VLLM_API_KEY);
  gateway  the real daemon (`python -m watchdog_llm run`), through its public gateway on PUBLIC_PORT
           with a client key from PUBLIC_API_KEYS;
  litellm  LiteLLM's proxy (`litellm --config`), one worker, pointed at the same model server.

The model server is vllm-standin (no GPU) started by the daemon, with STANDIN_TOKEN_DELAY_MS=0 and
its access log off: it answers at once, so what is measured is the HTTP path, not a model.

Measured per target, in rounds (each round runs every phase for every target, the order of targets
rotated round to round, so that noise hits all three alike; reported: the median across rounds):
  - non-streamed chat completions, closed loop: latency p50/p99 at concurrency 1 and 64, and
    throughput (requests/s) at 64;
  - streamed chat completion (one at a time, a ~1200-word prompt, max_tokens 1024; the stand-in
    emits one word per token): content tokens per second over the whole request, time to first token;
  - CPU seconds used by each process (client, model API server, daemon, LiteLLM) per phase.

    .venv/bin/python bench/gateway.py [--rounds 3] [--n1 400] [--n64 3000] [--streams 5] [--json out.json]

The load generator is one asyncio httpx client in this process (--procs N splits the closed loops
over N processes). On a small machine client, proxy and model server compete for the same cores:
the CPU columns say who used what. These numbers are for docs/PERFORMANCE.md, not assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from yield_bench import VENV_BIN, daemon_env, pct, read_status, start_daemon, wait_until
from yield_bench import machine as _machine

TARGETS = ("direct", "gateway", "litellm")
MODEL = "bench/standin"
SHORT_PROMPT = "Say something short about benchmarks please"  # 6 words: a 7-token answer
LONG_WORDS = 1200  # words of the streamed prompt: the answer is cut at max_tokens
MAX_TOKENS_SHORT = 16


# ---- the load generator ------------------------------------------------------------------------


class Client:
    """Keep-alive HTTP/1.1 connections to one target: worker i of a closed loop always uses slot i.

    httpx (the default): one AsyncClient per slot, each with a single connection. One shared
    AsyncClient with a 64-connection pool costs the client ~3x the CPU per request at c=64 (httpcore
    walks its whole pool on every request), which made the client the bottleneck. aiohttp
    (--client aiohttp): one session, its connector holds the connections; cheaper still."""

    def __init__(self, kind: str, slots: int) -> None:
        self.kind = kind
        self.httpx: list[httpx.AsyncClient] = []
        self.session: Any = None
        if kind == "httpx":
            self.httpx = [
                httpx.AsyncClient(
                    timeout=httpx.Timeout(120.0),
                    limits=httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=300),
                    trust_env=False,
                )
                for _ in range(slots)
            ]
        else:
            import aiohttp

            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=slots + 8, keepalive_timeout=300),
                timeout=aiohttp.ClientTimeout(total=120),
                trust_env=False,
            )

    async def post(self, slot: int, url: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        if self.session is None:
            r = await self.httpx[slot].post(url, content=body, headers=headers)
            return r.status_code, r.content
        async with self.session.post(url, data=body, headers=headers) as r:
            return r.status, await r.read()

    @contextlib.asynccontextmanager
    async def stream(self, url: str, headers: dict[str, str], body: bytes) -> Any:
        """(status, async iterator of body bytes)."""
        if self.session is None:
            async with self.httpx[0].stream("POST", url, content=body, headers=headers) as r:
                yield r.status_code, r.aiter_bytes()
        else:
            async with self.session.post(url, data=body, headers=headers) as r:
                yield r.status, r.content.iter_any()

    async def aclose(self) -> None:
        for c in self.httpx:
            await c.aclose()
        if self.session is not None:
            await self.session.close()


async def closed_loop(
    client: Client, url: str, headers: dict[str, str], body: bytes, n: int, conc: int
) -> dict[str, Any]:
    """`conc` workers send `n` requests in all, each the next as soon as its previous one is answered."""
    lat: list[float] = []
    errors: Counter[str] = Counter()
    left = n

    async def worker(slot: int) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t0 = time.perf_counter()
            try:
                status, content = await client.post(slot, url, headers, body)
            except Exception as e:  # counted, whatever it is (httpx's, aiohttp's, OSError)
                errors[type(e).__name__] += 1
                continue
            t1 = time.perf_counter()
            if status != 200 or b'"choices"' not in content:
                errors[f"HTTP {status}"] += 1
                continue
            lat.append(t1 - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(conc)))
    t1 = time.perf_counter()
    return {"lat": lat, "errors": dict(errors), "start": t0, "end": t1}


def _proc_main(args: tuple[str, str, dict[str, str], bytes, int, int, Any, Any]) -> None:
    kind, url, headers, body, n, conc, barrier, out = args

    async def run() -> dict[str, Any]:
        client = Client(kind, conc)
        try:
            await closed_loop(client, url, headers, body, min(n, 4 * conc), conc)  # its own warm-up
            barrier.wait()
            return await closed_loop(client, url, headers, body, n, conc)
        finally:
            await client.aclose()

    out.put(asyncio.run(run()))


def closed_loop_procs(
    kind: str, procs: int, url: str, headers: dict[str, str], body: bytes, n: int, conc: int
) -> dict[str, Any]:
    """The same closed loop split over `procs` processes (time.perf_counter is system-wide on Linux)."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs)
    out = ctx.Queue()
    shares = [n // procs + (i < n % procs) for i in range(procs)]
    concs = [conc // procs + (i < conc % procs) for i in range(procs)]
    ps = [
        ctx.Process(target=_proc_main, args=((kind, url, headers, body, shares[i], concs[i], barrier, out),))
        for i in range(procs)
    ]
    for p in ps:
        p.start()
    try:
        parts = [out.get(timeout=600) for _ in ps]
    finally:
        for p in ps:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    errors: Counter[str] = Counter()
    for part in parts:
        errors.update(part["errors"])
    return {
        "lat": [x for part in parts for x in part["lat"]],
        "errors": dict(errors),
        "start": min(part["start"] for part in parts),
        "end": max(part["end"] for part in parts),
    }


async def stream_once(client: Client, url: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """One streamed chat completion: content tokens received, time to the first, time to [DONE]."""
    tokens = 0
    first: float | None = None
    done = False
    buf = b""
    t0 = time.perf_counter()
    async with client.stream(url, headers, body) as (status, chunks):
        if status != 200:
            text = b"".join([c async for c in chunks])[:200]
            return {"error": f"HTTP {status}: {text!r}"}
        async for chunk in chunks:
            buf += chunk
            *events, buf = buf.replace(b"\r\n", b"\n").split(b"\n\n")
            for ev in events:
                if not ev.startswith(b"data: "):
                    continue
                data = ev[6:]
                if data == b"[DONE]":
                    done = True
                    continue
                for choice in json.loads(data).get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        tokens += 1
                        if first is None:
                            first = time.perf_counter()
    t1 = time.perf_counter()
    return {
        "tokens": tokens,
        "done": done,
        "seconds": t1 - t0,
        "ttft_ms": ((first or t1) - t0) * 1000,
        "tokens_per_s": tokens / (t1 - t0),
    }


# ---- what runs: the daemon (model server + gateway) and LiteLLM ---------------------------------


class Rig:
    """The daemon serving the stand-in, and LiteLLM in front of the same model server. Every process
    started here is stopped by close(), whatever happened."""

    def __init__(self, work: Path, standin_as_is: bool, daemon_uvloop: bool = False) -> None:
        self.work = work
        self.standin_as_is = standin_as_is
        self.daemon_uvloop = daemon_uvloop
        self.daemon: subprocess.Popen[bytes] | None = None
        self.litellm: subprocess.Popen[bytes] | None = None
        self.model_procs: list[psutil.Process] = []
        self.public_key = "bench-" + secrets.token_urlsafe(24)
        self.master_key = "sk-bench-" + secrets.token_urlsafe(24)
        self.internal_key = ""
        self.urls: dict[str, str] = {}
        self.keys: dict[str, str] = {}
        self.pids: dict[str, int] = {"client": os.getpid()}
        self.litellm_config = ""

    def start_daemon(self) -> None:
        state = self.work / "state"
        state.mkdir()
        cgroot = self.work / "cgroup"
        (cgroot / "system.slice").mkdir(parents=True)  # an empty job tree: no yield during the run
        env = daemon_env(
            state,
            CGROUP_ROOT=str(cgroot),
            PUBLIC_API_KEYS=f"bench:{self.public_key}",
            MAX_CONCURRENT_PER_KEY="256",  # above the benchmark's concurrency: the limiter runs, never refuses
            VLLM_ARGS="--disable-uvicorn-access-log",
            STANDIN_TOKEN_DELAY_MS="0",
            STANDIN_FAST_EXIT="1",
            # vLLM over TCP, as in the measurements before SERVER_SOCKET: "direct" and LiteLLM
            # need a port (they are the comparison, outside the daemon's trust boundary).
            SERVER_SOCKET="off",
        )
        env["NUM_GPUS"] = "1"  # tensor parallel 1: API server + EngineCore, no idle workers
        if not self.standin_as_is:
            wrapper = self.work / "vllm-standin"
            wrapper.write_text(NODELAY_STANDIN.format(python=sys.executable))
            wrapper.chmod(0o755)
            env["LLM_BIN"] = str(wrapper)
        if self.daemon_uvloop:
            site = self.work / "site"
            site.mkdir()
            (site / "sitecustomize.py").write_text(DAEMON_UVLOOP)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH", "")]))
        self.daemon = start_daemon(env, state)
        st = wait_until(
            lambda: (s := read_status(state)).get("state") == "serving" and s.get("model_pids") and s, 60, 0.05
        )
        self.model_procs = [psutil.Process(p) for p in st["model_pids"]]
        api = [p for p in self.model_procs if p.name() == "vllm-standin"] or sorted(
            self.model_procs, key=lambda p: p.pid
        )
        server = api[0]
        environ = Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
        key = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"VLLM_API_KEY=")]
        if not key or not key[0]:
            raise RuntimeError(f"no VLLM_API_KEY in the environment of the model's API server (pid {server.pid})")
        self.internal_key = key[0].decode()
        self.pids.update(daemon=self.daemon.pid, model=server.pid)
        self.server_port = int(env["SERVER_PORT"])
        self.urls["direct"] = f"http://127.0.0.1:{env['SERVER_PORT']}/v1/chat/completions"
        self.urls["gateway"] = f"http://127.0.0.1:{env['PUBLIC_PORT']}/v1/chat/completions"
        self.keys["direct"] = self.internal_key
        self.keys["gateway"] = self.public_key
        self.daemon_log = state / "daemon.log"

    def start_litellm(self) -> None:
        from watchdog_llm.supervise.probes import free_port

        port = free_port()
        cfg = self.work / "litellm.yaml"
        self.litellm_config = LITELLM_CONFIG.format(model=MODEL, port=self.server_port)
        cfg.write_text(self.litellm_config)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LITELLM", "DATABASE_URL", "OPENAI"))}
        env.update(
            BENCH_UPSTREAM_KEY=self.internal_key,  # the YAML reads it: os.environ/BENCH_UPSTREAM_KEY
            BENCH_LITELLM_MASTER_KEY=self.master_key,
            LITELLM_LOG="ERROR",  # uvicorn's access log and LiteLLM's INFO lines off
            LITELLM_LOCAL_MODEL_COST_MAP="True",  # no fetch of the cost map at start-up (no network here)
            LITELLM_MODE="PRODUCTION",  # no .env loading
        )
        self.litellm = subprocess.Popen(
            [str(VENV_BIN / "litellm"), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=self.work,
            stdout=open(self.work / "litellm.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: close() kills all of it
        )
        self.pids["litellm"] = self.litellm.pid
        self.urls["litellm"] = f"http://127.0.0.1:{port}/v1/chat/completions"
        self.keys["litellm"] = self.master_key

        def up() -> bool:
            if self.litellm is not None and self.litellm.poll() is not None:
                tail = (self.work / "litellm.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"litellm exited with {self.litellm.returncode}:\n{tail}")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health/liveliness", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 180, 0.2)

    def close(self) -> None:
        if self.litellm is not None and self.litellm.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.litellm.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.litellm.wait(15)
        if self.litellm is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.litellm.pid, signal.SIGKILL)  # anything left in its group
            self.litellm.wait()
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        for p in self.model_procs:  # the daemon stops its tree; this only catches what it could not
            with contextlib.suppress(psutil.Error):
                if p.is_running():
                    print(f"  ! model process {p.pid} outlived the daemon: killing it", file=sys.stderr)
                    p.kill()


# vllm-standin binds its listening socket as socket(AF_INET, SOCK_STREAM), protocol 0. asyncio sets
# TCP_NODELAY only on connections whose socket says IPPROTO_TCP, so the stand-in's connections keep
# Nagle's algorithm: on a kept-alive connection its response body (a second small write after the
# headers) waits for the client's delayed ACK, 40 ms on Linux, for every non-streamed request, whoever
# the client is. That would hide everything measured here, and real vLLM (uvloop, which sets TCP_NODELAY
# on every TCP connection) does not do it. So by default the model server runs through this wrapper:
# the same stand-in, its socket re-wrapped from the same file descriptor, which reads back protocol 6.
# --standin-as-is runs the stand-in unchanged.
NODELAY_STANDIN = """#!{python}
import socket
import sys

from watchdog_llm.standin import vllm

_bind = vllm._bind


def bind(*args, **kwargs):
    return socket.socket(fileno=_bind(*args, **kwargs).detach())


vllm._bind = bind
sys.exit(vllm.main())
"""


# --daemon-uvloop: the daemon's event loop is uvloop's, as `asyncio.run(serve(s))` -> `uvloop.run(serve(s))`
# in watchdog_llm/cli.py would make it. Only the daemon's process: the model server, LiteLLM (which picks
# uvloop itself) and the load generator are as they are.
DAEMON_UVLOOP = """\
import sys

if sys.orig_argv[1:3] == ["-m", "watchdog_llm"]:
    import asyncio

    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
"""


# LiteLLM's proxy, configured for a fair comparison: no retries, no DB (so no spend or error logs),
# no callbacks, no debug or access logs (LITELLM_LOG=ERROR), the upstream's key from the environment.
LITELLM_CONFIG = """\
model_list:
  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: http://127.0.0.1:{port}/v1
      api_key: os.environ/BENCH_UPSTREAM_KEY
      max_retries: 0
litellm_settings:
  set_verbose: false
  json_logs: false
  request_timeout: 600
  num_retries: 0
  turn_off_message_logging: true
  callbacks: []
  success_callback: []
  failure_callback: []
router_settings:
  num_retries: 0
general_settings:
  master_key: os.environ/BENCH_LITELLM_MASTER_KEY
  disable_spend_logs: true
  disable_error_logs: true
  background_health_checks: false
"""


# ---- the measurement -----------------------------------------------------------------------------


class CpuMeter:
    """CPU seconds (user + system) of the processes that matter, between two reads."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}

    def read(self) -> dict[str, float]:
        out = {}
        for name, p in self.procs.items():
            try:
                t = p.cpu_times()
                out[name] = t.user + t.system
            except psutil.Error:
                out[name] = float("nan")
        return out


def lat_summary(lat: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in lat]
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "p50": statistics.median(ms),
        "p90": pct(ms, 90),
        "p99": pct(ms, 99),
        "max": max(ms),
        "mean": statistics.fmean(ms),
    }


def bodies() -> tuple[bytes, bytes]:
    short = {
        "model": MODEL,
        "messages": [{"role": "user", "content": SHORT_PROMPT}],
        "max_tokens": MAX_TOKENS_SHORT,
    }
    words = " ".join(f"w{i % 97}x{i // 97}" for i in range(LONG_WORDS))
    long = {
        "model": MODEL,
        "messages": [{"role": "user", "content": words}],
        "max_tokens": 1024,
        "stream": True,
    }
    return json.dumps(short).encode(), json.dumps(long).encode()


async def run_phase(
    phase: str,
    target: str,
    rig: Rig,
    clients: dict[str, Client],
    meter: CpuMeter,
    args: argparse.Namespace,
    short: bytes,
    long: bytes,
) -> dict[str, Any]:
    url = rig.urls[target]
    headers = {"Authorization": f"Bearer {rig.keys[target]}", "Content-Type": "application/json"}
    c0 = meter.read()
    if phase == "stream":
        runs = [await stream_once(clients[target], url, headers, long) for _ in range(args.streams)]
        c1 = meter.read()
        bad = [r for r in runs if "error" in r or not r["done"]]
        ok = [r for r in runs if "error" not in r]
        out: dict[str, Any] = {
            "streams": len(runs),
            "failed": len(bad),
            "tokens": [r["tokens"] for r in ok],
            "tokens_per_s": statistics.median([r["tokens_per_s"] for r in ok]) if ok else None,
            "ttft_ms": statistics.median([r["ttft_ms"] for r in ok]) if ok else None,
            "seconds": statistics.median([r["seconds"] for r in ok]) if ok else None,
        }
        if bad:
            out["errors"] = [r.get("error", "no [DONE]") for r in bad]
        n = max(1, len(runs))
    else:
        conc, n = (1, args.n1) if phase == "c1" else (64, args.n64)
        if args.procs > 1 and conc > 1:
            r = await asyncio.to_thread(closed_loop_procs, args.client, args.procs, url, headers, short, n, conc)
        else:
            r = await closed_loop(clients[target], url, headers, short, n, conc)
        c1 = meter.read()
        dur = r["end"] - r["start"]
        out = {
            "concurrency": conc,
            **lat_summary(r["lat"]),
            "errors": r["errors"],
            "seconds": dur,
            "rps": len(r["lat"]) / dur,
        }
    out["cpu_ms_per_request"] = {k: (c1[k] - c0[k]) * 1000 / n for k in c0}
    return out


async def bench(rig: Rig, args: argparse.Namespace) -> dict[str, Any]:
    short, long = bodies()
    meter = CpuMeter(rig.pids)
    clients = {t: Client(args.client, 64) for t in TARGETS}
    rounds: list[dict[str, dict[str, Any]]] = []
    try:
        print("-- warm-up", file=sys.stderr)
        for t in TARGETS:
            headers = {"Authorization": f"Bearer {rig.keys[t]}", "Content-Type": "application/json"}
            w1 = await closed_loop(clients[t], rig.urls[t], headers, short, 50, 1)
            w64 = await closed_loop(clients[t], rig.urls[t], headers, short, 640, 64)
            ws = [await stream_once(clients[t], rig.urls[t], headers, long) for _ in range(2)]
            if w1["errors"] or w64["errors"] or any("error" in s for s in ws):
                raise RuntimeError(f"{t}: errors during warm-up: {w1['errors']} {w64['errors']} {ws}")
            print(f"  {t}: ok ({ws[0]['tokens']} tokens streamed)", file=sys.stderr)
        for i in range(args.rounds):
            order = TARGETS[i % 3 :] + TARGETS[: i % 3]
            res: dict[str, dict[str, Any]] = {t: {} for t in TARGETS}
            for phase in ("c1", "c64", "stream"):
                for t in order:
                    res[t][phase] = r = await run_phase(phase, t, rig, clients, meter, args, short, long)
                    what = (
                        f"{r['tokens_per_s']:.0f} tokens/s"
                        if phase == "stream"
                        else f"p50 {r['p50']:.2f} ms p99 {r['p99']:.2f} ms {r['rps']:.0f} req/s"
                    )
                    errs = r.get("errors") or ""
                    print(f"  round {i + 1} {phase:6} {t:8} {what} {errs}", file=sys.stderr)
            rounds.append(res)
    finally:
        for c in clients.values():
            await c.aclose()
    return {"rounds": rounds, "median": medians(rounds)}


def medians(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    def med(t: str, phase: str, key: str) -> float:
        xs = [r[t][phase][key] for r in rounds if r[t][phase].get(key) is not None]
        return statistics.median(xs) if xs else float("nan")

    def cpu(t: str, phase: str, who: str) -> float:
        return statistics.median([r[t][phase]["cpu_ms_per_request"][who] for r in rounds])

    out: dict[str, dict[str, float]] = {}
    for t in TARGETS:
        proxy = {"direct": None, "gateway": "daemon", "litellm": "litellm"}[t]
        out[t] = {
            "p50_c1_ms": med(t, "c1", "p50"),
            "p99_c1_ms": med(t, "c1", "p99"),
            "p50_c64_ms": med(t, "c64", "p50"),
            "p99_c64_ms": med(t, "c64", "p99"),
            "rps_c64": med(t, "c64", "rps"),
            "stream_tokens_per_s": med(t, "stream", "tokens_per_s"),
            "stream_ttft_ms": med(t, "stream", "ttft_ms"),
            "proxy_cpu_ms_per_req_c64": cpu(t, "c64", proxy) if proxy else 0.0,
            "proxy_cpu_ms_per_stream": cpu(t, "stream", proxy) if proxy else 0.0,
            "model_cpu_ms_per_req_c64": cpu(t, "c64", "model"),
            "client_cpu_ms_per_req_c64": cpu(t, "c64", "client"),
        }
    return out


# ---- report -----------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    m = _machine()
    for pkg in ("httpx", "uvicorn", "h11", "httptools", "uvloop", "fastapi", "starlette", "litellm", "aiohttp"):
        try:
            m[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            m[pkg] = "not installed"
    with contextlib.suppress(OSError, ValueError):
        m["memory_gib"] = f"{psutil.virtual_memory().total / 2**30:.0f}"
    return m


ROWS = (
    ("latency p50, c=1, ms", "p50_c1_ms", "lower"),
    ("latency p99, c=1, ms", "p99_c1_ms", "lower"),
    ("latency p50, c=64, ms", "p50_c64_ms", "lower"),
    ("latency p99, c=64, ms", "p99_c64_ms", "lower"),
    ("throughput, c=64, requests/s", "rps_c64", "higher"),
    ("streamed tokens/s (1 stream, 1024 tokens)", "stream_tokens_per_s", "higher"),
    ("stream: time to first token, ms", "stream_ttft_ms", "lower"),
    ("proxy CPU per request at c=64, ms", "proxy_cpu_ms_per_req_c64", "lower"),
    ("proxy CPU per 1024-token stream, ms", "proxy_cpu_ms_per_stream", "lower"),
)


def vs_direct(key: str, d: float, g: float) -> str:
    if key == "rps_c64" or key == "stream_tokens_per_s":
        return f"{100 * g / d:.0f} % of direct"
    if key.startswith("proxy_cpu"):
        return ""
    return f"+{g - d:.2f} ms"


def vs_litellm(better: str, g: float, ll: float) -> str:
    if g <= 0 or ll <= 0:
        return "-"
    x = ll / g if better == "lower" else g / ll
    word = "ahead" if x > 1 else "behind"
    return f"{x:.1f}x ({word})" if x >= 1 else f"{1 / x:.1f}x worse ({word})"


def print_table(result: dict[str, Any]) -> None:
    m = result["machine"]
    med = result["median"]
    print(
        f"\n{m['date']} · {m['cpu']}, {m['cores']} cores, {m.get('memory_gib', '?')} GiB · Linux {m['kernel']} · "
        f"Python {m['python']} · httpx {m['httpx']}, uvicorn {m['uvicorn']}, h11 {m['h11']}, httptools "
        f"{m['httptools']}, uvloop {m['uvloop']}, litellm {m['litellm']} · {result['rounds_n']} rounds, "
        f"medians across rounds; {result['n1']} requests at c=1, {result['n64']} at c=64, "
        f"{result['streams']} streams per round and target; STANDIN_TOKEN_DELAY_MS=0; daemon event loop: "
        f"{result.get('daemon_loop', 'asyncio')}\n"
    )
    print("| figure | direct | watchdog-llm gateway | LiteLLM proxy | gateway vs direct | gateway vs LiteLLM |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, key, better in ROWS:
        d, g, ll = med["direct"][key], med["gateway"][key], med["litellm"][key]
        fmt = "{:.0f}" if key in ("rps_c64", "stream_tokens_per_s") else "{:.2f}"
        shown_d = "–" if key.startswith("proxy_cpu") else fmt.format(d)
        print(
            f"| {label} | {shown_d} | {fmt.format(g)} | {fmt.format(ll)} | {vs_direct(key, d, g)} "
            f"| {vs_litellm(better, g, ll)} |"
        )
    d, g = med["direct"], med["gateway"]
    added = g["p50_c1_ms"] - d["p50_c1_ms"]
    share = 100 * g["rps_c64"] / d["rps_c64"]
    ahead = all(
        (med["litellm"][k] / g[k] if b == "lower" else g[k] / med["litellm"][k]) > 1
        for _, k, b in ROWS
        if g[k] > 0 and med["litellm"][k] > 0
    )
    print("\nTargets:")
    print(f"  added latency at p50, c=1 <= 1 ms: {added:.2f} ms -> {'met' if added <= 1 else 'MISSED'}")
    print(f"  throughput at c=64 >= 90 % of direct: {share:.0f} % -> {'met' if share >= 90 else 'MISSED'}")
    print(f"  ahead of LiteLLM on every figure: {'met' if ahead else 'MISSED'}")
    errs = {
        t: [r[t][p].get("errors") for r in result["rounds"] for p in ("c1", "c64", "stream") if r[t][p].get("errors")]
        for t in TARGETS
    }
    if any(errs.values()):
        print(f"\nerrors: {errs}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n1", type=int, default=400, help="requests per round at concurrency 1")
    ap.add_argument("--n64", type=int, default=3000, help="requests per round at concurrency 64")
    ap.add_argument("--streams", type=int, default=5, help="streamed completions per round")
    ap.add_argument("--procs", type=int, default=1, help="client processes for the c=64 closed loop")
    ap.add_argument("--client", choices=("httpx", "aiohttp"), default="httpx", help="the load generator's HTTP client")
    ap.add_argument(
        "--standin-as-is", action="store_true", help="the model server without TCP_NODELAY (see NODELAY_STANDIN)"
    )
    ap.add_argument(
        "--daemon-uvloop", action="store_true", help="run the daemon on uvloop (see DAEMON_UVLOOP); default: asyncio"
    )
    ap.add_argument("--json", type=Path, help="default: bench/results/gateway-<date>.json")
    args = ap.parse_args()

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    work = Path(tempfile.mkdtemp(prefix="wdbench-gw-"))
    rig = Rig(work, args.standin_as_is, args.daemon_uvloop)
    t0 = time.monotonic()
    try:
        print("-- starting the daemon (stand-in model + gateway)", file=sys.stderr)
        rig.start_daemon()
        print("-- starting LiteLLM's proxy", file=sys.stderr)
        rig.start_litellm()
        print(f"   ready in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        measured = asyncio.run(bench(rig, args))
    except BaseException:
        for log in (work / "state" / "daemon.log", work / "litellm.log"):
            with contextlib.suppress(OSError):
                tail = log.read_text(errors="replace")[-2000:]
                if tail.strip():
                    print(f"--- {log.name} (tail)\n{tail}", file=sys.stderr)
        raise
    finally:
        rig.close()
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "machine": machine(),
        "rounds_n": args.rounds,
        "n1": args.n1,
        "n64": args.n64,
        "streams": args.streams,
        "client": args.client,
        "client_procs": args.procs,
        "standin_nodelay": not args.standin_as_is,
        "daemon_loop": "uvloop" if args.daemon_uvloop else "asyncio",
        "standin_token_delay_ms": 0,
        "litellm_config": rig.litellm_config,
        "litellm_env": {"LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MODE": "PRODUCTION"},
        "wall_s": time.monotonic() - t0,
        **measured,
    }
    out = args.json or Path(__file__).parent / "results" / f"gateway-{result['machine']['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"\nraw results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
