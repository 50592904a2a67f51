"""schemathesis over the admin API's own OpenAPI schema, served by a real daemon over TCP: no 5xx,
and every response matches the schema (status codes, content types, bodies)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from daemon_harness import DaemonProc
from helpers import free_port
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

TOKEN = "schema-test-token-0123456789"


@pytest.fixture
def admin_daemon(daemon_env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    d = DaemonProc({**daemon_env, "ADMIN_HOST": "127.0.0.1", "ADMIN_PORT": str(port), "ADMIN_TOKEN": TOKEN})
    try:
        d.wait_state("serving")
        yield f"http://127.0.0.1:{port}"
    finally:
        d.cleanup()


def test_admin_api_conforms_to_its_schema(admin_daemon: str) -> None:
    # Hypothesis driven directly: schemathesis's pytest loader (from_fixture) breaks on pytest 9.
    auth = {"Authorization": f"Bearer {TOKEN}"}
    schema = schemathesis.openapi.from_url(admin_daemon + "/openapi.json", headers=auth)
    schema.config.update(base_url=admin_daemon, headers=auth)
    paths = []
    for result in schema.get_all_operations():
        op = result.ok()
        paths.append(op.path)

        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: Any) -> None:
            # Not "positive data is accepted": the API has state. A valid lock request while someone
            # holds the lock is rightly 423, a valid swap while another runs 409, a second holder's
            # ttl within the schema but over SWAP_LOCK_MAX_TTL 400. Every other check runs: no 5xx,
            # documented status codes, content types and bodies that match the schema.
            case.call_and_validate(headers=auth, excluded_checks=[positive_data_acceptance])

        check()
    assert {"/api/status", "/healthz", "/metrics", "/api/swap", "/api/swap/lock", "/api/schedule"} <= set(paths)
