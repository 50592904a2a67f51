"""Per-model settings that persist (STATE_DIR/overrides.json): how they replace the catalog's flags,
every bad value named, and, in the real daemon, a setting that reaches the model's next start,
survives a restart and is shown by `models`."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path
from typing import Any

import openai
import pytest
from daemon_harness import DaemonProc, env_with, start
from helpers import TEST_KEY
from test_cli_coordination import cli
from test_coordination_daemon import admin, wait_swap

from watchdog_llm.coordination.catalog import ModelEntry
from watchdog_llm.coordination.overrides import ModelSettings, Overrides, SettingsError, merged, parse
from watchdog_llm.coordination.store import JsonStore

LOG = logging.getLogger("test")


def test_a_setting_replaces_the_catalogs_flag_however_it_was_written() -> None:
    s = ModelSettings(max_model_len=32768, prefix_caching=False, kv_cache_dtype="fp8", extra_args=("--seed", "7"))
    args = ("--max-model-len=8192", "--enable-prefix-caching", "--dtype", "half", "--kv_cache_dtype", "auto")
    assert merged(args, s) == (
        "--dtype", "half",
        "--max-model-len", "32768", "--no-enable-prefix-caching", "--kv-cache-dtype", "fp8", "--seed", "7",
    )  # fmt: skip
    assert merged(("--max-model-len", "4096"), ModelSettings()) == ("--max-model-len", "4096")
    assert merged(("--gpu-memory-utilization", "0.9"), ModelSettings(gpu_memory_utilization=0.5)) == (
        "--gpu-memory-utilization",
        "0.5",
    )


@pytest.mark.parametrize(
    ("patch", "field", "why"),
    [
        ({"max_model_len": 0}, "max_model_len", "from 16"),
        ({"max_model_len": "4096"}, "max_model_len", "whole number"),
        ({"max_model_len": True}, "max_model_len", "whole number"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization", "at most 1"),
        ({"prefix_caching": "yes"}, "prefix_caching", "true or false"),
        ({"kv_cache_dtype": "fp8; reboot"}, "kv_cache_dtype", "dtype name"),
        ({"extra_args": "--port 9000"}, "extra_args", "--port is not allowed"),
        ({"extra_args": ["--api-key", "k"]}, "extra_args", "--api-key is not allowed"),
        ({"extra_args": "--max-model-len 5"}, "extra_args", "use max_model_len"),
        ({"extra_args": "--no-enable-prefix-caching"}, "extra_args", "use prefix_caching"),
        ({"extra_args": "'unclosed"}, "extra_args", "shell-quoted"),
        ({"temperature": 0.2}, "temperature", "unknown setting"),
    ],
)
def test_every_bad_setting_is_refused_naming_its_field(patch: dict[str, Any], field: str, why: str) -> None:
    with pytest.raises(SettingsError) as e:
        parse(patch, ModelSettings(), remote=False)
    assert e.value.field == field and why in str(e.value), str(e.value)


def test_a_remote_model_may_set_its_own_port_and_none_clears_a_setting() -> None:
    s = parse({"extra_args": "--port 8001", "max_model_len": 4096}, ModelSettings(), remote=True)
    assert s.extra_args == ("--port", "8001")
    assert parse({"max_model_len": None}, s, remote=True) == ModelSettings(extra_args=("--port", "8001"))


def test_the_file_is_written_atomically_0600_and_a_failed_write_changes_nothing(tmp_path: Path) -> None:
    entry = ModelEntry("alpha", "org/alpha", args=("--max-model-len", "2048"))
    ov = Overrides(JsonStore(tmp_path / "overrides.json", LOG), LOG)
    ov.update(entry, {"max_model_len": 8192})
    path = tmp_path / "overrides.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["models"]["alpha"]["max_model_len"] == 8192
    assert ov.applied(entry).args == ("--max-model-len", "8192")
    assert Overrides(JsonStore(path, LOG), LOG).get("alpha").max_model_len == 8192  # read back by a new daemon

    # The new file cannot take the old one's place (root ignores permissions: a directory is in the
    # way): nothing changes, in memory either, and no temp file is left.
    path.unlink()
    (path / "in-the-way").mkdir(parents=True)
    with pytest.raises(OSError):
        ov.update(entry, {"max_model_len": 16384})
    assert ov.get("alpha").max_model_len == 8192 and not list(tmp_path.glob(".overrides.json.*"))
    (path / "in-the-way").rmdir()
    path.rmdir()

    path.write_text('{"models": {"alpha": {"max_model_len": -5}, "beta": {"kv_cache_dtype": "fp8"}}}')
    again = Overrides(JsonStore(path, LOG), LOG)  # a bad stored entry is dropped, the others kept
    assert again.get("alpha") == ModelSettings() and again.get("beta").kv_cache_dtype == "fp8"


CATALOG = """\
default: alpha
models:
  - {name: alpha, model: standin/alpha, args: [--max-model-len, "2048"]}
  - {name: beta, model: standin/beta}
"""


def max_len(d: DaemonProc) -> int:
    c = openai.OpenAI(base_url=d.status()["public_url"] + "/v1", api_key=TEST_KEY, max_retries=0, timeout=10)
    card = c.models.list().data[0]
    return int(card.model_extra["max_model_len"])  # type: ignore[index]


def test_settings_reach_the_next_start_survive_a_restart_and_are_shown(
    daemons: list[DaemonProc], daemon_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "models.yaml").write_text(CATALOG)
    env = env_with(daemon_env, MODELS=str(tmp_path / "models.yaml"), MODEL_NAME="")
    d = start(daemons, env)
    d.wait_state("serving")
    assert max_len(d) == 2048
    with admin(d) as c:
        r = c.patch("/api/models/alpha/settings", json={"max_model_len": 8192, "kv_cache_dtype": "fp8"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["active"] is True and body["args"] == ["--max-model-len", "8192", "--kv-cache-dtype", "fp8"]
        assert max_len(d) == 2048  # the running model is not restarted behind anyone's back
        bad = c.patch("/api/models/alpha/settings", json={"extra_args": "--api-key s3cret"})
        assert bad.status_code == 422 and bad.json()["error"] == "invalid_settings"
        assert bad.json()["field"] == "extra_args" and "s3cret" not in bad.text
        typed = c.patch("/api/models/alpha/settings", json={"max_model_len": "big"})
        assert typed.status_code == 422 and "max_model_len" in typed.json()["message"]
        assert c.patch("/api/models/gamma/settings", json={}).status_code == 404
        models = {m["name"]: m for m in c.get("/api/models").json()["models"]}
        assert (
            models["alpha"]["settings"]["max_model_len"] == 8192 and models["beta"]["settings"]["max_model_len"] is None
        )
        # The next start of alpha (here: swapping away and back) gets them.
        wait_swap(c, c.post("/api/swap", json={"model": "beta"}).json()["id"], "ready")
        wait_swap(c, c.post("/api/swap", json={"model": "alpha"}).json()["id"], "ready")
    assert max_len(d) == 8192
    log = (d.state_dir / "logs" / "model.log").read_text()
    assert "'kv_cache_dtype': 'fp8'" in log  # the stand-in logs vLLM's "non-default args" line
    out = cli(env, "models")
    assert out.returncode == 0 and "tuned: --max-model-len 8192 --kv-cache-dtype fp8" in out.stdout, out.stdout

    # A new daemon on the same STATE_DIR starts alpha with them at once.
    assert d.terminate() == 0
    d2 = start(daemons, env)
    d2.wait_state("serving")
    assert max_len(d2) == 8192
    r = cli(env, "tune", "alpha", "--max-model-len", "none", "--prefix-caching", "off")
    assert r.returncode == 0, r.stderr
    assert "args at its next start" in r.stdout and "--max-model-len 2048" in r.stdout
    assert "--no-enable-prefix-caching" in r.stdout
    r = cli(env, "tune", "alpha", "--prefix-caching", "maybe")
    assert r.returncode != 0 and "--prefix-caching: expected on, off or none" in r.stderr
    r = cli(env, "tune", "alpha", "--reset", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["args"] == ["--max-model-len", "2048"]
