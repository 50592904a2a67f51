"""Swaps, the swap lock and webhooks inside the real daemon: what automation and people see through
the admin API (a real unix socket), the gateway (the openai client), a real webhook receiver, and
the processes of the model tree.

The catalog holds stand-in models: each serves the model id it is given, so `/v1/models` through
the gateway says which one runs. A model whose profile sets STANDIN_EXIT_AT_ONCE fails its start.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from daemon_harness import DaemonProc, env_with, gone, start
from helpers import TEST_KEY, wait_for
from test_webhooks import Receiver

SECRET = "webhook-secret-for-the-daemon-tests"

CATALOG = """\
default: alpha
models:
  - name: alpha
    aliases: [a]
    model: standin/alpha
    description: the first stand-in
  - name: beta
    model: standin/beta
    env:
      STANDIN_STARTUP_S: "1.0"
  - name: broken
    model: standin/broken
    env:
      STANDIN_EXIT_AT_ONCE: "3"
  - name: slow
    model: standin/slow
    env:
      STANDIN_STARTUP_S: "4"
"""


def signed_by(secret: str, body: bytes, header: str | None) -> bool:
    """What a receiver does (independent of our code): HMAC-SHA256 of the raw body, constant-time compare."""
    want = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return header is not None and hmac.compare_digest(want, header)


@pytest.fixture(scope="module")
def hooks() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture
def env(daemon_env: dict[str, str], tmp_path: Path, hooks: Receiver) -> dict[str, str]:
    with hooks.mu:
        hooks.requests.clear()
    (tmp_path / "models.yaml").write_text(CATALOG)
    path = f"/{tmp_path.name}"
    return env_with(
        daemon_env,
        MODELS=str(tmp_path / "models.yaml"),
        MODEL_NAME="",
        WEBHOOK_URLS=hooks.base + path,
        WEBHOOK_SECRET=SECRET,
        STARTUP_TIMEOUT="20",
    )


def admin(d: DaemonProc) -> httpx.Client:
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(d.state_dir / "admin.sock")), base_url="http://admin", timeout=10
    )


def served_model(d: DaemonProc) -> str:
    c = openai.OpenAI(base_url=d.status()["public_url"] + "/v1", api_key=TEST_KEY, max_retries=0, timeout=10)
    return c.models.list().data[0].id


def events(hooks: Receiver, env: dict[str, str], name: str) -> list[dict[str, Any]]:
    path = "/" + env["WEBHOOK_URLS"].rsplit("/", 1)[1]
    out = []
    for r in hooks.on(path):
        if r.headers.get("X-Spark-Event") == name:
            assert signed_by(SECRET, r.body, r.headers.get("X-Spark-Signature")), r.headers
            out.append(json.loads(r.body))
    return out


def wait_swap(c: httpx.Client, swap_id: str, state: str, timeout: float = 30.0) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        rec = c.get(f"/api/swap/{swap_id}").json()
        if rec["state"] in ("ready", "failed") and rec["state"] != state:
            raise AssertionError(f"swap ended {rec['state']}, not {state}: {rec}")
        return rec if rec["state"] == state else None

    result: dict[str, Any] = wait_for(check, timeout, 0.05, f"swap {swap_id} {state}")
    return result


def read_stream(c: httpx.Client, swap_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The swap's server-sent events until the server ends the stream."""
    got: list[tuple[str, dict[str, Any]]] = []
    with c.stream("GET", f"/api/swap/{swap_id}/stream", timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        event = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                got.append((event, json.loads(line[6:])))
    return got


def test_swap_streams_the_new_models_log_and_serves_it_with_the_old_tree_gone(daemons, env, hooks) -> None:
    d = start(daemons, env)
    st = d.wait_state("serving")
    assert st["model"] == "alpha" and served_model(d) == "standin/alpha"
    old_pids = st["model_pids"]
    environ = Path(f"/proc/{min(old_pids)}/environ").read_text(errors="replace")
    assert SECRET not in environ and env["WEBHOOK_URLS"] not in environ  # the daemon's secrets stay with it
    with admin(d) as c:
        models = c.get("/api/models").json()
        assert [(m["name"], m["active"]) for m in models["models"]][:2] == [("alpha", True), ("beta", False)]
        r = c.post("/api/swap", json={"model": "beta"})
        assert r.status_code == 202, r.text
        swap = r.json()
        assert r.headers["location"] == f"/api/swap/{swap['id']}"
        assert swap["model"] == "beta" and swap["previous"] == "alpha"
        stream = read_stream(c, swap["id"])
        final = wait_swap(c, swap["id"], "ready")
        # While the swap ran, a second one is refused with the running one named.
        assert [m["name"] for m in c.get("/api/models").json()["models"] if m["active"]] == ["beta"]
    states = [data["state"] for ev, data in stream if ev == "state"]
    assert states[-1] == "ready" and "starting" in states
    lines = [data["line"] for ev, data in stream if ev == "log"]
    assert any("standin/beta" in line for line in lines), lines[:20]  # vLLM's own log lines, live
    assert gone(old_pids)  # never two models at once: the old tree died before the new one was ready
    assert served_model(d) == "standin/beta"
    assert d.status()["model"] == "beta" and final["finished_at"] is not None
    done = wait_for(lambda: events(hooks, env, "swap_complete"), 10, 0.05, "swap_complete webhook")
    assert done[0]["model"] == "beta" and done[0]["previous"] == "alpha" and done[0]["node"] == "testnode"
    assert done[0]["swap_id"] == swap["id"] and done[0]["duration_s"] > 0


def test_a_second_swap_while_one_runs_is_409_naming_it_and_unknown_models_are_404(daemons, env) -> None:
    d = start(daemons, env)
    d.wait_state("serving")
    with admin(d) as c:
        first = c.post("/api/swap", json={"model": "slow"}).json()
        r = c.post("/api/swap", json={"model": "beta"})
        assert r.status_code == 409 and r.headers["retry-after"]
        body = r.json()
        assert body["error"] == "swap_in_progress" and first["id"] in body["message"]
        assert body["running"]["id"] == first["id"] and body["retryable"] is True
        r = c.post("/api/swap", json={"model": "gamma"})
        assert r.status_code == 404 and r.json()["error"] == "unknown_model"
        assert "alpha" in r.json()["message"] and "beta" in r.json()["message"]
        r = c.post("/api/swap", json={"model": ""})
        assert r.status_code == 422 and r.json()["error"] == "invalid_request"
        wait_swap(c, first["id"], "ready")
        r = c.post("/api/swap", json={"model": "a"})  # by alias
        assert r.status_code == 202 and r.json()["model"] == "alpha"


def test_a_model_that_fails_to_start_fails_the_swap_with_its_log_and_the_old_one_comes_back(
    daemons, env, hooks
) -> None:
    d = start(daemons, env)
    d.wait_state("serving")
    with admin(d) as c:
        swap = c.post("/api/swap", json={"model": "broken"}).json()
        failed = wait_swap(c, swap["id"], "failed")
        assert "exit" in failed["error"]
        assert any("STANDIN_EXIT_AT_ONCE" in line for line in failed["log_tail"]), failed["log_tail"]
        stream = read_stream(c, swap["id"])  # a finished swap streams its end at once
        assert stream[-1][0] == "state" and stream[-1][1]["state"] == "failed"
    st = d.wait_state("serving")
    assert st["model"] == "alpha" and served_model(d) == "standin/alpha"
    bad = wait_for(lambda: events(hooks, env, "swap_failed"), 10, 0.05, "swap_failed webhook")
    assert bad[0]["model"] == "broken" and bad[0]["error"] and bad[0]["log_tail"]


def test_swap_lock_gates_swaps_survives_a_restart_and_force_is_webhooked(daemons, env, hooks, ntfy) -> None:
    d = start(daemons, env)
    d.wait_state("serving")
    with admin(d) as c:
        r = c.post("/api/swap/lock", json={"holder": "demo-dashboard", "ttl_s": 600, "reason": "live demo"})
        assert r.status_code == 200
        token = r.json()["token"]
        assert r.json()["locked"] and token
        r = c.post("/api/swap/lock", json={"holder": "nightly-cron", "ttl_s": 60})
        assert r.status_code == 423 and r.json()["lock"]["holder"] == "demo-dashboard"
        r = c.post("/api/swap", json={"model": "beta"})
        assert r.status_code == 423 and "demo-dashboard" in r.json()["message"]
        r = c.post("/api/swap", json={"model": "beta"}, headers={"X-Swap-Lock-Token": "x" * 5000})
        assert r.status_code in (422, 423)  # far too long a token is no token
        shown = c.get("/api/swap/lock").json()
        assert shown["holder"] == "demo-dashboard" and shown.get("token") is None and token not in json.dumps(shown)
        assert token not in (d.state_dir / "lock.json").read_text()  # only its digest is on disk
    assert d.terminate() == 0

    d2 = start(daemons, env)
    d2.wait_state("serving")
    with admin(d2) as c:
        shown = c.get("/api/swap/lock").json()
        assert shown["locked"] and shown["holder"] == "demo-dashboard" and shown["reason"] == "live demo"
        r = c.post("/api/swap", json={"model": "beta"}, headers={"X-Swap-Lock-Token": token})
        assert r.status_code == 202, r.text  # the token from before the restart still opens it
        wait_swap(c, r.json()["id"], "ready")
        assert c.delete("/api/swap/lock").status_code == 423  # no token, no force
        r = c.delete("/api/swap/lock", params={"force": "true"})
        assert r.status_code == 200 and r.json()["locked"] is False
    forced = wait_for(lambda: events(hooks, env, "lock_forced"), 10, 0.05, "lock_forced webhook")
    phone = wait_for(lambda: [m for m in ntfy.received if "lock" in json.dumps(m)], 10, 0.05, "lock notice")
    assert "demo-dashboard" in json.dumps(phone)
    assert forced[0]["holder"] == "demo-dashboard"
    assert events(hooks, env, "lock_acquired")[0]["holder"] == "demo-dashboard"


def test_a_job_arriving_mid_swap_wins_and_the_swap_completes_when_the_node_is_idle(daemons, env, hooks) -> None:
    d = start(daemons, env)
    d.wait_state("serving")
    with admin(d) as c:
        swap = c.post("/api/swap", json={"model": "slow"}).json()
        wait_swap(c, swap["id"], "starting")
        d.start_job("job_4242")
        deferred = wait_swap(c, swap["id"], "deferred")
        assert "4242" in deferred["detail"]
        st = d.wait_state("yielded")
        assert not st["model_pids"]
        assert c.get("/api/endpoints").json()["vllm"]["ready"] is False
        d.end_job("job_4242")
        wait_swap(c, swap["id"], "ready")
    assert served_model(d) == "standin/slow"
    assert events(hooks, env, "yielded")[0]["job"] == "job_4242"


def test_daemon_sigkilled_mid_swap_completes_it_after_a_restart(daemons, env) -> None:
    d = start(daemons, env)
    d.wait_state("serving")
    with admin(d) as c:
        swap = c.post("/api/swap", json={"model": "slow"}).json()
        wait_swap(c, swap["id"], "starting")
    left = d.status()["model_pids"]
    d.kill_hard()  # no shutdown at all: the model tree is left running

    d2 = start(daemons, env)
    assert gone(left, 15)  # the new daemon killed the leftovers of the old one
    d2.wait_state("serving", 30)
    with admin(d2) as c:
        rec = wait_swap(c, swap["id"], "ready")
        assert any("restarted mid-swap" in h["detail"] for h in rec["history"])
    assert served_model(d2) == "standin/slow"


def test_a_swap_while_yielded_is_deferred_and_happens_on_resume(daemons, env) -> None:
    d = start(daemons, env_with(env, RESUME_COOLDOWN="0.5"))
    d.wait_state("serving")
    d.start_job("job_77")
    d.wait_state("yielded")
    with admin(d) as c:
        swap = c.post("/api/swap", json={"model": "beta"}).json()
        assert wait_swap(c, swap["id"], "deferred")["model"] == "beta"
        time.sleep(0.3)
        assert d.status()["state"] == "yielded"  # deferred: nothing started on the job's GPUs
        d.end_job("job_77")
        wait_swap(c, swap["id"], "ready")
    assert served_model(d) == "standin/beta"


def test_corrupt_state_files_are_moved_aside_and_the_daemon_starts_clean(daemons, env) -> None:
    state = Path(env["STATE_DIR"])
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in ("lock.json", "swaps.json", "schedule.json", "connectivity.json"):
        (state / name).write_text("{not json")
    d = start(daemons, env)
    d.wait_state("serving")
    for name in ("lock.json", "swaps.json", "schedule.json", "connectivity.json"):
        assert list(state.glob(name + ".corrupt-*")), name
    with admin(d) as c:
        assert c.get("/api/swap/lock").json()["locked"] is False
        assert c.get("/api/schedule").json() == {"entries": []}
    assert "moved aside" in d.log()


def test_schedule_and_connectivity_persist_and_endpoints_say_where_the_model_is(daemons, env) -> None:
    d = start(daemons, env)
    d.wait_state("serving")
    entry = {"id": "nightly-eval", "owner": "eval-bot", "cron": "0 3 * * *", "action": "swap beta"}
    with admin(d) as c:
        r = c.post("/api/schedule", json=entry)
        assert r.status_code == 201
        assert c.post("/api/schedule", json={**entry, "description": "moved"}).status_code == 200
        assert c.post("/api/schedule", json={**entry, "id": "../etc"}).status_code == 422
        assert c.post("/api/schedule", json={**entry, "cron": "99 * * * *"}).status_code == 422
        r = c.post("/api/health-event", json={"service": "vllm", "ok": False, "source": "spark-ui", "ms": 12.5})
        assert r.status_code == 201
        ep = c.get("/api/endpoints").json()
        assert ep["vllm"]["ready"] is True and ep["vllm"]["model"] == "alpha" and ep["vllm"]["openai_compat"]
        assert ep["vllm"]["base_url"] == d.status()["public_url"] + "/v1"
        check = c.post("/api/swap/beta/validate").json()
        assert check["ok"] is True and check["command"][1:3] == ["serve", "standin/beta"]
        assert c.post("/api/swap/nope/validate").status_code == 404
    assert d.terminate() == 0
    d2 = start(daemons, env)
    d2.wait_state("serving")
    with admin(d2) as c:
        entries = c.get("/api/schedule").json()["entries"]
        assert [(e["id"], e["description"]) for e in entries] == [("nightly-eval", "moved")]
        log = c.get("/api/connectivity").json()["events"]
        assert [(e["service"], e["ok"], e["source"]) for e in log] == [("vllm", False, "spark-ui")]
        assert c.delete("/api/schedule/nightly-eval").status_code == 200
        assert c.delete("/api/schedule/nightly-eval").status_code == 404


def test_racing_clients_one_lock_holder_and_a_swap_racing_a_lock_is_all_or_nothing(daemons, env) -> None:
    import threading

    d = start(daemons, env)
    d.wait_state("serving")
    go = threading.Barrier(9)
    answers: list[tuple[str, int, dict[str, Any]]] = []

    def take(who: str) -> None:
        with admin(d) as c:
            go.wait()
            r = c.post("/api/swap/lock", json={"holder": who, "ttl_s": 60})
            answers.append((who, r.status_code, r.json()))

    def swap() -> None:
        with admin(d) as c:
            go.wait()
            r = c.post("/api/swap", json={"model": "beta"})
            answers.append(("swap", r.status_code, r.json()))

    threads = [threading.Thread(target=take, args=(f"client-{i}",)) for i in range(8)] + [threading.Thread(target=swap)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    locks = [(who, code, body) for who, code, body in answers if who != "swap"]
    winners = [who for who, code, _ in locks if code == 200]
    assert len(winners) == 1, locks
    assert all(code == 423 and body["lock"]["holder"] == winners[0] for who, code, body in locks if who != winners[0])
    ((_, code, body),) = [a for a in answers if a[0] == "swap"]
    with admin(d) as c:
        if code == 202:  # admitted before the lock was taken: it runs to the end
            wait_swap(c, body["id"], "ready")
        else:  # the lock came first: refused, and nothing was opened
            assert code == 423 and body["lock"]["holder"] == winners[0]
            assert d.status()["swap"] is None and d.status()["model"] == "alpha"


def test_a_deferred_swap_replaced_by_one_that_fails_brings_back_what_served_before_and_a_restart_keeps_it(
    daemons, env
) -> None:
    d = start(daemons, env)
    d.wait_state("serving")
    d.start_job("job_78")
    d.wait_state("yielded")
    with admin(d) as c:
        first = c.post("/api/swap", json={"model": "beta"}).json()
        wait_swap(c, first["id"], "deferred")
        second = c.post("/api/swap", json={"model": "broken"}).json()  # replaces the deferred one
        assert second["previous"] == "alpha"  # beta never served
        assert "superseded" in wait_swap(c, first["id"], "failed")["error"]
        d.end_job("job_78")
        wait_swap(c, second["id"], "failed")
    st = d.wait_state("serving")
    assert st["model"] == "alpha"
    assert d.terminate() == 0
    d2 = start(daemons, env)
    assert d2.wait_state("serving")["model"] == "alpha"
    assert served_model(d2) == "standin/alpha"


def test_the_gateway_routes_by_the_requests_model_catalog_names_included(daemons, env) -> None:
    """The served model by its id or its catalog name (or alias, any case); with ON_DEMAND=off another
    catalog model is 409 model_not_loaded; a name nobody has is 404 listing what there is, in our envelope."""
    d = start(daemons, env_with(env, ON_DEMAND="off"))
    d.wait_state("serving")
    c = openai.OpenAI(base_url=d.status()["public_url"] + "/v1", api_key=TEST_KEY, max_retries=0, timeout=10)
    hi = [{"role": "user", "content": "hi"}]
    # /v1/models lists the whole catalog; each card says which entry it is and whether it is loaded.
    cards = [(m.id, m.model_extra["watchdog_llm"]) for m in c.models.list().data]  # type: ignore[index]
    assert cards == [
        ("standin/alpha", {"name": "alpha", "loaded": True}),
        ("standin/beta", {"name": "beta", "loaded": False}),
        ("standin/broken", {"name": "broken", "loaded": False}),
        ("standin/slow", {"name": "slow", "loaded": False}),
    ]
    for name in ("standin/alpha", "alpha", "A", "ALPHA"):
        r = c.chat.completions.create(model=name, messages=hi, max_tokens=2)
        assert r.model == "standin/alpha" and r.usage is not None and r.usage.completion_tokens == 2, name
    with pytest.raises(openai.ConflictError) as conflict:
        c.chat.completions.create(model="beta", messages=hi, max_tokens=2)
    body = conflict.value.body
    assert isinstance(body, dict) and body["code"] == "model_not_loaded", body
    assert "'beta' (beta) is not loaded: this endpoint serves standin/alpha now" in body["message"]
    with pytest.raises(openai.ConflictError):
        c.completions.create(model="standin/slow", prompt="x", max_tokens=2)  # another entry by its model id
    with pytest.raises(openai.NotFoundError) as missing:
        c.chat.completions.create(model="gpt-5", messages=hi, max_tokens=2)
    body = missing.value.body
    assert isinstance(body, dict) and body["code"] == "model_not_found", body
    assert body["message"] == "model 'gpt-5' is not served here (models: beta, broken, slow, standin/alpha)"
    # After a swap the other way round: beta serves, alpha is the one not loaded.
    with admin(d) as a:
        wait_swap(a, a.post("/api/swap", json={"model": "beta"}).json()["id"], "ready")
    assert c.chat.completions.create(model="beta", messages=hi, max_tokens=2).model == "standin/beta"
    with pytest.raises(openai.ConflictError):
        c.chat.completions.create(model="alpha", messages=hi, max_tokens=2)


def _ask(d: DaemonProc, model: str, out: dict[str, Any], key: str, **kw: Any) -> threading.Thread:
    """A chat request in a thread; its answer (or error) lands in out[key]."""

    def run() -> None:
        c = openai.OpenAI(base_url=d.status()["public_url"] + "/v1", api_key=TEST_KEY, max_retries=0, timeout=60)
        try:
            out[key] = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], **kw)
        except openai.APIStatusError as e:
            out[key] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_on_demand_a_request_for_another_model_swaps_to_it_once_the_served_one_is_free(daemons, env) -> None:
    d = start(daemons, env_with(env, MIN_RESIDENCY="2", ON_DEMAND_QUEUE="2", STANDIN_TOKEN_DELAY_MS="30"))
    d.wait_state("serving")
    c = openai.OpenAI(base_url=d.status()["public_url"] + "/v1", api_key=TEST_KEY, max_retries=0, timeout=60)
    hi = [{"role": "user", "content": "hi"}]
    # A long answer from alpha is under way: requests for beta wait for it to end, never cut it.
    stream = c.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": " ".join(["w"] * 300)}], max_tokens=200, stream=True
    )
    first = next(iter(stream))
    out: dict[str, Any] = {}
    waiters = [_ask(d, "beta", out, f"beta{i}", max_tokens=2) for i in range(3)]
    wait_for(lambda: sum(1 for k in out if isinstance(out[k], openai.APIStatusError)) == 1 or None, 10)
    # While they wait: status, the CLI and the metrics say so.
    with admin(d) as a:  # live (status.json is written on the daemon's decisions only)
        cat = wait_for(lambda: (c_ := a.get("/api/status").json()["catalog"]) and c_[1]["waiting"] == 2 and c_, 10)
    assert [(e["name"], e["state"]) for e in cat[:2]] == [("alpha", "resident"), ("beta", "not_loaded")]
    human = subprocess.run([sys.executable, "-m", "watchdog_llm", "status"], env=d.env, capture_output=True, text=True)
    assert "models:  alpha resident, beta not_loaded (2 waiting), broken not_loaded" in human.stdout, human.stdout
    with admin(d) as a:
        assert 'watchdog_llm_on_demand_waiting{model="beta"} 2.0' in a.get("/metrics").text
    full = [first, *stream]
    assert full[-1].choices[0].finish_reason in ("stop", "length")  # finished, not aborted
    for t in waiters:
        t.join(30)
    answers = [out[f"beta{i}"] for i in range(3)]
    served = [a for a in answers if not isinstance(a, openai.APIStatusError)]
    refused = [a for a in answers if isinstance(a, openai.APIStatusError)]
    # ON_DEMAND_QUEUE=2: two waited and were answered by beta; the third was told at once.
    assert len(served) == 2 and all(a.model == "standin/beta" for a in served), answers
    assert refused[0].status_code == 503 and refused[0].body["code"] == "queue_full", refused[0].body
    assert d.status()["model"] == "beta"
    with admin(d) as a:
        m = a.get("/metrics").text
        assert 'watchdog_llm_on_demand_swaps_total{model="beta"} 1.0' in m
        assert 'watchdog_llm_on_demand_wait_seconds_count{model="beta",outcome="served"} 2.0' in m
        swaps = [s for s in json.loads((d.state_dir / "swaps.json").read_text())["swaps"] if s["model"] == "beta"]
        assert len(swaps) == 1 and swaps[0]["state"] == "ready", swaps  # three requests, one swap
        # MIN_RESIDENCY: a request for alpha right after waits until beta has served 2 s.
        t0 = time.monotonic()
        r = c.chat.completions.create(model="alpha", messages=hi, max_tokens=2)
        assert r.model == "standin/alpha" and time.monotonic() - t0 >= 1.5
        # The swap lock's holder decides what serves: no swap on demand past it.
        a.post("/api/swap/lock", json={"holder": "eval-run", "ttl_s": 60})
    time.sleep(2.1)
    with pytest.raises(openai.ConflictError) as locked:
        c.chat.completions.create(model="beta", messages=hi, max_tokens=2)
    assert "swap lock is held by eval-run" in locked.value.body["message"], locked.value.body
    assert "on demand: swapping to beta for a request (consumer test)" in d.log()


def test_on_demand_waits_are_bounded_and_a_yield_is_not_waited_out(daemons, env) -> None:
    d = start(daemons, env_with(env, MIN_RESIDENCY="0", ON_DEMAND_WAIT="1", RESUME_COOLDOWN="30"))
    d.wait_state("serving")
    c = openai.OpenAI(base_url=d.status()["public_url"] + "/v1", api_key=TEST_KEY, max_retries=0, timeout=60)
    hi = [{"role": "user", "content": "hi"}]
    # `slow` takes 4 s to load: the request gives up after ON_DEMAND_WAIT, the swap goes on.
    with pytest.raises(openai.InternalServerError) as late:
        c.chat.completions.create(model="slow", messages=hi, max_tokens=2)
    assert late.value.status_code == 503 and late.value.body["code"] == "model_loading", late.value.body
    assert late.value.response.headers["retry-after"] == "30"
    d.wait_state("serving", timeout=20)
    assert c.chat.completions.create(model="slow", messages=hi, max_tokens=2).model == "standin/slow"
    # A model that cannot start: the request is told why, once, and the model before serves again.
    with pytest.raises(openai.InternalServerError) as broken:
        c.chat.completions.create(model="broken", messages=hi, max_tokens=2)
    assert broken.value.body["code"] == "model_start_failed", broken.value.body
    assert broken.value.body["message"].startswith("model broken failed to start:"), broken.value.body
    d.wait_state("serving", timeout=20)
    assert d.status()["model"] == "slow"
    tries = [s for s in json.loads((d.state_dir / "swaps.json").read_text())["swaps"] if s["model"] == "broken"]
    assert len(tries) == 1 and tries[0]["state"] == "failed", tries
    # A request waiting for a model that starts when a job arrives: it gets the yield's 503.
    out: dict[str, Any] = {}
    t = _ask(d, "beta", out, "beta", max_tokens=2)
    wait_for(lambda: d.status().get("state") in ("swapping", "starting") or None, 10)
    d.start_job("job_55")
    t.join(15)
    err = out["beta"]
    assert isinstance(err, openai.APIStatusError) and err.status_code == 503, err
    assert err.body["code"] in ("model_yielded", "model_cooldown"), err.body


def test_reload_reads_the_catalog_again_and_a_broken_one_changes_nothing(daemons, env, tmp_path) -> None:
    d = start(daemons, env)
    st = d.wait_state("serving")
    pids = st["model_pids"]
    catalog = Path(env["MODELS"])
    catalog.write_text(CATALOG.replace("description: the first stand-in", "description: renamed") + (
        "  - name: gamma\n    model: standin/gamma\n"
    ))  # fmt: skip
    reload = [sys.executable, "-m", "watchdog_llm", "reload"]
    r = subprocess.run(reload, env=d.env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "5 model(s)" in r.stdout and "added: gamma; removed: none; changed: alpha" in r.stdout, r.stdout
    assert d.status()["model_pids"] == pids  # the serving model kept running
    c = openai.OpenAI(base_url=st["public_url"] + "/v1", api_key=TEST_KEY, max_retries=0, timeout=10)
    assert "standin/gamma" in [m.id for m in c.models.list().data]  # the gateway knows it at once
    # A broken file: every problem said, the catalog as it was.
    catalog.write_text("models:\n  - {name: alpha, model: standin/alpha, gpu: 2}\n  - {name: beta}\n")
    r = subprocess.run(reload, env=d.env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "model 'alpha': unknown field 'gpu'" in r.stderr and "model 'beta': model:" in r.stderr, r.stderr
    with admin(d) as a:
        assert [m["name"] for m in a.get("/api/models").json()["models"]][-1] == "gamma"
    # Without the model that serves: refused (swap first).
    catalog.write_text("models:\n  - {name: beta, model: standin/beta}\n")
    r = subprocess.run(reload, env=d.env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "model 'alpha' serves now and is not in it" in r.stderr, r.stderr
    # SIGUSR1 does the same, into the log.
    catalog.write_text(CATALOG)
    os.kill(d.proc.pid, signal.SIGUSR1)
    wait_for(lambda: "added none; removed gamma; changed alpha" in d.log() or None, 10)
    assert d.status()["state"] == "serving" and d.status()["model_pids"] == pids
