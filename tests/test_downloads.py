"""Model downloads in the real daemon: the hub's own client (huggingface_hub) against a stand-in hub
(watchdog_llm/standin/hfhub.py, HF_ENDPOINT pointing at it) serving a repo of a few MB, paced so that
progress, cancelling and resuming can be watched. Here, and on a host over the real sshd."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from daemon_harness import DaemonProc, env_with, start
from helpers import alive, wait_for
from sshd_harness import AVAILABLE, MISSING, REQUIRED, Sshd
from test_coordination_daemon import admin

from watchdog_llm.coordination.hosts import Host
from watchdog_llm.remote.ssh import accept, asyncssh, ensure_key
from watchdog_llm.standin.hfhub import Hub

pytestmark = pytest.mark.timeout(120)
SIZES = (500_000, 1_000_000, 2_000_000, 3_000_000, 4_000_000)  # they finish one after another
FILES = len(SIZES)
TOKEN = "hf_test_token_0123456789"


@pytest.fixture
def hub() -> Iterator[Hub]:
    root = Path(tempfile.mkdtemp(prefix="wdl-hub-"))
    tiny = root / "org" / "tiny"
    tiny.mkdir(parents=True)
    for i, size in enumerate(SIZES):
        (tiny / f"model-{i:05d}-of-{FILES:05d}.safetensors").write_bytes(os.urandom(size))
    (tiny / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (root / "org" / "gated").mkdir()
    (root / "org" / "gated" / "config.json").write_text("{}")
    (root / "org" / "gated" / ".gated").touch()
    h = Hub(root, 0, 1_500_000, TOKEN)  # per connection: ~2.7 s for the repo, to watch and to cancel
    threading.Thread(target=h.serve_forever, daemon=True).start()
    yield h
    h.shutdown()
    h.server_close()
    subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture
def env(daemon_env: dict[str, str], tmp_path: Path, hub: Hub) -> dict[str, str]:
    os.chmod(tmp_path, 0o755)  # the cache is reached by the host's user too (root here, but say so)
    return env_with(
        daemon_env,
        HF_ENDPOINT=f"http://127.0.0.1:{hub.server_address[1]}",
        HF_HUB_CACHE=str(tmp_path / "hf-cache"),
        HF_HUB_DISABLE_TELEMETRY="1",
    )


def follow(c: httpx.Client, download_id: str) -> list[dict[str, Any]]:
    got = []
    with c.stream("GET", f"/api/downloads/{download_id}/stream", timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                got.append(json.loads(line[6:]))
    return got


def gets(hub: Hub, since: int = 0) -> list[str]:
    with hub.mu:
        return [r for r in hub.requests[since:] if r.startswith("GET /org/") and "/resolve/" in r]


def jobs() -> list[int]:
    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if "watchdog_llm.download_job" in " ".join(p.info["cmdline"] or [])
    ]


def test_a_download_reports_progress_rate_and_eta_and_lands_in_the_hubs_cache(
    env: dict[str, str], hub: Hub, daemons: list[DaemonProc]
) -> None:
    d = start(daemons, env)
    d.wait_state("serving")
    with admin(d) as c:
        r = c.post("/api/downloads", json={"repo": "org/tiny"})
        assert r.status_code == 202, r.text
        rec = r.json()
        assert r.headers["location"] == f"/api/downloads/{rec['id']}" and rec["state"] == "starting"
        events = follow(c, rec["id"])
        final = c.get(f"/api/downloads/{rec['id']}").json()
    total = sum(SIZES) + len('{"architectures": ["LlamaForCausalLM"]}')
    assert final["state"] == "done" and final["total"] == total and final["bytes"] == total, final
    percents = [e["percent"] for e in events if e["percent"] is not None]
    assert percents == sorted(percents) and percents[-1] == 100.0
    assert len({p for p in percents if 0 < p < 100}) >= 2, percents  # it moved while it ran
    assert any(e["rate"] for e in events) and any(e["eta_s"] for e in events), events
    snapshot = Path(final["path"])
    assert snapshot.is_relative_to(Path(env["HF_HUB_CACHE"]) / "models--org--tiny" / "snapshots")
    assert sorted(p.name for p in snapshot.iterdir())[0] == "config.json"
    assert sum(p.stat().st_size for p in snapshot.iterdir()) == total  # every byte, where vLLM looks
    assert final["entry"] == {"name": "tiny", "model": "org/tiny", "host": None}
    assert not jobs()
    with admin(d) as c:  # MODEL_NAME, no catalog file: nothing to add it to, and it says so
        r = c.post("/api/models", json=final["entry"])
        assert r.status_code == 409 and r.json()["error"] == "catalog_not_writable"


def test_a_downloaded_model_is_added_to_the_catalog_file_atomically_with_a_backup(
    env: dict[str, str], daemons: list[DaemonProc], tmp_path: Path
) -> None:
    catalog = tmp_path / "models.yaml"
    original = (
        "# our models\ndefault: alpha\nmodels:\n"
        "  - {name: alpha, model: standin/alpha, args: [--max-model-len, '2048'], env: {STANDIN_STARTUP_S: '0.2'}}\n"
    )
    catalog.write_text(original)
    d = start(daemons, env_with(env, MODELS=str(catalog), MODEL_NAME=""))
    d.wait_state("serving")
    with admin(d) as c:
        r = c.post("/api/models", json={"name": "tiny", "model": "org/tiny", "like": "alpha", "description": "new"})
        assert r.status_code == 201, r.text
        added = r.json()
        assert added["added"] == "tiny" and added["reload"]["added"] == ["tiny"]
        assert added["entry"]["args"] == ["--max-model-len", "2048"] and added["entry"]["env"] == ["STANDIN_STARTUP_S"]
        assert (tmp_path / "models.yaml.bak").read_text() == original  # the old file, comments and all
        names = [m["name"] for m in c.get("/api/models").json()["models"]]
        assert names == ["alpha", "tiny"]
        written = catalog.read_text()
        for body, status, code, says in (
            ({"name": "tiny", "model": "org/other"}, 409, "model_exists", "'tiny' is a name"),
            ({"name": "bad", "model": "x", "gpus": -1}, 422, "invalid_catalog", "model 'bad': gpus:"),
            ({"name": "bad", "model": "x", "like": "nope"}, 422, "invalid_catalog", "like: 'nope' is not a model"),
            ({"name": "bad", "model": "x", "colour": "red"}, 422, "invalid_catalog", "unknown field 'colour'"),
        ):
            r = c.post("/api/models", json=body)
            assert r.status_code == status and r.json()["error"] == code and says in r.text, (body, r.text)
        assert catalog.read_text() == written and not list(tmp_path.glob(".models.yaml.*"))  # nothing changed
        swap = c.post("/api/swap", json={"model": "tiny"}).json()  # and it serves: a real entry of the catalog
        wait_for(lambda: c.get(f"/api/swap/{swap['id']}").json()["state"] == "ready", 30, 0.05, "swap to tiny")


def test_a_second_download_of_the_repo_is_refused_a_cancelled_one_resumes_by_file(
    env: dict[str, str], hub: Hub, daemons: list[DaemonProc]
) -> None:
    d = start(daemons, env)
    d.wait_state("serving")
    blobs = Path(env["HF_HUB_CACHE"]) / "models--org--tiny" / "blobs"

    def finished_files() -> int:
        return len([p for p in blobs.glob("*") if not p.name.endswith(".incomplete")]) if blobs.exists() else 0

    with admin(d) as c:
        first = c.post("/api/downloads", json={"repo": "org/tiny"}).json()
        again = c.post("/api/downloads", json={"repo": "org/tiny"})
        assert again.status_code == 409 and again.json()["error"] == "download_in_progress"
        assert first["id"] in again.json()["message"] and again.json()["running"]["id"] == first["id"]
        wait_for(lambda: finished_files() >= 3, 20, 0.02, "the config and the two smallest files")
        pids = jobs()
        r = c.post(f"/api/downloads/{first['id']}/cancel")
        assert r.status_code == 202 and r.json()["state"] == "cancelling"
        wait_for(lambda: c.get(f"/api/downloads/{first['id']}").json()["state"] == "cancelled", 15, 0.05)
        assert pids and not alive(pids)  # its process tree is gone
        assert c.post(f"/api/downloads/{first['id']}/cancel").status_code == 409  # finished: nothing to cancel
        kept = finished_files()
        before = len(hub.requests)
        second = c.post("/api/downloads", json={"repo": "org/tiny"}).json()
        events = follow(c, second["id"])
    assert events[-1]["state"] == "done"
    assert events[-1]["have"] > 0  # it knew what was cached already...
    assert len(gets(hub, before)) == FILES + 1 - kept  # ...and fetched only the rest


@pytest.mark.parametrize(
    ("body", "status", "code", "says"),
    [
        ({"repo": "org/nope"}, "failed", "repo_not_found", "org/nope is not on http://127.0.0.1:"),
        ({"repo": "org/gated"}, "failed", "gated", "HF_TOKEN must be a token with access to it"),
        ({"repo": "org/tiny", "revision": "v9"}, "failed", "revision_not_found", "has no revision 'v9'"),
    ],
)
def test_a_download_the_hub_refuses_fails_with_the_reason(
    env: dict[str, str], daemons: list[DaemonProc], body: dict[str, str], status: str, code: str, says: str
) -> None:
    d = start(daemons, env)
    d.wait_state("serving")
    with admin(d) as c:
        rec = c.post("/api/downloads", json=body).json()
        final = follow(c, rec["id"])[-1]
    assert final["state"] == status and final["error"] == code and says in final["message"], final


def test_bad_requests_a_gated_repo_with_a_token_and_a_hub_that_is_down(
    env: dict[str, str], daemons: list[DaemonProc], tmp_path: Path
) -> None:
    d = start(daemons, env_with(env, HF_TOKEN=TOKEN))
    d.wait_state("serving")
    with admin(d) as c:
        for body, status, code in (
            ({"repo": "no-slash"}, 422, "invalid_request"),
            ({"repo": "org/x; rm -rf ~"}, 422, "invalid_request"),
            ({"repo": "org/tiny", "revision": "../x"}, 422, "invalid_request"),
            ({"repo": "org/tiny", "host": "nope"}, 404, "unknown_host"),
        ):
            r = c.post("/api/downloads", json=body)
            assert r.status_code == status and r.json()["error"] == code, (body, r.text)
        rec = c.post("/api/downloads", json={"repo": "org/gated"}).json()
        assert follow(c, rec["id"])[-1]["state"] == "done"  # HF_TOKEN reached the hub's client
        environ = (d.state_dir / "logs" / "downloads").iterdir()
        assert all(TOKEN not in p.read_text() for p in environ)  # and no log holds it
    d.terminate()
    down = start(daemons, env_with(env, HF_ENDPOINT="http://127.0.0.1:1", STATE_DIR=str(tmp_path / "s2")))
    down.wait_state("serving")
    with admin(down) as c:
        rec = c.post("/api/downloads", json={"repo": "org/tiny"}).json()
        final = follow(c, rec["id"])[-1]
    assert final["state"] == "failed" and final["error"] == "hub_error" and "127.0.0.1:1" in final["message"]


def test_a_full_disk_fails_the_download_and_says_so(
    env: dict[str, str], daemons: list[DaemonProc], tmp_path: Path
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True, text=True)
    if r.returncode != 0:
        if os.geteuid() == 0 and "permission" not in r.stderr.lower():
            pytest.fail(f"mount tmpfs: {r.stderr}")
        pytest.skip(f"needs a tmpfs mount (root): {r.stderr.strip()}")
    try:
        d = start(daemons, env_with(env, HF_HUB_CACHE=str(small / "hf")))
        d.wait_state("serving")
        with admin(d) as c:
            rec = c.post("/api/downloads", json={"repo": "org/tiny"}).json()
            final = follow(c, rec["id"])[-1]
        assert final["state"] == "failed" and final["error"] == "disk_full", final
        assert "no space left on the device of" in final["message"] and errno.ENOSPC
        d.terminate()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


@pytest.mark.skipif(not AVAILABLE and not REQUIRED, reason=MISSING)
def test_a_download_on_a_host_over_ssh_with_the_clis_progress(
    env: dict[str, str], sshd: Sshd, hub: Hub, tmp_path: Path, daemons: list[DaemonProc]
) -> None:
    catalog = tmp_path / "models.yaml"
    catalog.write_text(
        f"hosts:\n  lab-a: {{address: 127.0.0.1, port: {sshd.port}, user: root, python: {sys.executable}}}\n"
        "models:\n  - {name: alpha, model: standin/alpha}\n"
    )
    state = Path(env["STATE_DIR"])
    state.mkdir(mode=0o700)
    _, public, _ = ensure_key(state, "test")
    sshd.authorize(public)
    accept(state, Host("lab-a", "127.0.0.1", "root", sshd.port), asyncssh.read_public_key(str(sshd.host_key) + ".pub"))
    e = env_with(env, MODELS=str(catalog), MODEL_NAME="", HF_TOKEN=TOKEN)
    d = start(daemons, e)
    d.wait_state("serving")
    out = subprocess.run(
        [sys.executable, "-m", "watchdog_llm", "download", "org/gated", "--host", "lab-a"],
        env=e, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "downloading org/gated on lab-a" in out.stderr and "100.0%" in out.stderr, out.stderr
    assert "org/gated: done, in " in out.stdout and "on lab-a" in out.stdout
    assert "{name: gated, model: org/gated}" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "watchdog_llm", "download", "org/tiny", "--host", "lab-a"],
        env=e, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0 and out.stderr.count("%") >= 3, out.stderr  # a line per tenth, not per event
    snapshot = Path(out.stdout.split("done, in ")[1].split(" on lab-a")[0])
    assert len(list(snapshot.iterdir())) == FILES + 1
    listing = subprocess.run(
        [sys.executable, "-m", "watchdog_llm", "download", "--list"], env=e, capture_output=True, text=True, timeout=30
    )
    assert listing.stdout.count(" done ") == 2 and "lab-a" in listing.stdout
    log = next((d.state_dir / "logs" / "downloads").glob("*.log")).read_text()
    assert "connected to lab-a" in log and TOKEN not in log
