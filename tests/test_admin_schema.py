"""schemathesis over the admin API's own OpenAPI schema, served by a real daemon over TCP, with every check it
has (`--checks all`: no 5xx; documented status codes, content types, headers and bodies; schema-valid input
accepted and schema-invalid input rejected; 405 with `Allow` for a method the schema does not declare; missing
headers, stateful links, ...) in every phase (examples, coverage, fuzzing, stateful), bounded for CI.

And the answers that conformance rests on, spelled out: one status (422) and a one-line message naming the
field for every invalid request, with the limits the schema states."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from daemon_harness import DaemonProc
from helpers import free_port
from schemathesis.cli import schemathesis as schemathesis_cli

TOKEN = "schema-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_TTL = 3600  # not the default (86400): the schema's maximum must come from SWAP_LOCK_MAX_TTL
# Per operation and phase; the whole run takes about 20 s on 2 cores (a 50-example run about 35 s).
MAX_EXAMPLES = 20

# The API has state that a schema-valid request can run into, and says so in its schema: 423 while someone else
# holds the swap lock (one case takes it, the next one without its token is refused). That is the right answer to
# valid input, so for the three operations the lock guards it is expected, as schemathesis's configuration offers
# (its own list, plus 423). Nothing else is excluded: 409 (a swap under way, a full schedule) and 404 (no such
# model, swap or entry) are on schemathesis's list already, and every other check runs everywhere.
CONFIG = """
generation.database = "none"
cache.enabled = false  # no .schemathesis/ left in the checkout: every run starts afresh

[[operations]]
include-path = ["/api/swap", "/api/swap/lock"]
include-method = ["POST", "DELETE"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "423", "429", "5xx"]

[[operations]]
include-path = "/api/swap/{key}/validate"
parameters = { key = "%s" }
"""


@pytest.fixture
def admin_daemon(daemon_env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    env = {**daemon_env, "ADMIN_HOST": "127.0.0.1", "ADMIN_PORT": str(port), "ADMIN_TOKEN": TOKEN}
    d = DaemonProc({**env, "SWAP_LOCK_MAX_TTL": str(MAX_TTL)})
    try:
        d.wait_state("serving")
        yield f"http://127.0.0.1:{port}"
    finally:
        d.cleanup()


def test_admin_api_conforms_to_its_schema(admin_daemon: str, tmp_path: Path) -> None:
    doc = httpx.get(admin_daemon + "/openapi.json", headers=AUTH).json()
    assert {"/api/status", "/healthz", "/metrics", "/api/swap", "/api/swap/lock", "/api/schedule"} <= set(doc["paths"])
    assert doc["components"]["schemas"]["LockIn"]["properties"]["ttl_s"]["maximum"] == MAX_TTL
    # The dry run of a model the catalog has (a drawn name is only ever a 404).
    model = httpx.get(admin_daemon + "/api/models", headers=AUTH).json()["models"][0]["name"]
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG % model)
    args = [
        "--no-color",
        "--config-file",
        str(config),
        "run",
        admin_daemon + "/openapi.json",
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--workers",
        "1",
        # An endless stream (its answer never ends): tests/test_dashboard.py reads it.
        "--exclude-path",
        "/api/events",
    ]
    # In-process, as CI runs `st run`; a failure prints schemathesis's report: each case with a curl line to
    # reproduce it, and the seed (`--seed`) to replay the run.
    result = CliRunner().invoke(schemathesis_cli, args)
    assert result.exit_code == 0, result.output


def post(url: str, body: Any = None, *, content: bytes | None = None) -> httpx.Response:
    if content is None:
        content = json.dumps(body).encode()
    return httpx.post(url, content=content, headers={**AUTH, "Content-Type": "application/json"})


def invalid(r: httpx.Response, field: str) -> str:
    """A 422 with the API's error body and one line that names the field first."""
    assert r.status_code == 422, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "message", "consumer", "retryable"} and body["error"] == "invalid_request", body
    message: str = body["message"]
    assert message.startswith(f"{field}: ") and "\n" not in message and "Traceback" not in message, message
    return message


LOCK = {"holder": "ci", "ttl_s": 60}
SCHEDULE = {"id": "nightly", "owner": "cron", "action": "swap qwen-7b"}


def test_invalid_requests_are_one_line_422s_naming_the_field(admin_daemon: str) -> None:
    lock, schedule = admin_daemon + "/api/swap/lock", admin_daemon + "/api/schedule"
    # ttl_s above SWAP_LOCK_MAX_TTL: the same 422 as any other invalid field (it was a 400), and the maximum
    # the message gives is the schema's.
    assert str(MAX_TTL) in invalid(post(lock, {**LOCK, "ttl_s": MAX_TTL + 1}), "ttl_s")
    for ttl in (0, -1, "60", True, None, 1e400):
        invalid(post(lock, {**LOCK, "ttl_s": ttl}), "ttl_s")
    for holder in ("", "   ", "a\nb", "\u0097", "\u202eevil", 7):
        invalid(post(lock, {**LOCK, "holder": holder}), "holder")
    invalid(post(lock, {**LOCK, "reason": "line\ninjected"}), "reason")
    # next_run: an RFC 3339 string with an offset in the years 2000-2999, never a number.
    for when in (0, -1, 1.5e9, "0", "1700000000", "2030-01-31", "2030-01-31T03:00:00", "2030-01-31 03:00:00Z",
                 "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "2030-02-30T03:00:00Z", "tomorrow", True):  # fmt: skip
        invalid(post(schedule, {**SCHEDULE, "next_run": when}), "next_run")
    invalid(post(schedule, {**SCHEDULE, "cron": "61 * * * *"}), "cron")
    invalid(post(schedule, {**SCHEDULE, "owner": "\u2028"}), "owner")
    invalid(post(schedule, SCHEDULE), "body")  # neither cron nor next_run
    # A body that is not JSON at all, or not UTF-8: invalid like the rest (the second was FastAPI's 400).
    invalid(post(schedule, content=b"{"), "body")
    invalid(post(schedule, content=b'{"id": "\xff"}'), "body")
    invalid(post(admin_daemon + "/api/health-event", {"service": "vllm", "ok": "yes"}), "ok")
    # What is valid is accepted: the maximum itself, a time in the past (the entry is overdue), a cron.
    assert post(lock, {**LOCK, "ttl_s": MAX_TTL}).status_code == 200
    past = post(schedule, {**SCHEDULE, "next_run": "2001-02-03T04:05:06+01:00"})
    assert past.status_code == 201 and past.json()["next_run"] == "2001-02-03T03:05:06Z", past.text
    assert post(schedule, {**SCHEDULE, "id": "cron", "cron": " */15 9-17 * * MON-fri "}).status_code == 201
