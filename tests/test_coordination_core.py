"""The coordination core without the daemon: durable state files, the swap lock, the schedule registry and the
connectivity log. Clocks are injected (no sleeps); a "restart" is a second instance on the same file."""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from watchdog_llm.coordination.health import HealthEventIn, HealthLog
from watchdog_llm.coordination.lock import FREE, LockError, LockInfo, SwapLock, public
from watchdog_llm.coordination.schedule import Schedule, ScheduleError, ScheduleIn
from watchdog_llm.coordination.store import JsonStore

LOG = logging.getLogger("test.coordination")
T0 = 1_700_000_000.0


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """These tests start no process: skip conftest's per-test process scan."""
    yield


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".corrupt-*"))


def warned(caplog: pytest.LogCaptureFixture, *words: str) -> bool:
    return any(r.levelno == logging.WARNING and all(w in r.getMessage() for w in words) for r in caplog.records)


def lock_at(path: Path, clock: Clock, max_ttl: float = 86400) -> SwapLock:
    return SwapLock(JsonStore(path, LOG), clock=clock, max_ttl=max_ttl, log=LOG)


# --- the store ---------------------------------------------------------------------------------------------------


def test_store_round_trip_is_private_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = JsonStore(tmp_path / "state" / "x.json", LOG)
    assert store.load() is None  # missing file: nothing, no warning
    store.save({"a": [1, 2.5, "é"]})
    store.save({"a": [3]})
    assert store.load(expect=dict) == {"a": [3]}
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert os.listdir(store.path.parent) == ["x.json"]


def test_a_failed_save_leaves_the_previous_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = JsonStore(tmp_path / "x.json", LOG)
    store.save({"v": 1})

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        store.save({"v": 2})
    monkeypatch.undo()
    assert store.load() == {"v": 1}
    assert os.listdir(tmp_path) == ["x.json"]  # the temp file is cleaned up
    with pytest.raises(ValueError):  # NaN is not JSON: refused before anything is written
        store.save({"v": math.nan})
    assert store.load() == {"v": 1}


def test_save_raises_oserror_when_the_directory_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        JsonStore(tmp_path / "file" / "x.json", LOG).save({})


@pytest.mark.parametrize(
    ("content", "why"),
    [(b"{not json", "not valid JSON"), (b"\xff\xfe", "not valid JSON"), (b"[1, 2]", "top level is list")],
)
def test_a_corrupt_file_is_moved_aside_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, why: str
) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(content)
    assert JsonStore(path, LOG).load(expect=dict) is None
    assert not path.exists()
    [kept] = aside(path)
    assert kept.read_bytes() == content  # kept for a human, not deleted
    assert warned(caplog, str(path), why, kept.name)
    # A second corrupt file in the same second does not overwrite the first one kept aside.
    path.write_bytes(b"garbage")
    assert JsonStore(path, LOG).load() is None
    assert len(aside(path)) == 2


# --- the swap lock -----------------------------------------------------------------------------------------------


def test_lock_acquire_gives_a_token_once_and_a_second_holder_gets_423_naming_holder_and_expiry() -> None:
    clock = Clock()
    lock = SwapLock(None, clock=clock, log=LOG)
    assert lock.status() is None
    token, info = lock.acquire("alice", 600, "demo at 3pm")
    assert token and len(token) >= 40
    assert info == LockInfo(holder="alice", reason="demo at 3pm", acquired_at=T0, expires_at=T0 + 600)
    with pytest.raises(LockError) as e:
        lock.acquire("nightly-job", 60)
    assert (e.value.status, e.value.code, e.value.info) == (423, "locked", info)
    assert "alice" in e.value.message and "2023-11-14T22:23:20Z" in e.value.message and "600 s left" in e.value.message
    # Held: the swap gate refuses anyone without the token, and lets the holder through.
    with pytest.raises(LockError):
        lock.check(None)
    lock.check(token)


def test_the_public_view_never_shows_the_token() -> None:
    lock = SwapLock(None, clock=Clock(), log=LOG)
    assert (
        public(None)
        == dict(FREE)
        == {
            "locked": False,
            "holder": None,
            "reason": None,
            "acquired_at": None,
            "expires_at": None,
        }
    )
    token, _ = lock.acquire("alice", 60)
    shown = public(lock.status())
    assert shown == {"locked": True, "holder": "alice", "reason": "", "acquired_at": T0, "expires_at": T0 + 60}
    assert token is not None and token not in json.dumps(shown)


def test_the_holder_extends_with_the_token_and_others_cannot() -> None:
    clock = Clock()
    lock = SwapLock(None, clock=clock, log=LOG)
    token, _ = lock.acquire("alice", 60, "demo")
    clock.t += 50
    again, info = lock.acquire("alice", 120, token=token)
    assert again is None  # the token is never handed out twice
    assert (info.acquired_at, info.expires_at, info.reason) == (T0, T0 + 170, "demo")
    with pytest.raises(LockError):
        lock.acquire("alice", 120, token="not-the-token")
    clock.t += 119  # the extension counts: still held 169 s after acquiring a 60 s lock
    assert lock.status() == info


def test_an_expired_lock_is_free_and_its_old_token_opens_nothing() -> None:
    clock = Clock()
    lock = SwapLock(None, clock=clock, log=LOG)
    old, _ = lock.acquire("alice", 60)
    clock.t += 59.9
    assert lock.status() is not None
    clock.t += 0.1
    assert lock.status() is None
    lock.check(None)  # free: anyone may swap
    assert lock.release("whatever") is None
    new, info = lock.acquire("bob", 30)
    assert new and new != old and info.holder == "bob"
    with pytest.raises(LockError):
        lock.check(old)
    with pytest.raises(LockError):
        lock.release(old)


def test_release_needs_the_token_or_force_and_is_idempotent(caplog: pytest.LogCaptureFixture) -> None:
    lock = SwapLock(None, clock=Clock(), log=LOG)
    token, info = lock.acquire("alice", 60, "demo")
    with pytest.raises(LockError) as e:
        lock.release(None)
    assert e.value.status == 423
    assert lock.release(token) == info
    assert lock.status() is None
    assert lock.release(token) is None  # already free: nothing to do, no error
    lock.acquire("alice", 60, "demo")
    assert lock.release(None, force=True) == info  # the human override, whoever holds it
    assert lock.status() is None
    assert warned(caplog, "alice", "forcibly released")


@pytest.mark.parametrize("ttl", [0, -1, 86400.5, 1e308, math.inf, math.nan, True, "60", None])
def test_a_bad_ttl_is_400_naming_the_field(ttl: Any) -> None:
    lock = SwapLock(None, clock=Clock(), log=LOG)
    with pytest.raises(LockError) as e:
        lock.acquire("alice", ttl)
    assert (e.value.status, e.value.code) == (400, "invalid_request")
    assert e.value.message.startswith("ttl_s: ") and "\n" not in e.value.message
    assert lock.status() is None


def test_the_ttl_limit_is_configurable() -> None:
    lock = SwapLock(None, clock=Clock(), max_ttl=300, log=LOG)
    lock.acquire("alice", 300)
    with pytest.raises(LockError, match=r"ttl_s: must be > 0 and <= 300 seconds"):
        SwapLock(None, clock=Clock(), max_ttl=300, log=LOG).acquire("alice", 301)


@pytest.mark.parametrize(
    ("holder", "reason", "field"),
    [("", "", "holder"), ("   ", "", "holder"), ("x" * 65, "", "holder"), ("a\nb", "", "holder"), (7, "", "holder"),
     ("alice", "r" * 501, "reason"), ("alice", "line\ninjected", "reason")],
)  # fmt: skip
def test_bad_holder_or_reason_is_400_naming_the_field(holder: Any, reason: str, field: str) -> None:
    with pytest.raises(LockError) as e:
        SwapLock(None, clock=Clock(), log=LOG).acquire(holder, 60, reason)
    assert e.value.status == 400 and e.value.message.startswith(f"{field}: ")


@pytest.mark.parametrize("bad", [None, "", "x" * 100_000, "tok\x00en", "\ud800", "é" * 257, 42])
def test_wrong_empty_or_very_long_tokens_are_just_wrong_tokens(bad: Any) -> None:
    lock = SwapLock(None, clock=Clock(), log=LOG)
    token, _ = lock.acquire("alice", 60)
    assert token is not None
    for op in (lock.check, lock.release, lambda t: lock.acquire("alice", 60, token=t)):
        with pytest.raises(LockError) as e:
            op(bad)
        assert e.value.status == 423
    lock.check(token)
    # A token with a character appended is wrong too (no prefix match).
    with pytest.raises(LockError):
        lock.check(token + "x")


def test_two_clients_racing_for_a_free_lock_exactly_one_wins() -> None:
    lock = SwapLock(None, log=LOG)
    n = 16
    barrier = threading.Barrier(n)
    tokens: list[str] = []
    refused: list[LockError] = []

    def client(i: int) -> None:
        barrier.wait()
        try:
            token, _ = lock.acquire(f"client-{i}", 60)
            assert token is not None
            tokens.append(token)
        except LockError as e:
            refused.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(tokens) == 1 and len(refused) == n - 1
    assert all(e.status == 423 for e in refused)
    lock.check(tokens[0])


def test_the_lock_survives_a_restart_and_its_token_still_works_but_is_not_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "swap-lock.json"
    clock = Clock()
    token, info = lock_at(path, clock).acquire("alice", 600, "demo")
    assert token is not None and token not in path.read_text()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    clock.t += 100
    after = lock_at(path, clock)  # the daemon restarted
    assert after.status() == info
    with pytest.raises(LockError):
        after.acquire("bob", 60)
    after.check(token)
    assert after.release(token) == info
    assert lock_at(path, clock).status() is None  # the release was persisted too


def test_a_lock_that_expired_while_the_daemon_was_down_is_free(tmp_path: Path) -> None:
    path = tmp_path / "swap-lock.json"
    clock = Clock()
    lock_at(path, clock).acquire("alice", 60)
    clock.t += 3600
    after = lock_at(path, clock)
    assert after.status() is None
    assert after.acquire("bob", 60)[0] is not None


@pytest.mark.parametrize(
    "content",
    [b"\x00\x01garbage", b'"a string"', b'{"version": 1, "lock": {"holder": "alice"}}',
     b'{"lock": {"holder": "a", "reason": "", "acquired_at": 1, "expires_at": 2e9, "token_sha256": "zz"}}'],
)  # fmt: skip
def test_a_corrupt_lock_file_is_moved_aside_and_the_lock_starts_free(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    path = tmp_path / "swap-lock.json"
    path.write_bytes(content)
    lock = lock_at(path, Clock())
    assert lock.status() is None
    assert [p.read_bytes() for p in aside(path)] == [content]
    assert warned(caplog, str(path), "corrupt")
    token, _ = lock.acquire("bob", 60)  # and it works, writing a fresh file
    lock_at(path, Clock()).check(token)


def test_a_lock_that_cannot_be_saved_still_works_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("")
    lock = lock_at(tmp_path / "file" / "swap-lock.json", Clock())
    token, _ = lock.acquire("alice", 60)
    lock.check(token)
    assert any(r.levelno == logging.ERROR and "restart would forget" in r.getMessage() for r in caplog.records)


# --- the schedule registry ---------------------------------------------------------------------------------------


def entry(id: str = "nightly-swap", **kw: Any) -> ScheduleIn:
    return ScheduleIn.model_validate(
        {"id": id, "owner": "cron@host", "cron": "0 3 * * *", "action": "swap qwen-7b"} | kw
    )


def test_schedule_upserts_by_id_and_lists_sorted(tmp_path: Path) -> None:
    clock = Clock()
    sched = Schedule(JsonStore(tmp_path / "schedule.json", LOG), clock=clock, log=LOG)
    first, created = sched.put(entry("b-job"))
    assert created and first.created_at == first.updated_at == T0
    sched.put(entry("a-job", cron=None, next_run="2030-01-31T03:00:00+02:00"))
    clock.t += 10
    updated, created = sched.put(entry("b-job", action="swap llama-8b"))
    assert not created
    assert (updated.created_at, updated.updated_at, updated.action) == (T0, T0 + 10, "swap llama-8b")
    assert [e.id for e in sched.list()] == ["a-job", "b-job"]
    a = sched.get("a-job")
    assert a is not None and a.next_run == datetime(2030, 1, 31, 1, 0, tzinfo=UTC)  # stored in UTC
    assert sched.get("nope") is None
    assert sched.delete("a-job") and not sched.delete("a-job")
    assert [e.id for e in sched.list()] == ["b-job"]


def test_schedule_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "schedule.json"
    sched = Schedule(JsonStore(path, LOG), clock=Clock(), log=LOG)
    sched.put(entry("one", description="multi\nline is fine"))
    sched.put(entry("two", next_run="2030-01-31T03:00:00Z"))
    sched.delete("one")
    after = Schedule(JsonStore(path, LOG), clock=Clock(), log=LOG)
    assert after.list() == sched.list()
    assert json.loads(path.read_text())["entries"][0]["next_run"] == "2030-01-31T03:00:00Z"


def test_a_full_schedule_refuses_new_ids_with_409_but_updates_existing_ones() -> None:
    sched = Schedule(None, clock=Clock(), max_entries=2, log=LOG)
    sched.put(entry("a"))
    sched.put(entry("b"))
    with pytest.raises(ScheduleError) as e:
        sched.put(entry("c"))
    assert (e.value.status, e.value.code) == (409, "schedule_full") and "2 entries" in e.value.message
    assert not sched.put(entry("a", action="swap other"))[1]
    assert [x.id for x in sched.list()] == ["a", "b"]


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"id": "../etc/passwd"}, "id"),
        ({"id": "-leading-dash"}, "id"),
        ({"id": "x" * 65}, "id"),
        ({"id": "ok\n"}, "id"),
        ({"owner": ""}, "owner"),
        ({"owner": "bell\x07"}, "owner"),
        ({"action": ""}, "action"),
        ({"action": "a" * 201}, "action"),
        ({"description": "d" * 1001}, "description"),
        ({"cron": "* * * *"}, "cron"),
        ({"cron": "61 * * * *"}, "cron"),
        ({"cron": "* 24 * * *"}, "cron"),
        ({"cron": "* * 0 * *"}, "cron"),
        ({"cron": "* * * foo *"}, "cron"),
        ({"cron": "*/0 * * * *"}, "cron"),
        ({"cron": "0 3 * * * rm -rf /"}, "cron"),
        ({"cron": "0 3 ? * MON#2"}, "cron"),
        ({"cron": "@reboot"}, "cron"),
        ({"cron": None}, "when"),
        ({"next_run": "2030-01-31T03:00:00"}, "next_run"),  # naive: rejected, never guessed
        ({"next_run": "tomorrow"}, "next_run"),
        ({"next_run": "9999-12-31T23:00:00-02:00"}, "next_run"),  # no UTC date: a validation error, not a crash
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_schedule_entries_are_rejected_naming_the_field(fields: dict[str, Any], where: str) -> None:
    with pytest.raises(ValidationError) as e:
        entry(**fields)
    text = str(e.value)
    assert (where in text) if where != "when" else "give cron or next_run" in text


@pytest.mark.parametrize(
    "cron", ["*/15 9-17 * * mon-fri", "0 0 1,15 jan,jul *", "5 4 * * SUN", "0 0 * * 7", "0-59/5 * * * *", "@daily"]
)
def test_ordinary_cron_expressions_are_accepted(cron: str) -> None:
    assert entry(cron=cron).cron is not None


def test_a_corrupt_schedule_file_is_moved_aside_and_the_registry_starts_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "schedule.json"
    path.write_text('{"version": 1, "entries": [')
    sched = Schedule(JsonStore(path, LOG), clock=Clock(), log=LOG)
    assert sched.list() == []
    assert len(aside(path)) == 1 and warned(caplog, str(path), "not valid JSON")
    sched.put(entry("fresh"))
    assert [e.id for e in Schedule(JsonStore(path, LOG), log=LOG).list()] == ["fresh"]


def test_one_bad_stored_entry_is_set_aside_and_the_good_ones_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "schedule.json"
    good = Schedule(JsonStore(path, LOG), clock=Clock(), log=LOG)
    good.put(entry("keep"))
    doc = json.loads(path.read_text())
    doc["entries"].append({"id": "bad one", "owner": "x", "action": "y", "created_at": 1, "updated_at": 1})
    path.write_text(json.dumps(doc))
    sched = Schedule(JsonStore(path, LOG), clock=Clock(), log=LOG)
    assert [e.id for e in sched.list()] == ["keep"]
    [kept] = aside(path)
    assert "bad one" in kept.read_text()  # the original is kept whole for a human
    assert warned(caplog, "1 invalid schedule entries", "'bad one'")
    assert [e.id for e in Schedule(JsonStore(path, LOG), log=LOG).list()] == ["keep"]
    assert len(aside(path)) == 1  # rewritten clean: no warning on the next start


# --- the connectivity log ----------------------------------------------------------------------------------------


def ev(service: str = "vllm", ok: bool = True, **kw: Any) -> HealthEventIn:
    return HealthEventIn.model_validate({"service": service, "ok": ok} | kw)


def test_the_connectivity_log_is_bounded_newest_last_and_filterable(tmp_path: Path) -> None:
    clock = Clock()
    log = HealthLog(JsonStore(tmp_path / "health.json", LOG), clock=clock, limit=3)
    for i in range(5):
        clock.t = T0 + i
        rec = log.append(ev("vllm" if i % 2 == 0 else "tunnel", ok=i != 4, source="spark", ms=12.5))
        assert rec.at == T0 + i
    assert [r.at for r in log.list()] == [T0 + 2, T0 + 3, T0 + 4]  # oldest dropped
    assert [r.at for r in log.list(limit=2)] == [T0 + 3, T0 + 4]
    assert log.list(limit=0) == []
    assert [r.at for r in log.list(service="vllm")] == [T0 + 2, T0 + 4]
    assert log.list()[-1].ok is False

    after = HealthLog(JsonStore(tmp_path / "health.json", LOG), clock=clock, limit=2)  # restart, smaller limit
    assert [r.at for r in after.list()] == [T0 + 3, T0 + 4]


@pytest.mark.parametrize(
    "fields",
    [{"service": ""}, {"service": "s" * 65}, {"ms": -1}, {"ms": math.nan}, {"ms": math.inf}, {"source": "x" * 65},
     {"error": "e" * 1001}, {"ok": "maybe"}, {"extra": 1}],
)  # fmt: skip
def test_bad_health_events_are_rejected(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        HealthEventIn.model_validate({"service": "vllm", "ok": True} | fields)


def test_a_corrupt_connectivity_log_starts_empty(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "health.json"
    path.write_text('{"records": "nope"}')
    log = HealthLog(JsonStore(path, LOG), clock=Clock(), log=LOG)
    assert log.list() == []
    assert len(aside(path)) == 1 and warned(caplog, str(path), "'records' is not a list")
    log.append(ev())
    assert len(HealthLog(JsonStore(path, LOG)).list()) == 1
